"""Helpers shared by the test suites: waiting, free ports, and reaping what a test started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, TypeVar

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.05, what: str = "") -> T:
    """Poll `predicate` until it returns a truthy value; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_alive(pid: int) -> bool:
    """True for a running process; a zombie counts as gone (zombies are reaped slowly here)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> list[int]:
    """Signal a process and all its descendants; returns every pid signalled."""
    try:
        root = psutil.Process(pid)
        family = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return []
    for proc in family:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    return [p.pid for p in family]


class ProcessReaper:
    """Tracks pids a test started; kills them (and their children) at teardown and checks they are gone."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    def track(self, proc_or_pid: subprocess.Popen | int) -> None:
        pid = proc_or_pid if isinstance(proc_or_pid, int) else proc_or_pid.pid
        self.pids.append(pid)

    def popen(self, args: list[str], **kwargs) -> subprocess.Popen:
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(args, **kwargs)
        self.track(proc)
        return proc

    def reap(self, timeout: float = 10.0) -> None:
        signalled: set[int] = set()
        for pid in self.pids:
            signalled.update(kill_tree(pid))
        for pid in self.pids:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        wait_until(lambda: not any(is_alive(p) for p in signalled), timeout, what=f"reaped {sorted(signalled)}")


def write_host_supervisord_conf(directory: Path) -> Path:
    """A "system" supervisord.conf in ``directory`` that includes ``directory/conf.d/*.conf``, as a
    host's own supervisord does (include mode). Its socket is ``directory/supervisor.sock``; its
    pidfile and log are in ``directory``. Returns the conf's path; ``conf.d`` exists afterwards."""
    conf_d = directory / "conf.d"
    conf_d.mkdir(parents=True, exist_ok=True)
    conf = directory / "supervisord.conf"
    conf.write_text(
        f"[unix_http_server]\nfile={directory / 'supervisor.sock'}\nchmod=0700\n\n"
        f"[supervisord]\nlogfile={directory}/supervisord.log\npidfile={directory}/supervisord.pid\n\n"
        "[rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n"
        f"[supervisorctl]\nserverurl=unix://{directory / 'supervisor.sock'}\n\n"
        f"[include]\nfiles = {conf_d}/*.conf\n"
    )
    return conf
