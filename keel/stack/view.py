"""One consistent picture of a running stack, for `bin/status`, `bin/launch up` and `bin/doctor`.

It joins what the backend says (supervisord/systemd state and pid), what each
process says about itself (its status file) and what the OS says (psutil). Health
is the watchdog's: the verdict, restart count and last action it published in its
own status (keel.watch.verdicts). When the watchdog is not reporting, or for the
watchdog itself, each process is judged here with the same rules
(keel.watch.health) and ``judged_by`` says so; restarts are then unknown (None).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from keel.watch import health
from keel.watch.verdicts import ProcessHealth, health_for, judge, run_start, watchdog_report
from keel.control.base import ControlBackend, ControlError, ProcessInfo
from keel.render.contract import StackFile
from keel.status.models import ProcessStatus
from keel.host.sampling import ResourceSample, ResourceSampler
from keel.status.reader import StatusReader
from keel.status.results import ReadError


@dataclass
class ProcessView:
    """Everything `bin/status` shows for one process."""

    name: str
    kind: str
    state: str  # the backend's word: RUNNING, STARTING, BACKOFF, STOPPED, FATAL, EXITED, UNKNOWN
    health: str  # keel.watch.verdicts.HEALTH_WORDS, or "unknown" (backend unreachable, no watchdog report)
    reason: str
    pid: int | None
    uptime_s: float | None
    restarts: int | None  # the watchdog's restarts_total; None: the watchdog is not reporting
    judged_by: str = "watchdog"  # or "local: <why>"
    rule: str | None = None
    last_action: str | None = None
    last_action_reason: str | None = None
    last_action_at: str | None = None  # ISO 8601 UTC
    end: str | None = None  # how its last run ended (keel.watch.endings), as the watchdog published it
    end_reason: str | None = None
    step: int | None = None
    loss: float | None = None
    heartbeat_age_s: float | None = None
    progress_age_s: float | None = None
    gpus: list[int] = field(default_factory=list)
    status_error: str | None = None
    write_failures: int = 0  # failed status/metrics writes the process reports (summed over its status files)
    last_write_error: str | None = None
    ranks: list[dict[str, Any]] = field(default_factory=list)  # torchrun: one row per status file of this node (rank_row)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def take(self, h: ProcessHealth) -> None:
        self.health, self.reason, self.rule, self.judged_by = h.health, h.reason, h.rule, h.judged_by
        self.restarts = h.restarts_total
        self.last_action, self.last_action_reason = h.last_action, h.last_action_reason
        self.last_action_at = h.last_action_at.isoformat().replace("+00:00", "Z") if h.last_action_at else None
        self.end, self.end_reason = h.end, h.end_reason


def _payload_value(status: ProcessStatus, key: str) -> Any:
    payload = status.payload
    if payload is None:
        return None
    return payload.get(key) if isinstance(payload, dict) else getattr(payload, key, None)


def rank_row(status_name: str, status: ProcessStatus) -> dict[str, Any]:
    """One torchrun rank as bin/status shows it: its file, global rank and world, its own state and step."""
    keys = ("rank", "world_size", "step")
    return {"name": status_name, "state": status.state.value, **{k: _payload_value(status, k) for k in keys}}


def collect(
    stack: StackFile,
    backend: ControlBackend,
    *,
    reader: StatusReader | None = None,
    sampler: ResourceSampler | None = None,
    now_mono: float | None = None,
) -> list[ProcessView]:
    """Judge every process of the stack now. Never raises on a process's own problems."""
    run_dir = Path(stack.paths.run_dir)
    reader = reader or StatusReader(run_dir)
    sampler = sampler or ResourceSampler()
    now_mono = time.monotonic() if now_mono is None else now_mono
    now_wall = time.time()
    try:
        infos: dict[str, ProcessInfo] = backend.status()
        backend_error = None
    except ControlError as exc:
        infos, backend_error = {}, str(exc)

    statuses: dict[str, dict[str, ProcessStatus | ReadError]] = {}
    pids: set[int] = set()
    for name, proc in stack.processes.items():
        statuses[name] = {s: reader.read(s) for s in proc.status_names}
        pids.update(s.pid for s in statuses[name].values() if isinstance(s, ProcessStatus))
        info = infos.get(name)
        if info is not None and info.pid:
            pids.add(info.pid)
    sample: ResourceSample = sampler.sample(sorted(pids))
    wd_name = next((n for n, p in stack.processes.items() if p.kind == "watchdog"), None)
    report, why = watchdog_report(
        next(iter(statuses[wd_name].values()), None) if wd_name else None, sample,
        stack.processes[wd_name] if wd_name else None, now_mono,
    )

    views = []
    for name, proc in stack.processes.items():
        info = infos.get(name)
        state = info.state if info is not None else ("UNKNOWN" if backend_error else "ABSENT")
        pid = info.pid if info is not None and info.pid else None
        uptime = now_wall - info.started if info is not None and info.started and state == "RUNNING" else None
        running_since = now_mono - uptime if uptime is not None else None
        view = ProcessView(
            name=name, kind=proc.kind, state=state, health="unknown", reason="", pid=pid,
            uptime_s=round(uptime, 1) if uptime is not None else None, restarts=None,
        )
        for status_name, status in statuses[name].items():
            if isinstance(status, ProcessStatus):
                view.heartbeat_age_s = round(status.heartbeat_age(now_mono), 1)
                age = status.progress_age(now_mono)
                view.progress_age_s = round(age, 1) if age is not None else None
                view.gpus = list(status.gpus)
                view.write_failures += status.write_failures
                view.last_write_error = view.last_write_error or status.last_write_error
                if status_name != name:
                    view.ranks.append(rank_row(status_name, status))
                if status_name == proc.status_names[0]:
                    view.step = _payload_value(status, "step")
                    view.loss = _payload_value(status, "loss")
            else:
                view.status_error = f"{type(status).__name__.lower()}: {status.detail}"
        if state == "UNKNOWN" and backend_error:
            verdict = None
        elif state in ("STOPPED", "EXITED", "ABSENT"):
            verdict = health.HealthVerdict(health.Level.OK, f"{state.lower()} by the backend", "not_running")
        else:
            ctx = health.Context(backend_state=state, backend_pid=pid, running_since=running_since)
            verdict = judge(statuses[name].values(), sample, proc, now_mono, ctx)[0]
        watched = proc.kind != "watchdog"  # it cannot restart itself; the backend does
        if verdict is None and not (watched and report is not None and name in report.processes):
            view.health, view.reason, view.judged_by = "unknown", backend_error or "", f"local: {why}"
        else:
            placeholder = health.HealthVerdict(health.Level.OK, "", "unknown")  # not used: the report has it
            started = None
            if verdict is not None:
                # STARTING has a pid and a start time too: a run the backend just started is a new run.
                backend_started = (datetime.fromtimestamp(info.started, timezone.utc)
                                   if info is not None and info.started and info.pid else None)
                started = run_start(statuses[name].values(), backend_started)
            view.take(health_for(name, report, why, verdict or placeholder, watched=watched, run_started=started))
        views.append(view)
    return views


def all_healthy(views: list[ProcessView]) -> bool:
    return bool(views) and all(v.health == "ok" for v in views)
