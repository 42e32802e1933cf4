"""Helpers for the watchdog and control tests: a real supervisord in a short temp dir. (No tests here.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import xmlrpc.client
from pathlib import Path

from tests.support import wait_until

SUPERVISORD = str(Path(sys.executable).parent / "supervisord")


def short_dir() -> Path:
    """A short path in /tmp: a unix socket path must fit in 108 bytes, pytest's tmp_path may not."""
    return Path(tempfile.mkdtemp(prefix="kw", dir="/tmp"))


def program_section(name: str, command: str, *, group_env: dict[str, str] | None = None, stopwaitsecs: float = 2,
                    startsecs: float = 0, startretries: int = 1, autorestart: str = "true",
                    log: Path | None = None, autostart: bool = True) -> str:
    env = ",".join(f'{k}="{v}"' for k, v in (group_env or {}).items())
    lines = [
        f"[program:{name}]",
        f"command={command}",
        f"autostart={'true' if autostart else 'false'}",
        f"autorestart={autorestart}",
        f"startsecs={startsecs:g}",
        f"startretries={startretries}",
        f"stopwaitsecs={stopwaitsecs:g}",
        "stopasgroup=true",
        "killasgroup=true",
        "redirect_stderr=true",
        f"stdout_logfile={log or 'NONE'}",
    ]
    if env:
        lines.append(f"environment={env}")
    return "\n".join(lines) + "\n"


def write_supervisord_conf(sock_dir: Path, programs: str, groups: dict[str, list[str]]) -> Path:
    """A complete standalone supervisord.conf (socket 0700) in ``sock_dir``."""
    conf = sock_dir / "supervisord.conf"
    text = f"""[unix_http_server]
file={sock_dir}/s.sock
chmod=0700

[supervisord]
logfile={sock_dir}/supervisord.log
pidfile={sock_dir}/supervisord.pid
nodaemon=true
loglevel=info

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{sock_dir}/s.sock

{programs}
"""
    for group, names in groups.items():
        text += f"\n[group:{group}]\nprograms={','.join(names)}\n"
    conf.write_text(text)
    return conf


def rpc(sock: Path) -> xmlrpc.client.ServerProxy:
    from supervisor.xmlrpc import SupervisorTransport

    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=SupervisorTransport(None, None, f"unix://{sock}"))


def start_supervisord(reaper, conf: Path, sock: Path, timeout: float = 15.0) -> subprocess.Popen:
    """Start supervisord in the foreground (tracked by the reaper) and wait until it answers."""
    proc = reaper.popen([SUPERVISORD, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def answers() -> bool:
        try:
            return rpc(sock).supervisor.getState()["statename"] == "RUNNING"
        except (OSError, xmlrpc.client.Error):
            return False

    wait_until(answers, timeout, interval=0.1, what="supervisord answering")
    return proc


def stop_supervisord(proc: subprocess.Popen, sock_dir: Path) -> None:
    """SIGTERM (supervisord stops its programs), wait, then remove the short dir."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    shutil.rmtree(sock_dir, ignore_errors=True)


def info(sock: Path, spec: str) -> dict:
    return rpc(sock).supervisor.getProcessInfo(spec)


def env_with_repo(repo_root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(repo_root)
    return env
