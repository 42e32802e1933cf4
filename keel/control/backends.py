"""Control of a stack's processes: one interface, three backends.

- ``SupervisordBackend``: supervisord's XML-RPC over its unix socket, through
  supervisor's own ``SupervisorTransport`` (with a socket timeout added, so a
  wedged supervisord cannot hang the caller).
- ``SystemdBackend``: ``systemctl`` on units named ``<project>-<process>.service``.
- ``FakeBackend``: in memory, for unit tests (records calls, injects failures).

Processes are named by their keel name (``trainer``), never by the backend's
name (``keel:trainer``, ``keel-trainer.service``); a backend only knows the
processes it was given, so nothing outside the project can be touched through it.

States use supervisord's vocabulary for both backends: STOPPED, STARTING,
RUNNING, BACKOFF, STOPPING, EXITED, FATAL, UNKNOWN.

Errors are typed (``ControlError`` and subclasses). Transient ones
(``BackendUnavailable``: socket refused, timeout, systemctl missing) are retried
with exponential backoff by ``retrying``; the caller still has to catch
``ControlError``: the watchdog logs it as an event and carries on.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal as _signal
import socket
import subprocess
import time
import xmlrpc.client
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol, TypeVar

__all__ = [
    "BackendUnavailable",
    "ControlBackend",
    "ControlError",
    "FakeBackend",
    "NoSuchProcess",
    "NotRunning",
    "ProcessInfo",
    "SupervisordBackend",
    "SystemdBackend",
    "backend_for",
    "retrying",
]

T = TypeVar("T")

# States in which the backend itself is (re)starting the process: the watchdog must not fight it.
TRANSITIONAL_STATES = frozenset({"STARTING", "BACKOFF", "STOPPING"})


class ControlError(RuntimeError):
    """A control operation failed. ``process`` may be None for whole-backend failures."""

    def __init__(self, message: str, *, process: str | None = None, backend: str = "") -> None:
        super().__init__(message)
        self.process = process
        self.backend = backend


class NotRunning(ControlError):
    """The process is not running (stop or signal of a stopped process)."""


class NoSuchProcess(ControlError):
    """The backend does not know this process (not in keel.json, or not loaded by supervisord/systemd)."""


class BackendUnavailable(ControlError):
    """The backend cannot be reached (supervisord down, socket timeout, no systemctl). Worth retrying."""


@dataclass
class ProcessInfo:
    name: str
    state: str
    pid: int | None
    started: float | None  # wall-clock epoch seconds, as the backend reports it
    exit_status: int | None
    description: str


class ControlBackend(Protocol):
    """What the watchdog and the tools use to act on processes."""

    def status(self) -> dict[str, ProcessInfo]: ...
    def start(self, name: str) -> None: ...
    def stop(self, name: str) -> None: ...
    def restart(self, name: str) -> None: ...
    def signal(self, name: str, sig: int) -> None: ...


def retrying(
    op: Callable[[], T],
    *,
    attempts: int = 3,
    initial: float = 0.2,
    factor: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run ``op``, retrying BackendUnavailable with exponential backoff; other errors pass straight through."""
    delay = initial
    for attempt in range(1, attempts + 1):
        try:
            return op()
        except BackendUnavailable:
            if attempt == attempts:
                raise
            sleep(delay)
            delay *= factor
    raise AssertionError("unreachable")  # pragma: no cover


def _signal_name(sig: int) -> str:
    return _signal.Signals(sig).name.removeprefix("SIG")


# --------------------------------------------------------------------------- supervisord


class _TimeoutUnixConnection(http.client.HTTPConnection):
    """supervisor's UnixStreamHTTPConnection ignores timeouts; this one does not."""

    def __init__(self, socketfile: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socketfile = socketfile

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socketfile)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _transport(socket_path: str, timeout: float) -> xmlrpc.client.Transport:
    # Imported here so that importing keel.control.backends stays cheap for tools that never talk to supervisord.
    from supervisor.xmlrpc import SupervisorTransport

    transport = SupervisorTransport(None, None, f"unix://{socket_path}")
    transport._get_connection = lambda: _TimeoutUnixConnection(socket_path, timeout)  # type: ignore[attr-defined]
    return transport


# supervisor.xmlrpc.Faults codes, copied so the mapping reads without the import.
_BAD_NAME, _NO_FILE, _NOT_EXECUTABLE, _ALREADY_STARTED, _NOT_RUNNING = 10, 20, 21, 60, 70


class SupervisordBackend:
    """supervisord over XML-RPC on its unix socket. ``programs`` maps keel names to ``group:name``."""

    kind = "supervisord"

    def __init__(self, socket_path: str, programs: Mapping[str, str], *, timeout: float = 10.0,
                 stop_wait: bool = True) -> None:
        self.socket_path = socket_path
        self.programs = dict(programs)
        self.timeout = timeout
        self.stop_wait = stop_wait
        self._by_program = {v: k for k, v in self.programs.items()}

    def _call(self, method: str, *args: Any, process: str | None = None) -> Any:
        transport = _transport(self.socket_path, self.timeout)
        proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
        try:
            return getattr(proxy.supervisor, method)(*args)
        except xmlrpc.client.Fault as fault:
            raise self._fault_error(fault, method, process) from fault
        except (OSError, http.client.HTTPException, xmlrpc.client.ProtocolError) as exc:
            raise BackendUnavailable(
                f"supervisord at {self.socket_path} unreachable during {method}: {exc}",
                process=process, backend=self.kind,
            ) from exc
        finally:
            transport.close()

    def _fault_error(self, fault: xmlrpc.client.Fault, method: str, process: str | None) -> ControlError:
        msg = f"supervisord {method}({process or ''}): {fault.faultString}"
        if fault.faultCode == _BAD_NAME:
            return NoSuchProcess(msg, process=process, backend=self.kind)
        if fault.faultCode == _NOT_RUNNING:
            return NotRunning(msg, process=process, backend=self.kind)
        return ControlError(msg, process=process, backend=self.kind)

    def _program(self, name: str) -> str:
        try:
            return self.programs[name]
        except KeyError:
            raise NoSuchProcess(f"{name!r} is not a process of this stack", process=name, backend=self.kind) from None

    def status(self) -> dict[str, ProcessInfo]:
        """Every process of this stack that supervisord knows, by keel name."""
        out: dict[str, ProcessInfo] = {}
        for info in self._call("getAllProcessInfo"):
            spec = f"{info['group']}:{info['name']}"
            name = self._by_program.get(spec) or self._by_program.get(info["name"])
            if name is None:
                continue  # another project's program: not ours to report or touch
            out[name] = ProcessInfo(
                name=name,
                state=info["statename"],
                pid=info["pid"] or None,
                started=float(info["start"]) if info["start"] else None,
                exit_status=info.get("exitstatus"),
                description=info.get("description", ""),
            )
        return out

    def start(self, name: str) -> None:
        # wait=False: supervisord would otherwise block this call for startsecs.
        try:
            self._call("startProcess", self._program(name), False, process=name)
        except ControlError as exc:
            if isinstance(exc.__cause__, xmlrpc.client.Fault) and exc.__cause__.faultCode == _ALREADY_STARTED:
                return
            raise

    def stop(self, name: str) -> None:
        """Stop and wait (supervisord escalates to SIGKILL after stopwaitsecs). Stopping a stopped process is fine.

        supervisord's own ``wait=True`` answers only on its next loop tick (up to 1 s
        late); asking without waiting and polling the state is faster.
        """
        program = self._program(name)
        try:
            self._call("stopProcess", program, False, process=name)
        except NotRunning:
            return
        if not self.stop_wait:
            return
        deadline = time.monotonic() + self.timeout
        while True:
            state = self._call("getProcessInfo", program, process=name)["statename"]
            if state not in ("STOPPING", "RUNNING", "STARTING"):
                return
            if time.monotonic() >= deadline:
                raise BackendUnavailable(f"{name} still {state} after {self.timeout:g}s", process=name,
                                         backend=self.kind)
            time.sleep(0.05)

    def restart(self, name: str) -> None:
        """Stop (waiting, up to the program's stopwaitsecs) then start."""
        self.stop(name)
        self.start(name)

    def signal(self, name: str, sig: int) -> None:
        self._call("signalProcess", self._program(name), _signal_name(sig), process=name)


# --------------------------------------------------------------------------- systemd

_SYSTEMD_STATES = {
    "active": "RUNNING",
    "reloading": "RUNNING",
    "activating": "STARTING",
    "deactivating": "STOPPING",
    "inactive": "STOPPED",
    "failed": "FATAL",
}


class SystemdBackend:
    """``systemctl`` on ``<project>-<process>.service`` units. ``units`` maps keel names to unit names."""

    kind = "systemd"

    def __init__(self, units: Mapping[str, str], *, systemctl: str = "systemctl", user: bool = False,
                 timeout: float = 30.0) -> None:
        self.units = dict(units)
        self.systemctl = systemctl
        self.user = user
        self.timeout = timeout

    def _run(self, args: list[str], process: str | None) -> str:
        exe = shutil.which(self.systemctl)
        if exe is None:
            raise BackendUnavailable(f"{self.systemctl} not found on PATH", process=process, backend=self.kind)
        cmd = [exe, "--no-pager", "--no-ask-password"] + (["--user"] if self.user else []) + args
        try:
            # Its own session, so a timeout kills whatever it started too (a hung polkit agent, a stub's sleep).
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True)
        except OSError as exc:
            raise BackendUnavailable(f"cannot run {exe}: {exc}", process=process, backend=self.kind) from exc
        try:
            stdout, stderr = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired as exc:
            try:
                os.killpg(proc.pid, _signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.communicate()
            raise BackendUnavailable(f"{' '.join(args)} timed out after {self.timeout:g}s",
                                     process=process, backend=self.kind) from exc
        if proc.returncode != 0:
            err = (stderr or stdout).strip()
            msg = f"systemctl {' '.join(args)} failed ({proc.returncode}): {err}"
            low = err.lower()
            if "not found" in low or "not loaded" in low or proc.returncode == 5:
                raise NoSuchProcess(msg, process=process, backend=self.kind)
            if "no main pid" in low or "not active" in low or "not running" in low:
                raise NotRunning(msg, process=process, backend=self.kind)
            if "failed to connect to bus" in low or "system has not been booted with systemd" in low:
                raise BackendUnavailable(msg, process=process, backend=self.kind)
            raise ControlError(msg, process=process, backend=self.kind)
        return stdout

    def _unit(self, name: str) -> str:
        try:
            return self.units[name]
        except KeyError:
            raise NoSuchProcess(f"{name!r} is not a process of this stack", process=name, backend=self.kind) from None

    def status(self) -> dict[str, ProcessInfo]:
        """One ``systemctl show`` for all units; states mapped to supervisord's names."""
        if not self.units:
            return {}
        props = "Id,ActiveState,SubState,MainPID,ExecMainStartTimestamp,ExecMainStatus,Description"
        out = self._run(["show", f"--property={props}", *self.units.values()], None)
        by_unit = {v: k for k, v in self.units.items()}
        result: dict[str, ProcessInfo] = {}
        for block in _show_blocks(out):
            name = by_unit.get(block.get("Id", ""))
            if name is None:
                continue
            active, sub = block.get("ActiveState", ""), block.get("SubState", "")
            state = "BACKOFF" if sub == "auto-restart" else _SYSTEMD_STATES.get(active, "UNKNOWN")
            pid = int(block.get("MainPID") or 0) or None
            status = block.get("ExecMainStatus")
            result[name] = ProcessInfo(
                name=name,
                state=state,
                pid=pid,
                started=None,  # ExecMainStartTimestamp is local-time text; pid start times come from psutil
                exit_status=int(status) if status and status.isdigit() else None,
                description=f"{active}/{sub} {block.get('Description', '')}".strip(),
            )
        return result

    def start(self, name: str) -> None:
        self._run(["start", "--no-block", self._unit(name)], name)

    def stop(self, name: str) -> None:
        self._run(["stop", self._unit(name)], name)

    def restart(self, name: str) -> None:
        # reset-failed first: a unit past StartLimitBurst refuses to start otherwise.
        self._run(["reset-failed", self._unit(name)], name)
        self._run(["restart", "--no-block", self._unit(name)], name)

    def signal(self, name: str, sig: int) -> None:
        self._run(["kill", "--kill-whom=main", f"--signal={int(sig)}", self._unit(name)], name)


def _show_blocks(text: str) -> Iterable[dict[str, str]]:
    """``systemctl show`` prints one key=value block per unit, separated by blank lines."""
    block: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if block:
                yield block
                block = {}
            continue
        key, _, value = line.partition("=")
        block[key] = value
    if block:
        yield block


# --------------------------------------------------------------------------- fake


@dataclass
class FakeBackend:
    """In-memory backend for unit tests: records every call, can fail chosen operations.

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

    def status(self) -> dict[str, ProcessInfo]:
        self._op("status", "*")
        return {k: ProcessInfo(**vars(v)) for k, v in self.processes.items()}

    def start(self, name: str) -> None:
        info = self._op("start", name)
        assert info is not None
        info.state = "RUNNING"
        if self.on_start is not None:
            info.pid = self.on_start(name)

    def stop(self, name: str) -> None:
        info = self._op("stop", name)
        assert info is not None
        info.state, info.pid = "STOPPED", None

    def restart(self, name: str) -> None:
        info = self._op("restart", name)
        assert info is not None
        info.state = "RUNNING"
        if self.on_start is not None:
            info.pid = self.on_start(name)

    def signal(self, name: str, sig: int) -> None:
        info = self._op("signal", name, sig)
        assert info is not None
        if info.state != "RUNNING":
            raise NotRunning(f"{name} is not running", process=name, backend=self.kind)


# --------------------------------------------------------------------------- factory


def backend_for(stack: dict, *, timeout: float | None = None) -> ControlBackend:
    """The backend a rendered ``keel.json`` describes, limited to that stack's processes."""
    control = stack.get("control", {})
    kind = control.get("backend") or stack.get("backend")
    processes: dict[str, dict] = stack.get("processes", {})
    project = stack.get("project", "keel")
    # A stop waits for the slowest process's stop timeout (then SIGKILL); allow for it.
    longest_stop = max((float(p.get("stop", {}).get("timeout", 10.0)) for p in processes.values()), default=10.0)
    if kind == "supervisord":
        group = control.get("group") or project
        programs = {name: p.get("program") or f"{group}:{name}" for name, p in processes.items()}
        return SupervisordBackend(control["socket"], programs, timeout=timeout or longest_stop + 10.0)
    if kind == "systemd":
        units = {name: p.get("unit") or f"{project}-{name}.service" for name, p in processes.items()}
        return SystemdBackend(units, user=bool(control.get("user", False)), timeout=timeout or longest_stop + 10.0)
    raise ValueError(f"unknown control backend {kind!r} in keel.json (expected supervisord or systemd)")
