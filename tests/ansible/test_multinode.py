"""A two-node torchrun job rolled out, updated and rolled back with real ansible-playbook runs, as one unit.

Two simulated fleet hosts form the inventory group keel_job_pair (under keel_jobs): one torchrun agent
each (nproc_per_node 1, gloo), c10d rendezvous on 127.0.0.1:<free port> (keel_job_rdzv_host/port), one
checkpoint dir shared by both. site.yml's multinode.yml must stop every node before it starts any,
switch both to the new release, and gate on both healthy in one world of size 2; multinode_rollback.yml
takes both back together.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import yaml

from tests.ansible.fleet import failures, make_fleet, recap, snapshot
from tests.support import free_port, wait_until

pytestmark = [pytest.mark.ansible, pytest.mark.slow, pytest.mark.timeout(1200)]

STOP_TASK = "TASK [keel_job : Stop every process of this node (bin/launch down)]"
START_TASK = "TASK [keel_supervisord : Ensure the stack's supervisord is started from current]"


@pytest.fixture(scope="module")
def job(tmp_path_factory, source):
    root = tmp_path_factory.mktemp("jobfleet")
    port = free_port()
    fleet = make_fleet(root, source, count=2)
    # the job's torchrun settings on top of the fleet's light-stack overrides (a dict var is replaced, not merged)
    overrides = yaml.safe_load((fleet.inventory / "hosts.yml").read_text())["keel"]["vars"]["keel_config_overrides"]
    overrides.update({
        "processes.trainer.torchrun.nproc_per_node": 1,
        "processes.trainer.torchrun.backend": "gloo",
        "processes.trainer.torchrun.join_timeout": "3m",
        "processes.trainer.torchrun.last_call_timeout": "1s",
        "processes.trainer.torchrun.close_timeout": "5s",
        "processes.trainer.checkpoint.every_seconds": "2s",
    })
    fleet.jobs = {"pair": {"hosts": [h.name for h in fleet.hosts], "vars": {
        "keel_checkpoint_dir": str(root / "shared-checkpoints"),
        "keel_job_rdzv_host": "127.0.0.1",
        "keel_job_rdzv_port": port,
        "keel_config_overrides": overrides,
    }}}
    fleet.write_inventory()
    fleet.rdzv = f"127.0.0.1:{port}"
    try:
        yield fleet
    finally:
        fleet.down()


def rendered(host) -> tuple[str, str, str]:
    """(rdzv endpoint, rdzv id, node) of the current release's resolved trainer.json, checked against its command."""
    torchrun = json.loads((host.current / "build" / "dev" / "trainer.json").read_text())["trainer"]["torchrun"]
    conf = (host.current / "build" / "dev" / "supervisord.conf").read_text()
    assert f"--rdzv-endpoint {torchrun['rdzv_endpoint']}" in conf and f"--rdzv-id {torchrun['rdzv_id']}" in conf, conf
    assert torchrun["node"] == host.name and torchrun["nnodes"] in (2, "2")
    return torchrun["rdzv_endpoint"], torchrun["rdzv_id"], host.version()


def one_world(job) -> bool:
    """Every node healthy, its single rank in a world of 2."""
    for host in job.hosts:
        status = host.status()
        if not (status and status["healthy"]):
            return False
        trainer = next(p for p in status["processes"] if p["name"] == "trainer")
        if [r.get("world_size") for r in trainer.get("ranks", [])] != [2]:
            return False
    return True


def assert_one_unit(job, output: str, version: str) -> None:
    """Every node stopped (one task, both hosts) before any started, each once; both on `version` in one world."""
    assert output.count(STOP_TASK) == 1, output[-4000:]
    assert output.count(START_TASK) == 1, output[-4000:]
    stop, start = output.index(STOP_TASK), output.index(START_TASK)
    assert stop < start
    stopped = output[stop:output.index("TASK [", stop + 1)]
    for host in job.hosts:
        assert f"changed: [{host.name}]" in stopped, stopped
        assert host.version() == version
    ids = {rendered(h) for h in job.hosts}
    assert len(ids) == 1 and next(iter(ids))[0] == job.rdzv and next(iter(ids))[1].endswith(f"-{version}"), ids
    assert one_world(job), [h.status() for h in job.hosts]


def test_job_rolls_out_updates_and_rolls_back_as_one_unit(job, tmp_path):
    done = job.playbook("site.yml", "-e", "keel_version=v1")
    assert done.returncode == 0, failures(done.stdout)
    for host in job.hosts:
        assert host.version() == "v1"
    ids = {rendered(h) for h in job.hosts}
    assert len(ids) == 1 and next(iter(ids))[0] == job.rdzv and next(iter(ids))[1].endswith("-v1"), ids
    assert one_world(job), [h.status() for h in job.hosts]
    # the job trains and checkpoints into the one shared dir
    shared = job.root / "shared-checkpoints"
    wait_until(lambda: any(p.name != ".keel-shared-checkpoints" for p in shared.iterdir()), 120, interval=1,
               what="a checkpoint in the shared dir")
    before = {h.name: h.pids()["trainer"] for h in job.hosts}

    done = job.playbook("site.yml", "-e", "keel_version=v2")
    assert done.returncode == 0, failures(done.stdout)
    assert_one_unit(job, done.stdout, "v2")
    after = {h.name: h.pids()["trainer"] for h in job.hosts}
    assert all(after[n] != before[n] for n in before), (before, after)
    assert all(recap(done.stdout)[h.name]["failed"] == 0 for h in job.hosts)

    # a release whose trainer dies at start fails the gate: every node goes back to v2 together
    broken = snapshot(tmp_path / "broken")
    main = broken / "trainer" / "__main__.py"
    main.write_text('import sys\nsys.exit("broken release: the trainer exits at start (test)")\n' + main.read_text())
    # keel_health_timeout short: the watchdog gives up on the crash loop (STOPPED, not FATAL), so the gate
    # waits its whole timeout; 45 s is long enough to see the crash loop, and keeps the test short.
    done = job.playbook("site.yml", "-e", "keel_version=v3-broken", "-e", f"keel_source_dir={broken}",
                        "-e", f"keel_controller_build_dir={tmp_path / 'controller'}", "-e", "keel_health_timeout=45")
    assert done.returncode != 0
    for host in job.hosts:
        assert f"ROLLED BACK job pair on {host.name}: every node is on v2 again" in done.stdout, failures(done.stdout)
        assert re.search(rf'{host.name} failed at \\"Wait until every process is healthy.*\\": trainer \w+ \(', done.stdout)
        assert (host.prefix / "releases" / "v3-broken").is_dir()
        assert os.readlink(host.prefix / "previous").endswith("/releases/v1")
    assert_one_unit(job, done.stdout[done.stdout.index("TASK [Ensure every node of the failed job is stopped]"):], "v2")

    done = job.playbook("multinode_rollback.yml")
    assert done.returncode == 0, failures(done.stdout)
    assert_one_unit(job, done.stdout, "v1")
    for host in job.hosts:
        assert os.readlink(host.prefix / "previous").endswith("/releases/v2")
