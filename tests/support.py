"""Helpers shared by the test suites: waiting, free ports, reaping what a test started, and the
in-memory control backend (test-only: production code ships no fake)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import psutil

from keel.control.base import BackendExit, NoSuchProcess, NotRunning, ProcessInfo

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


def keel_config_pids(build_dir: Path) -> set[int]:
    """Every live, non-zombie process whose KEEL_CONFIG lies under ``build_dir`` (a stack's processes,
    their DataLoader workers and torchrun ranks: keel sets it for each)."""
    prefix = str(build_dir) + "/"
    found = set()
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("KEEL_CONFIG", "").startswith(prefix) and proc.status() != psutil.STATUS_ZOMBIE:
                found.add(proc.pid)
        except psutil.Error:
            pass
    return found


def require_binary(name: str, package: str) -> str:
    """The path of ``name``; missing, the test fails under CI (make deps installs ``package``), else skips."""
    import pytest
    import shutil

    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is missing (Debian package {package}; `make deps` installs it)")
        pytest.skip(f"{name} not installed")
    return path


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


@dataclass
class FakeBackend:
    """In-memory ControlBackend for unit tests: records every call, can fail chosen operations.

    ``failures[op]`` is a list of exceptions raised (and consumed) by the next calls of ``op``.
    ``on_start(name)`` may return a new pid for the process.
    """

    processes: dict[str, ProcessInfo] = field(default_factory=dict)
    calls: list[tuple[str, str, Any]] = field(default_factory=list)
    failures: dict[str, list[Exception]] = field(default_factory=dict)
    on_start: Callable[[str], int | None] | None = None
    kind: str = "fake"

    def add(self, name: str, state: str = "RUNNING", pid: int | None = None) -> None:
        self.processes[name] = ProcessInfo(name, state, pid, None, None, "")

    def _op(self, op: str, name: str, arg: Any = None) -> ProcessInfo | None:
        self.calls.append((op, name, arg))
        pending = self.failures.get(op)
        if pending:
            raise pending.pop(0)
        if name == "*":
            return None
        if name not in self.processes:
            raise NoSuchProcess(f"no such process {name!r}", process=name, backend=self.kind)
        return self.processes[name]

    def _run(self, info: ProcessInfo, name: str) -> None:
        info.state = "RUNNING"
        if self.on_start is not None:
            info.pid = self.on_start(name)

    def last_exit(self, name: str, pid: int | None) -> BackendExit | None:
        return None  # ProcessInfo's exit_status/exit_signal is all this backend knows

    def status(self) -> dict[str, ProcessInfo]:
        self._op("status", "*")
        return {k: ProcessInfo(**vars(v)) for k, v in self.processes.items()}

    def start(self, name: str) -> None:
        info = self._op("start", name)
        assert info is not None
        self._run(info, name)

    def stop(self, name: str, *, wait: bool = True) -> None:
        info = self._op("stop", name)
        assert info is not None
        info.state, info.pid = "STOPPED", None

    def restart(self, name: str) -> None:
        info = self._op("restart", name)
        assert info is not None
        self._run(info, name)

    def signal(self, name: str, sig: int) -> None:
        info = self._op("signal", name, sig)
        assert info is not None
        if info.state != "RUNNING":
            raise NotRunning(f"{name} is not running", process=name, backend=self.kind)

    def apply(self) -> list[str]:
        self._op("apply", "*")
        return []

    def start_all(self) -> list[str]:
        self._op("start_all", "*")
        started = [n for n, i in sorted(self.processes.items()) if i.state in ("STOPPED", "EXITED", "FATAL")]
        for name in started:
            self._run(self.processes[name], name)
        return started

    def stop_all(self) -> None:
        self._op("stop_all", "*")
        for info in self.processes.values():
            info.state, info.pid = "STOPPED", None

    def shutdown(self) -> None:
        self._op("shutdown", "*")
        self.stop_all()
