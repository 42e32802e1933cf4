"""systemd through ``systemctl`` on the stack's units (keel.json's ``unit`` per process, and the
stack's ``target`` that wants them all). States are mapped to supervisord's names."""

from __future__ import annotations

import os
import shutil
import signal as _signal
import subprocess
from typing import Iterable, Mapping

from keel.control.base import BackendExit, BackendUnavailable, ControlError, NoSuchProcess, NotRunning, ProcessInfo

__all__ = ["SystemdBackend"]

_SYSTEMD_STATES = {
    "active": "RUNNING",
    "reloading": "RUNNING",
    "activating": "STARTING",
    "deactivating": "STOPPING",
    "inactive": "STOPPED",
    "failed": "FATAL",
}


class SystemdBackend:
    """``units`` maps keel names to unit names; ``target`` is the stack's target (keel.json ``control.target``)."""

    kind = "systemd"

    def __init__(self, units: Mapping[str, str], *, target: str | None = None, systemctl: str = "systemctl",
                 timeout: float = 30.0) -> None:
        self.units = dict(units)
        self.target = target
        self.systemctl = systemctl
        self.timeout = timeout

    def _run(self, args: list[str], process: str | None) -> str:
        exe = shutil.which(self.systemctl)
        if exe is None:
            raise BackendUnavailable(f"{self.systemctl} not found on PATH", process=process, backend=self.kind)
        cmd = [exe, "--no-pager", "--no-ask-password", *args]
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

    def _target(self) -> str:
        if not self.target:
            raise ControlError("no systemd target for this stack (keel.json control.target)", backend=self.kind)
        return self.target

    def _show(self, units: Iterable[str], props: str) -> list[dict[str, str]]:
        return list(_show_blocks(self._run(["show", f"--property={props}", *units], None)))

    # -- one process -----------------------------------------------------------------------------

    def status(self) -> dict[str, ProcessInfo]:
        """One ``systemctl show`` for all units; states mapped to supervisord's names."""
        if not self.units:
            return {}
        props = "Id,ActiveState,SubState,MainPID,ExecMainStartTimestamp,ExecMainStatus,ExecMainCode,Description"
        by_unit = {v: k for k, v in self.units.items()}
        result: dict[str, ProcessInfo] = {}
        for block in self._show(self.units.values(), props):
            name = by_unit.get(block.get("Id", ""))
            if name is None:
                continue
            active, sub = block.get("ActiveState", ""), block.get("SubState", "")
            state = "BACKOFF" if sub == "auto-restart" else _SYSTEMD_STATES.get(active, "UNKNOWN")
            pid = int(block.get("MainPID") or 0) or None
            status = block.get("ExecMainStatus")
            killed = block.get("ExecMainCode") in ("2", "3") and bool(status) and status.isdigit()  # CLD_KILLED/DUMPED
            result[name] = ProcessInfo(
                name=name,
                state=state,
                pid=pid,
                started=None,  # ExecMainStartTimestamp is local-time text; pid start times come from psutil
                exit_status=int(status) if status and status.isdigit() and not killed else None,
                description=f"{active}/{sub} {block.get('Description', '')}".strip(),
                exit_signal=_signal_name(int(status)) if killed else None,
            )
        return result

    def start(self, name: str) -> None:
        self._run(["start", "--no-block", self._unit(name)], name)

    def stop(self, name: str, *, wait: bool = True) -> None:
        self._run(["stop", *(() if wait else ("--no-block",)), self._unit(name)], name)

    def restart(self, name: str) -> None:
        # reset-failed first: a unit past StartLimitBurst refuses to start otherwise.
        self._run(["reset-failed", self._unit(name)], name)
        self._run(["restart", "--no-block", self._unit(name)], name)

    def last_exit(self, name: str, pid: int | None) -> BackendExit | None:
        return None  # ExecMainCode/ExecMainStatus are in ProcessInfo already (exit_status, exit_signal)

    def signal(self, name: str, sig: int) -> None:
        self._run(["kill", "--kill-whom=main", f"--signal={int(sig)}", self._unit(name)], name)

    # -- the whole stack -------------------------------------------------------------------------

    def apply(self) -> list[str]:
        """Make installed unit files take effect: ``daemon-reload``, enable the target (so the stack
        comes back at boot), and restart the active units whose file changed, only those.

        Which changed is systemd's own answer: ``NeedDaemonReload=yes`` before the reload.
        """
        target = self._target()
        stale = [b["Id"] for b in self._show([*self.units.values(), target], "Id,NeedDaemonReload,ActiveState")
                 if b.get("NeedDaemonReload") == "yes" and b.get("ActiveState") in ("active", "activating")]
        self._run(["daemon-reload"], None)
        self._run(["enable", target], None)
        lines = []
        for unit in stale:
            self._run(["try-restart", unit], None)
            lines.append(f"{unit}: changed, restarted")
        return lines

    def start_all(self) -> list[str]:
        """Start the target (which wants every unit) and any unit that is not running; the names started."""
        before = self.status()
        self._run(["start", self._target()], None)
        started = [n for n, i in sorted(before.items()) if i.state in ("STOPPED", "FATAL")]
        for name in started:
            self._run(["reset-failed", self._unit(name)], name)
            self.start(name)
        return started

    def stop_all(self) -> None:
        """Stop the target; its units are PartOf it and stop with it, each within its TimeoutStopSec."""
        self._run(["stop", self._target()], None)

    def shutdown(self) -> None:
        """systemd is the host's: shutting the stack down is stopping it."""
        self.stop_all()


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


def _signal_name(number: int) -> str:
    """9 -> "SIGKILL" (ExecMainStatus holds the signal number when ExecMainCode says killed)."""
    try:
        return _signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
