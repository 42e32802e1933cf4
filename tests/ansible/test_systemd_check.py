"""The systemd backend in --check --diff: it renders and places the units (they cannot run here:
systemd is not PID 1), changes nothing it should not, and systemd-analyze verify passes on them."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.ansible.fleet import make_fleet, recap, stack_processes

pytestmark = [pytest.mark.ansible, pytest.mark.slow, pytest.mark.timeout(600)]


def test_systemd_check_diff_shows_the_units_and_they_verify(tmp_path, source, reaper):
    fleet = make_fleet(tmp_path / "fleet", source, count=1)
    host = fleet.hosts[0]
    units = tmp_path / "units"
    units.mkdir()
    done = fleet.playbook("site.yml", "--check", "--diff", "-e", "keel_version=v1", "-e", "keel_backend=systemd",
                          "-e", f"keel_systemd_unit_dir={units}")
    assert done.returncode == 0, done.stdout[-4000:]
    assert recap(done.stdout)[host.name]["failed"] == 0
    rendered = sorted((host.prefix / "releases" / "v1" / "build" / "dev" / "systemd").iterdir())
    names = [p.name for p in rendered]
    assert names == ["keel-dashboard.service", "keel-trainer.service", "keel-watchdog.service", "keel.target"]
    for path in rendered:
        # --diff shows each unit as it would be installed, with this host's paths
        assert f"after: {units}/{path.name}" in done.stdout, done.stdout[-4000:]
    assert f'+ExecStart="{host.prefix}/releases/v1/.venv/bin/python" "-m" "trainer"' in done.stdout
    assert f"+ReadWritePaths={host.prefix}/run {host.prefix}/log {host.prefix}/checkpoints" in done.stdout
    # check mode: nothing installed, nothing switched, nothing started
    assert list(units.iterdir()) == []
    assert not (host.prefix / "current").exists()
    assert not (host.prefix / "run").exists()
    assert stack_processes(fleet.root) == []

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (.ci/run installs systemd)")
    verify = subprocess.run([analyze, "verify", *map(str, rendered)], capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stderr
    # verify exits 0 on unknown keys and other warnings: require a silent stderr
    assert verify.stderr.strip() == "", verify.stderr
