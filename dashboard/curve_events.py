"""Which events go on the training curves, and where (pure: no Bokeh, no I/O).

Two sources, both kept raw by the collector (``Collector.event_records``):
- the watchdog's records (watchdog.events.jsonl: ``ts`` ISO wall time, ``process``, ``action``,
  ``verdict``, ``rule``, ``reason``): its restarts, its give-up, and its warnings (a degraded or
  unhealthy verdict it observed, such as data_starved);
- the trainer's own event records in its metrics file (``{"event": name, "t": epoch s, "step"?}``,
  tagged ``stream`` by the collector): checkpoints saved, non-finite losses, corrupt checkpoints.
A watchdog record has a wall time and no step: it is placed at the step of the live line's point
nearest in wall time. A trainer record with a step is placed at that step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, NamedTuple

import numpy as np

from dashboard import curves

RESTARTS = {"restart", "start", "restart_failed", "start_failed"}
WARN_LEVELS = {"degraded", "unhealthy"}
# The trainer's records the curves draw themselves (dashboard.curves: a resume is a restart marker with
# what was lost, a new run starts the curves afresh): not markers of their own as well.
DRAWN_BY_CURVES = curves.BEGIN_EVENTS
# A record up to this long before the run's first row is still the run's (the watchdog's start of it
# comes before the trainer's first record: a restart back-off, the interpreter and model start-up).
LEAD_S = 120.0


class Marker(NamedTuple):
    """One marker: the step it sits at, its kind (restart, warning, gave_up, checkpoint, trainer) and text."""

    step: float
    kind: str
    what: str


def _wall_s(rec: Mapping[str, Any]) -> float:
    """A record's wall time in seconds since the epoch (NaN when it has none readable)."""
    t = rec.get("t")
    if isinstance(t, (int, float)):
        return float(t)
    ts = rec.get("ts")
    if isinstance(ts, str):
        try:
            return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return math.nan
    return math.nan


def classify(rec: Mapping[str, Any]) -> tuple[str, str] | None:
    """(kind, hover text) of a record worth a marker on the curves, or None."""
    if "stream" in rec:  # the trainer's own record, tagged by the collector (it may carry an "action" of its own)
        name = str(rec.get("event"))
        if name in DRAWN_BY_CURVES and not rec.get("previous_run_id"):
            return None  # (a new run that set another run's checkpoints aside is a marker: the curves restart, why)
        kind = "checkpoint" if name.startswith("checkpoint") and "corrupt" not in name else "trainer"
        extra = ", ".join(f"{k}={v}" for k, v in rec.items() if k not in ("event", "t", "stream", "step"))
        return kind, f"trainer: {name}" + (f" ({extra})" if extra else "")
    action = str(rec.get("action") or "")
    reason = str(rec.get("reason") or "")
    rule = f" [{rec['rule']}]" if rec.get("rule") else ""
    if action in RESTARTS:
        return "restart", f"watchdog {action}{rule}: {reason}"
    if action == "gave_up":
        return "gave_up", f"watchdog gave up{rule}: {reason}"
    if action == "observed" and str(rec.get("verdict") or "") in WARN_LEVELS:
        return "warning", f"watchdog: {rec.get('verdict')}{rule}: {reason}"
    return None


def nearest_step(t_s: float, step: np.ndarray, t: np.ndarray) -> float:
    """The step of the point nearest in wall time to ``t_s`` (NaN when nothing has a wall time)."""
    ok = np.isfinite(t) & np.isfinite(step)
    if not math.isfinite(t_s) or not ok.any():
        return math.nan
    s, tt = step[ok], t[ok]
    return float(s[int(np.argmin(np.abs(tt - t_s)))])


def markers(records: Iterable[Mapping[str, Any]], stream: str, step: np.ndarray, t: np.ndarray,
            processes: Iterable[str] = (), since: float | None = None) -> list[Marker]:
    """The markers of one stream's curves. ``step``/``t`` are its live line's points (t in epoch
    seconds). A watchdog record counts when its process is the stream or one of ``processes`` (the
    programs that write this stream); a trainer record when it was tagged with this stream. ``since``:
    the drawn run's first wall time; a record from more than LEAD_S before it is an earlier run's."""
    mine = {stream, *processes}
    first = since - LEAD_S if since is not None else -math.inf
    out: list[Marker] = []
    for rec in records:
        trainer = "stream" in rec
        if (rec.get("stream") != stream) if trainer else (rec.get("process") not in mine):
            continue
        if _wall_s(rec) < first:
            continue
        got = classify(rec)
        if got is None:
            continue
        at = rec.get("step") if trainer else None
        x = float(at) if isinstance(at, (int, float)) else nearest_step(_wall_s(rec), step, t)
        if math.isfinite(x):
            out.append(Marker(x, *got))
    return out
