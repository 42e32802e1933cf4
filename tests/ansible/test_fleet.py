"""Real ansible-playbook runs against a simulated fleet of three hosts on this machine.

The tests share one fleet and run in order: a rollout brings all three stacks up, a second
identical run changes nothing, a broken release is rolled back on the first host and stops the
play there, and rollback.yml swaps a host back to its previous release.
"""

from __future__ import annotations

import os
import re

import psutil
import pytest

from tests.ansible.fleet import recap, snapshot
from tests.support import wait_until

pytestmark = [pytest.mark.ansible, pytest.mark.slow, pytest.mark.timeout(900)]


def test_rollout_brings_every_stack_up_healthy(fleet):
    # all three at once for speed (the extra var overrides group_vars/all/rollout.yml); the later tests use serial 1
    done = fleet.playbook("site.yml", "-e", "keel_version=v1", "-e", "keel_serial=3")
    assert done.returncode == 0, done.stdout[-4000:]
    counts = recap(done.stdout)
    assert set(counts) == {h.name for h in fleet.hosts}
    for host in fleet.hosts:
        assert counts[host.name]["failed"] == 0 and counts[host.name]["changed"] > 0
        assert os.readlink(host.current) == str(host.prefix / "releases" / "v1")
        assert host.healthy(), host.status()
        status = host.status()
        assert status["dashboard_url"] == f"http://127.0.0.1:{host.port}/"
        assert {p["name"] for p in status["processes"]} == {"trainer", "dashboard", "watchdog"}
        assert host.socket.exists()
        # the release holds no venv of its own (linked), no var/ or build/ from the controller, no .git
        release = host.prefix / "releases" / "v1"
        assert (release / ".venv").is_symlink()
        assert not (release / ".git").exists() and not (release / "var").exists()
        # shared dirs outside the release
        assert (host.prefix / "run" / "trainer.status.json").exists()
        assert (host.prefix / "checkpoints").is_dir()


def test_second_identical_run_changes_nothing(fleet):
    pids = {h.name: h.pids() for h in fleet.hosts}
    done = fleet.playbook("site.yml", "-e", "keel_version=v1", "-e", "keel_serial=3")
    assert done.returncode == 0, done.stdout[-4000:]
    counts = recap(done.stdout)
    for host in fleet.hosts:
        assert counts[host.name]["changed"] == 0, done.stdout[-4000:]
        assert counts[host.name]["failed"] == 0
        assert host.pids() == pids[host.name], "an unchanged rollout restarted a process"


def test_failing_release_is_rolled_back_and_stops_the_play(fleet, tmp_path):
    # a release whose trainer dies at start: it can never pass the health gate
    broken = snapshot(tmp_path / "broken")
    main = broken / "trainer" / "__main__.py"
    main.write_text('import sys\nsys.exit("broken release: the trainer exits at start (test)")\n' + main.read_text())
    first, *others = fleet.hosts
    before = {h.name: h.pids() for h in others}
    assert any((first.prefix / "checkpoints").iterdir()), "the trainer has written no checkpoint yet"

    done = fleet.playbook("site.yml", "-e", "keel_version=v2-broken", "-e", f"keel_source_dir={broken}",
                          "-e", f"keel_controller_build_dir={tmp_path / 'controller'}")
    assert done.returncode != 0
    assert f"ROLLED BACK {first.name}: v2-broken failed" in done.stdout
    # the watchdog's verdict may still be its last poll's ("starting ... BACKOFF"); the backend's state is now's
    assert re.search(r"Cause: trainer \w+ \(.*; backend FATAL\)", done.stdout), done.stdout[-3000:]
    counts = recap(done.stdout)
    assert counts[first.name]["failed"] == 1
    # serial 1 + max_fail_percentage 0: the play stopped before the next host
    for host in others:
        assert host.name not in counts or counts[host.name]["changed"] == 0
        assert not (host.prefix / "releases" / "v2-broken").exists()
        assert host.version() == "v1"
        assert host.pids() == before[host.name]
        assert host.healthy()
    # the first host is back on v1, healthy; its checkpoints survived
    assert first.version() == "v1"
    assert (first.prefix / "releases" / "v2-broken").is_dir()
    assert not (first.prefix / "previous").exists()
    wait_until(first.healthy, 120, interval=2, what=f"{first.name} healthy after the rollback")
    assert any((first.prefix / "checkpoints").iterdir()), "a rollout must never delete checkpoints"


def test_rollback_playbook_returns_to_the_previous_release(fleet):
    host = fleet.hosts[-1]
    done = fleet.playbook("site.yml", "-e", "keel_version=v3", "--limit", host.name)
    assert done.returncode == 0, done.stdout[-4000:]
    assert host.version() == "v3"
    assert os.readlink(host.prefix / "previous").endswith("/releases/v1")
    assert host.healthy()

    done = fleet.playbook("rollback.yml", "--limit", host.name)
    assert done.returncode == 0, done.stdout[-4000:]
    assert host.version() == "v1"
    assert os.readlink(host.prefix / "previous").endswith("/releases/v3")
    assert host.healthy()
    trainer = psutil.Process(host.pids()["trainer"])
    assert f"{host.prefix}/releases/v1/" in " ".join(trainer.cmdline())
