"""supervisord include mode (prod's backend): the role installs a conf.d fragment into a running
"system" supervisord (here one of our own, in tmp_path), which rereads and updates and runs the stack."""

from __future__ import annotations

import subprocess

import pytest

from tests.ansible.fleet import VENV_BIN, make_fleet, recap
from tests.support import wait_until, write_host_supervisord_conf

pytestmark = [pytest.mark.ansible, pytest.mark.slow, pytest.mark.timeout(600)]


def test_include_mode_installs_the_fragment_and_the_host_supervisord_runs_it(tmp_path, source, reaper):
    system = tmp_path / "system"
    conf = write_host_supervisord_conf(system)
    conf_d, sock = system / "conf.d", system / "supervisor.sock"
    log = (system / "supervisord.out").open("wb")
    supervisord = reaper.popen([str(VENV_BIN / "supervisord"), "-n", "-c", str(conf)], cwd=system,
                               stdout=log, stderr=subprocess.STDOUT)
    ctl = [str(VENV_BIN / "supervisorctl"), "-c", str(conf)]
    wait_until(lambda: subprocess.run([*ctl, "pid"], capture_output=True).returncode == 0, 30, what="system supervisord up")

    fleet = make_fleet(tmp_path / "fleet", source, count=1, keel_supervisord_mode="include",
                       keel_supervisord_conf_dir=str(conf_d), keel_supervisord_ctl=str(VENV_BIN / "supervisorctl"))
    host = fleet.hosts[0]
    host.socket = sock
    fleet.write_inventory()
    try:
        done = fleet.playbook("site.yml", "-e", "keel_version=v1")
        assert done.returncode == 0, done.stdout[-4000:]
        assert recap(done.stdout)[host.name]["failed"] == 0
        fragment = conf_d / "keel.conf"
        assert fragment.read_text() == (host.prefix / "releases" / "v1" / "build" / "dev" / "keel.conf").read_text()
        assert f"{host.prefix}/releases/v1/.venv/bin/python -m trainer" in fragment.read_text()
        assert host.healthy()
        status = subprocess.run([*ctl, "status"], capture_output=True, text=True).stdout
        assert all(f"keel-{name}" in status and "RUNNING" in status for name in ("trainer", "dashboard", "watchdog"))
        assert supervisord.poll() is None  # the host supervisord itself was never restarted
    finally:
        subprocess.run([*ctl, "stop", "all"], capture_output=True, timeout=120)
        subprocess.run([*ctl, "shutdown"], capture_output=True, timeout=60)
        try:
            supervisord.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        log.close()
        fleet.down()
