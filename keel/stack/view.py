"""One consistent picture of a running stack, for `bin/status`, `bin/launch up` and `bin/doctor`.

It joins the three sources of truth: what the backend says (supervisord/systemd
state and pid), what each process says about itself (its status file), and what
the OS says (psutil), and judges each process with the watchdog's own rules
(keel.watch.health), so `bin/status` and the watchdog never disagree about health.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from keel.watch import health
from keel.control.backends import ControlBackend, ControlError, ProcessInfo
from keel.status.models import ProcessStatus
from keel.host.resources import ResourceSample, ResourceSampler
from keel.status.files import ReadError, StatusReader


class StackFileError(ValueError):
    """keel.json is missing or unreadable: the environment was never rendered."""


def load_stack(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StackFileError(f"{path}: not rendered yet (run bin/render-config)") from None
    except (OSError, ValueError) as exc:
        raise StackFileError(f"{path}: unreadable: {exc}") from None


@dataclass
class ProcessView:
    """Everything `bin/status` shows for one process."""

    name: str
    kind: str
    state: str  # the backend's word: RUNNING, STARTING, BACKOFF, STOPPED, FATAL, EXITED, UNKNOWN
    health: str  # ok | starting | degraded | unhealthy | stopped
    reason: str
    pid: int | None
    uptime_s: float | None
    restarts: int
    step: int | None = None
    loss: float | None = None
    heartbeat_age_s: float | None = None
    progress_age_s: float | None = None
    gpus: list[int] = field(default_factory=list)
    status_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _watchdog_restarts(run_dir: Path) -> dict[str, int]:
    try:
        data = json.loads((run_dir / "watchdog.state.json").read_text(encoding="utf-8"))
        return {name: int(p.get("budget", {}).get("restarts_total", 0)) for name, p in data.get("processes", {}).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def _payload_value(status: ProcessStatus, key: str) -> Any:
    payload = status.payload
    if payload is None:
        return None
    return payload.get(key) if isinstance(payload, dict) else getattr(payload, key, None)


def collect(
    stack: dict[str, Any],
    backend: ControlBackend,
    *,
    reader: StatusReader | None = None,
    sampler: ResourceSampler | None = None,
    now_mono: float | None = None,
) -> list[ProcessView]:
    """Judge every process of the stack now. Never raises on a process's own problems."""
    run_dir = Path(stack["paths"]["run_dir"])
    reader = reader or StatusReader(run_dir)
    sampler = sampler or ResourceSampler()
    now_mono = time.monotonic() if now_mono is None else now_mono
    now_wall = time.time()
    try:
        infos: dict[str, ProcessInfo] = backend.status()
        backend_error = None
    except ControlError as exc:
        infos, backend_error = {}, str(exc)
    restarts = _watchdog_restarts(run_dir)

    statuses: dict[str, dict[str, ProcessStatus | ReadError]] = {}
    pids: set[int] = set()
    for name, proc in stack["processes"].items():
        statuses[name] = {s: reader.read(s) for s in proc["status_names"]}
        pids.update(s.pid for s in statuses[name].values() if isinstance(s, ProcessStatus))
        info = infos.get(name)
        if info is not None and info.pid:
            pids.add(info.pid)
    sample: ResourceSample = sampler.sample(sorted(pids))

    views = []
    for name, proc in stack["processes"].items():
        info = infos.get(name)
        state = info.state if info is not None else ("UNKNOWN" if backend_error else "ABSENT")
        pid = info.pid if info is not None and info.pid else None
        uptime = now_wall - info.started if info is not None and info.started and state == "RUNNING" else None
        running_since = now_mono - uptime if uptime is not None else None
        view = ProcessView(
            name=name, kind=proc["kind"], state=state, health="unknown", reason="", pid=pid,
            uptime_s=round(uptime, 1) if uptime is not None else None, restarts=restarts.get(name, 0),
        )
        if state in ("STOPPED", "EXITED", "ABSENT") or (state == "UNKNOWN" and backend_error):
            view.health = "stopped" if state != "UNKNOWN" else "unknown"
            view.reason = backend_error or f"{state.lower()} by the backend"
            views.append(view)
            continue
        ctx = health.Context(backend_state=state, backend_pid=pid, running_since=running_since)
        verdicts = []
        for status_name, status in statuses[name].items():
            verdicts.append(health.worst(health.evaluate(status, sample, proc, now_mono, ctx)))
            if isinstance(status, ProcessStatus):
                view.heartbeat_age_s = round(status.heartbeat_age(now_mono), 1)
                age = status.progress_age(now_mono)
                view.progress_age_s = round(age, 1) if age is not None else None
                view.gpus = list(status.gpus)
                if status_name == proc["status_names"][0]:
                    view.step = _payload_value(status, "step")
                    view.loss = _payload_value(status, "loss")
            else:
                view.status_error = f"{type(status).__name__.lower()}: {status.detail}"
        worst = health.worst(verdicts)
        view.health, view.reason = worst.level.value, worst.reason
        views.append(view)
    return views


def all_healthy(views: list[ProcessView]) -> bool:
    return bool(views) and all(v.health == "ok" for v in views)
