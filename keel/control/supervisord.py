"""supervisord over XML-RPC on its unix socket, through supervisor's own ``SupervisorTransport``
(with a socket timeout added, so a wedged supervisord cannot hang the caller).

Two modes, as keel.json's ``control.mode`` says: ``standalone`` (the stack's own supervisord,
whose whole config is ours: ``apply`` starts it when it is not running and ``shutdown`` stops
it) and ``include`` (the host's supervisord, shared with other projects: only our programs are
updated, and it is never shut down).
"""

from __future__ import annotations

import http.client
import re
import socket
import subprocess
import sys
import time
import xmlrpc.client
from pathlib import Path
from typing import Any, Mapping

from keel.control.base import (
    STARTABLE_STATES,
    BackendExit,
    BackendUnavailable,
    ControlError,
    NoSuchProcess,
    NotRunning,
    ProcessInfo,
    ShuttingDown,
    signal_name,
)

__all__ = ["SUPERVISORD", "SupervisordBackend"]

# The supervisord of the interpreter running keel (the venv's), not whichever is first on PATH.
SUPERVISORD = str(Path(sys.executable).parent / "supervisord")


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
    # Imported here so that importing keel.control stays cheap for tools that never talk to supervisord.
    from supervisor.xmlrpc import SupervisorTransport

    transport = SupervisorTransport(None, None, f"unix://{socket_path}")
    transport._get_connection = lambda: _TimeoutUnixConnection(socket_path, timeout)  # type: ignore[attr-defined]
    return transport


# supervisor.xmlrpc.Faults codes, copied so the mapping reads without the import.
_SHUTDOWN_STATE, _BAD_NAME, _ALREADY_STARTED, _NOT_RUNNING = 6, 10, 60, 70
_BUSY_STATES = frozenset({"STOPPING", "RUNNING", "STARTING", "BACKOFF"})


class SupervisordBackend:
    """``programs`` maps keel names to supervisord program names (keel.json's ``program``)."""

    kind = "supervisord"

    def __init__(self, socket_path: str, programs: Mapping[str, str], *, timeout: float = 10.0,
                 stop_wait: bool = True, mode: str = "standalone", config: str | None = None) -> None:
        if mode not in ("standalone", "include"):
            raise ValueError(f"supervisord mode {mode!r}: expected standalone or include")
        self.socket_path = socket_path
        self.programs = dict(programs)
        self.timeout = timeout
        self.stop_wait = stop_wait
        self.mode = mode
        self.config = config
        self._by_program = {v: k for k, v in self.programs.items()}

    # -- the RPC ---------------------------------------------------------------------------------

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
        if fault.faultCode == _SHUTDOWN_STATE:  # every call, until the processes it is stopping are gone
            return ShuttingDown(f"supervisord at {self.socket_path} is shutting down ({method})", process=process,
                                backend=self.kind)
        return ControlError(msg, process=process, backend=self.kind)

    def _program(self, name: str) -> str:
        try:
            return self.programs[name]
        except KeyError:
            raise NoSuchProcess(f"{name!r} is not a process of this stack", process=name, backend=self.kind) from None

    # -- one process -----------------------------------------------------------------------------

    def status(self) -> dict[str, ProcessInfo]:
        """Every process of this stack that supervisord knows, by keel name."""
        out: dict[str, ProcessInfo] = {}
        for info in self._call("getAllProcessInfo"):
            # keel renders no [group:] sections: each program is its own group of the same name.
            name = self._by_program.get(info["name"]) if info["group"] == info["name"] else None
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

    def stop(self, name: str, *, wait: bool = True) -> None:
        """Stop and wait (supervisord escalates to SIGKILL after stopwaitsecs). Stopping a stopped process is fine.

        supervisord's own ``wait=True`` answers only on its next loop tick (up to 1 s
        late); asking without waiting and polling the state is faster.
        """
        if self._request_stop(name) and self.stop_wait and wait:
            self._wait_stopped([name])

    def restart(self, name: str) -> None:
        """Stop (waiting, up to the program's stopwaitsecs) then start."""
        self.stop(name)
        self.start(name)

    def signal(self, name: str, sig: int) -> None:
        self._call("signalProcess", self._program(name), signal_name(sig), process=name)

    def last_exit(self, name: str, pid: int | None, size: int = 65536) -> BackendExit | None:
        """How ``name``'s run ``pid`` ended, from the end of supervisord's own log, or None.

        Its "exited: ... (terminated by SIGKILL)" lines say how a run ended, which getProcessInfo
        does not (exitstatus -1 for any signal)."""
        return parse_supervisord_exit(str(self._call("readLog", -size, 0)), self._program(name), pid)

    def _request_stop(self, name: str) -> bool:
        """Ask supervisord to stop ``name`` without waiting; False when it was not running."""
        try:
            self._call("stopProcess", self._program(name), False, process=name)
        except NotRunning:
            return False
        return True

    def _wait_stopped(self, names: list[str]) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            busy = {n: i.state for n, i in self.status().items() if n in names and i.state in _BUSY_STATES}
            if not busy:
                return
            if time.monotonic() >= deadline:
                still = ", ".join(f"{n} {s}" for n, s in sorted(busy.items()))
                raise BackendUnavailable(f"still {still} after {self.timeout:g}s", process=names[0] if len(names) == 1
                                         else None, backend=self.kind)
            time.sleep(0.05)

    # -- the whole stack -------------------------------------------------------------------------

    def running(self) -> bool:
        """Whether supervisord answers on the socket (one shutting down still does, until its processes are gone)."""
        return self._daemon_state() != "gone"

    def _daemon_state(self) -> str:
        """``running``, ``shutting down`` or ``gone``."""
        try:
            self._call("getState")
        except ShuttingDown:
            return "shutting down"
        except BackendUnavailable:
            return "gone"
        return "running"

    def _wait_answering(self, answering: bool, failure: str) -> None:
        """Until supervisord answers (``answering``) or no longer does; else BackendUnavailable(failure)."""
        deadline = time.monotonic() + self.timeout
        while self.running() != answering:
            if time.monotonic() >= deadline:
                raise BackendUnavailable(f"{failure} after {self.timeout:g}s", backend=self.kind)
            time.sleep(0.1)

    def _wait_gone(self, after: str) -> None:
        self._wait_answering(False, f"supervisord at {self.socket_path} still answers ({after})")

    def apply(self) -> list[str]:
        """Make the rendered config take effect: ``supervisorctl reread`` + ``update`` for our programs.

        Only programs whose section changed are restarted (each program's environment carries a
        digest of its resolved config). Standalone: a supervisord that is not running is started
        from ``config`` (it reads the new files as it starts). Include: the host's supervisord
        must be running (BackendUnavailable otherwise), and other projects' programs are left alone.
        """
        state = self._daemon_state()
        if state == "shutting down" and self.mode == "standalone":
            self._wait_gone("since its shutdown began")  # a `down` just before: start afresh once it is gone
            state = "gone"
        if state != "running":
            if self.mode == "include":
                raise BackendUnavailable(
                    f"the host supervisord ({self.socket_path}) is not running; start it (systemctl start supervisor)",
                    backend=self.kind)
            self._start_daemon()
            return [f"started supervisord ({self.config})"]
        added, changed, removed = self._call("reloadConfig")[0]
        if self.mode == "include":  # the host's other groups are not ours to add, restart or remove
            ours = set(self.programs.values())
            added, changed, removed = ([g for g in group if g in ours] for group in (added, changed, removed))
        lines = []
        for group in removed:
            self._call("stopProcessGroup", group, True)
            self._call("removeProcessGroup", group)
            lines.append(f"{group}: removed")
        for group in changed:
            self._call("stopProcessGroup", group, True)
            self._call("removeProcessGroup", group)
            self._call("addProcessGroup", group)
            lines.append(f"{group}: changed, restarted")
        for group in added:
            self._call("addProcessGroup", group)
            lines.append(f"{group}: added")
        return lines

    def _start_daemon(self) -> None:
        if not self.config:
            raise ControlError("no supervisord config to start from (keel.json control.config)", backend=self.kind)
        try:
            # supervisord daemonizes (nodaemon=false): this returns once it has forked.
            done = subprocess.run([SUPERVISORD, "-c", self.config], capture_output=True, text=True,
                                  timeout=self.timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ControlError(f"cannot start supervisord -c {self.config}: {exc}", backend=self.kind) from exc
        if done.returncode != 0:
            raise ControlError(f"supervisord -c {self.config} failed: {(done.stdout + done.stderr).strip()}",
                               backend=self.kind)
        self._wait_answering(True, f"supervisord started from {self.config} does not answer on {self.socket_path}")

    def start_all(self) -> list[str]:
        """Start every process of the stack that is stopped, exited or fatal; the names started.

        One that cannot be started is left to the health check (which says why); the others are
        still started, then the first failure is raised.
        """
        started, failures = [], []
        for name, info in sorted(self.status().items()):
            if info.state not in STARTABLE_STATES:
                continue
            try:
                self.start(name)
                started.append(name)
            except ControlError as exc:
                failures.append(exc)
        if failures:
            raise failures[0]
        return started

    def stop_all(self) -> None:
        """Ask every process to stop at once, then wait: each gets its own stop timeout in parallel."""
        for name in self.programs:
            self._request_stop_known(name)
        if self.stop_wait:
            # every program, not only those asked: also those another caller (the watchdog) is already
            # stopping; "stopped" means stopped. Nothing busy: one status call.
            self._wait_stopped(list(self.programs))

    def _request_stop_known(self, name: str) -> bool:
        try:
            return self._request_stop(name)
        except NoSuchProcess:  # in keel.json, not (yet) loaded by supervisord: nothing to stop
            return False

    def shutdown(self) -> None:
        """Stop the stack; standalone, also shut supervisord down and wait until it no longer answers."""
        try:
            self.stop_all()
            if self.mode == "include":
                return  # the host's supervisord serves others too
            self._call("shutdown")
        except ShuttingDown:
            pass  # another caller shut it down first: wait for it all the same
        except BackendUnavailable:
            return  # already gone
        self._wait_gone("since its shutdown")


_SPAWNED = re.compile(r"spawned: '(?P<prog>[^']+)' with pid (?P<pid>\d+)")
_ENDED = re.compile(r"(?P<word>exited|stopped): (?P<prog>\S+) \((?P<how>[^;)]*)")


def parse_supervisord_exit(log_text: str, program: str, pid: int | None) -> BackendExit | None:
    """How ``program``'s run ``pid`` ended, from supervisord's log, or None when not found.

    The run's line is the first "exited:"/"stopped:" line of the program after its
    "spawned: ... with pid N" line (pid None: the program's last such line); "stopped:" is
    supervisord's word for a run it stopped itself (``Subprocess.finish`` with ``killing`` set).
    """
    lines = log_text.splitlines()
    start = 0
    if pid is not None:
        spawned = [i for i, line in enumerate(lines)
                   if (m := _SPAWNED.search(line)) and m["prog"] == program and int(m["pid"]) == pid]
        if not spawned:
            return None
        start = spawned[-1] + 1
    found = [m for line in lines[start:] if (m := _ENDED.search(line)) and m["prog"] == program]
    if not found:
        return None
    line = found[0] if pid is not None else found[-1]
    how, stopped = line["how"], line["word"] == "stopped"
    if m := re.match(r"exit status (-?\d+)", how):
        return BackendExit(int(m.group(1)), None, stopped)
    if m := re.match(r"terminated by (SIG[A-Z0-9]+)", how):
        return BackendExit(None, m.group(1), stopped)
    return BackendExit(None, None, True) if stopped else None
