"""A real supervisord on the rendered config: start, status, selective update, stop, nothing left behind."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from tests.support import REPO_ROOT, is_alive, wait_until, write_host_supervisord_conf

pytestmark = pytest.mark.slow

SUPERVISORD = str(Path(sys.executable).parent / "supervisord")
SUPERVISORCTL = str(Path(sys.executable).parent / "supervisorctl")
STANDIN = str(REPO_ROOT / "tests" / "integration" / "standin.py")


def make_configs(tmp_path: Path) -> Path:
    """The shipped base.yaml with keel's kinds pointed at stand-ins, everything under tmp_path."""
    cfg = tmp_path / "configs"
    cfg.mkdir()
    (cfg / "base.yaml").write_text((REPO_ROOT / "configs" / "base.yaml").read_text())
    command = f"[{sys.executable}, {STANDIN}]"
    (cfg / "test.yaml").write_text(textwrap.dedent(f"""\
        paths:
          root: {tmp_path}/root
        processes:
          trainer:
            command: {command}
            startsecs: 1s
          dashboard:
            command: {command}
          watchdog:
            command: {command}
        """))
    return cfg


def render(cfg: Path, out: Path, *overrides: str) -> None:
    args = [str(REPO_ROOT / "bin" / "render-config"), "test", "--config-dir", str(cfg), "--out", str(out), "-q"]
    for override in overrides:
        args += ["--set", override]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def ctl(conf: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SUPERVISORCTL, "-c", str(conf), *args], capture_output=True, text=True, timeout=60)


def program_pids(conf: Path) -> dict[str, int]:
    pids = {}
    for line in ctl(conf, "status").stdout.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[1] == "RUNNING":
            pids[parts[0].removeprefix("keel-")] = int(parts[3].rstrip(","))
    return pids


@pytest.fixture
def stack(tmp_path, reaper):
    cfg = make_configs(tmp_path)
    out = tmp_path / "build"
    render(cfg, out)
    for sub in ("var/run", "var/log", "var/checkpoints"):
        (tmp_path / "root" / sub).mkdir(parents=True)
    conf = out / "supervisord.conf"
    subprocess.run([SUPERVISORD, "-c", str(conf)], check=True, timeout=30)
    pidfile = tmp_path / "root" / "var" / "run" / "supervisord.pid"
    pid = int(wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 10, what="supervisord pidfile"))
    reaper.track(pid)
    yield cfg, out, conf, pid


def test_start_status_update_stop(stack):
    cfg, out, conf, supervisord_pid = stack
    socket = Path(out.parent / "root" / "var" / "run" / "supervisor.sock")
    assert oct(socket.stat().st_mode & 0o777) == "0o700"

    pids = wait_until(lambda: (p := program_pids(conf)) and len(p) == 3 and p, 20, what="3 programs RUNNING")
    assert set(pids) == {"trainer", "dashboard", "watchdog"}
    # every program runs in the environment the renderer gave it
    env = psutil.Process(pids["dashboard"]).environ()
    assert env["KEEL_PROCESS"] == "dashboard" and env["CUDA_VISIBLE_DEVICES"] == ""

    # Only the dashboard's settings change: `update` restarts the dashboard and nothing else.
    render(cfg, out, "processes.dashboard.port=5010")
    done = ctl(conf, "update")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.split() == ["keel-dashboard:", "stopped", "keel-dashboard:", "updated", "process", "group"]
    after = wait_until(lambda: (p := program_pids(conf)) and len(p) == 3 and p, 20, what="3 programs RUNNING after update")
    assert after["trainer"] == pids["trainer"]
    assert after["watchdog"] == pids["watchdog"]
    assert after["dashboard"] != pids["dashboard"]

    assert ctl(conf, "stop", "all").returncode == 0
    wait_until(lambda: not any(is_alive(p) for p in after.values()), 15, what="programs stopped")
    ctl(conf, "shutdown")
    wait_until(lambda: not is_alive(supervisord_pid), 15, what="supervisord gone")
    assert not socket.exists()


def test_include_mode_on_a_host_supervisord(tmp_path, reaper):
    """`bin/render-config <env> && supervisorctl start all` on a host whose supervisord reads conf.d."""
    host = tmp_path / "host"
    host_conf = write_host_supervisord_conf(host)
    conf_d, sock = host / "conf.d", host / "supervisor.sock"
    subprocess.run([SUPERVISORD, "-c", str(host_conf)], check=True, timeout=30)
    pid = int(wait_until(lambda: (host / "supervisord.pid").exists() and (host / "supervisord.pid").read_text().strip(), 10))
    reaper.track(pid)

    cfg = make_configs(tmp_path)
    with open(cfg / "test.yaml", "a") as extra:
        extra.write(f"supervisord:\n  mode: include\n  conf_dir: {conf_d}\n  socket: {sock}\n")
    env = {**__import__("os").environ, "KEEL_BUILD_ROOT": str(tmp_path / "build")}
    done = subprocess.run([str(REPO_ROOT / "bin" / "render-config"), "test", "--config-dir", str(cfg)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert (conf_d / "keel.conf").exists()
    assert "reread and updated" in done.stdout  # render-config told the host supervisord
    assert ctl(host_conf, "start", "all").returncode in (0, 1)
    pids = wait_until(lambda: (p := program_pids(host_conf)) and len(p) == 3 and p, 20, what="3 programs RUNNING")
    assert set(pids) == {"trainer", "dashboard", "watchdog"}

    # a change to one process re-renders, and render-config's update restarts only that one
    done = subprocess.run([str(REPO_ROOT / "bin" / "render-config"), "test", "--config-dir", str(cfg),
                           "--set", "processes.watchdog.poll_interval=3s"], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    after = wait_until(lambda: (p := program_pids(host_conf)) and len(p) == 3 and p, 20, what="3 programs RUNNING")
    assert after["trainer"] == pids["trainer"] and after["dashboard"] == pids["dashboard"]
    assert after["watchdog"] != pids["watchdog"]
    ctl(host_conf, "shutdown")
    wait_until(lambda: not is_alive(pid), 20, what="host supervisord gone")
    for program_pid in after.values():
        wait_until(lambda: not is_alive(program_pid), 10, what=f"program {program_pid} gone")
