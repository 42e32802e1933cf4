"""Gathering what is known about a run's end, for ``keel.watch.endings.classify``.

Sources, each optional (a backend or host may not say):

- the backend: its state when the end was noticed, and the exit code or killing
  signal (supervisord: its own log's "exited: <program> (terminated by SIGKILL...)"
  line after the run's "spawned: ... with pid N", through ``ControlBackend.last_exit``;
  "stopped:" there is supervisord's own stop, an operator's, told even once the next run is up; systemd:
  ExecMainCode/ExecMainStatus in ``ProcessInfo.exit_signal``/``exit_status``);
- the process's own exit record (``keel.status.exits``), only when it names the pid;
- the last status of that pid (its ``last_error``);
- the OOM kill counter of the run's cgroup (v2 ``memory.events``, v1
  ``memory.oom_control``: ``oom_kill N``), read when the run was first seen and
  again at its end; and the run's last sampled RSS against ``limits.memory``.

``RunTrack`` is what the watchdog keeps per run for this (``track`` each poll: one
dict lookup, and two small file reads when a new pid appears).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from keel.control.base import BackendExit, ControlError, ProcessInfo
from keel.host.sampling import ResourceSample
from keel.status.exits import read_exit_record
from keel.status.models import ProcessStatus
from keel.watch.endings import EndEvidence

__all__ = ["RunTrack", "cgroup_of", "evidence", "oom_kill_count", "parse_oom_kill", "track"]

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass
class RunTrack:
    """Per watched process: the run being tracked, its cgroup's OOM count at its start, its last RSS."""

    pid: int | None = None
    cgroup: str | None = None  # the memory.events / memory.oom_control file of its cgroup
    oom_at_start: int | None = None
    rss_bytes: int | None = None


def cgroup_of(cgroup_text: str, root: Path = CGROUP_ROOT) -> str | None:
    """The OOM counter file for a /proc/<pid>/cgroup content: v2 memory.events, else v1 memory.oom_control."""
    v1 = None
    for line in cgroup_text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if hid == "0" and controllers == "":
            v2 = root / path.lstrip("/") / "memory.events"
            if v2.exists():
                return str(v2)
        elif "memory" in controllers.split(","):
            v1 = str(root / "memory" / path.lstrip("/") / "memory.oom_control")
    return v1 if v1 is not None and Path(v1).exists() else None


def parse_oom_kill(text: str) -> int | None:
    """``oom_kill N`` out of memory.events (v2) or memory.oom_control (v1)."""
    m = re.search(r"^oom_kill (\d+)$", text, re.M)
    return int(m.group(1)) if m else None


def oom_kill_count(path: str | None) -> int | None:
    if path is None:
        return None
    try:
        return parse_oom_kill(Path(path).read_text())
    except OSError:
        return None


def _cgroup_file(pid: int) -> str | None:
    try:
        return cgroup_of(Path(f"/proc/{pid}/cgroup").read_text())
    except OSError:
        return None


def track(t: RunTrack, pid: int | None, sample: ResourceSample | None) -> None:
    """Each poll, for the run the watchdog judges (``pid``): a new pid starts a new track."""
    if pid is None:
        return
    if pid != t.pid:
        t.pid, t.rss_bytes = pid, None
        t.cgroup = _cgroup_file(pid)
        t.oom_at_start = oom_kill_count(t.cgroup)
    tree = sample.processes.get(pid) if sample is not None else None
    if tree is not None and tree.alive:
        t.rss_bytes = tree.rss_bytes


def _backend_exit(backend: Any, name: str, info: ProcessInfo | None, pid: int | None) -> BackendExit:
    try:
        found = backend.last_exit(name, pid)  # the backend's own record of that run (supervisord: its log)
    except ControlError:
        found = None
    if found is not None:
        return found
    if info is None or info.state not in ("EXITED", "STOPPED", "FATAL"):
        return BackendExit(None, None)  # a restarting backend's exit status belongs to no run yet
    if info.exit_signal is not None:
        return BackendExit(None, info.exit_signal)
    code = info.exit_status
    return BackendExit(None, None) if code is None or code < 0 else BackendExit(code, None)


def evidence(
    *, name: str, pid: int | None, info: ProcessInfo | None, backend: Any, run_dir: Path,
    status_names: Iterable[str], statuses: Iterable[Any], run: RunTrack, memory_limit: int | None,
    watchdog_action: str | None = None, watchdog_rule: str | None = None, watchdog_reason: str | None = None,
) -> EndEvidence:
    """Everything known about the end of ``name``'s run ``pid`` (see the module docstring)."""
    record = None
    for status_name in status_names:
        record = read_exit_record(run_dir, status_name, pid)
        if record is not None:
            break
    said = BackendExit(None, None) if watchdog_action else _backend_exit(backend, name, info, pid)
    exit_code, sig = said.exit_code, said.signal
    if exit_code is None and sig is None and record is not None:
        exit_code = record.exit_code
    last_error = next((s.last_error for s in statuses if isinstance(s, ProcessStatus) and s.pid == pid), None)
    oom = None
    if run.pid == pid and run.oom_at_start is not None:
        now = oom_kill_count(run.cgroup)
        oom = None if now is None else max(0, now - run.oom_at_start)
    return EndEvidence(
        pid=pid, backend_state=info.state if info is not None else None, backend_stopped=said.stopped,
        exit_code=exit_code, signal=sig,
        step=record.step if record else None, exception=record.exception if record else None,
        traceback=record.traceback if record else None, stop_signal=record.stop_signal if record else None,
        has_record=record is not None, last_error=last_error, watchdog_action=watchdog_action,
        watchdog_rule=watchdog_rule, watchdog_reason=watchdog_reason, oom_kills=oom,
        rss_bytes=run.rss_bytes if run.pid == pid else None, memory_limit=memory_limit,
    )
