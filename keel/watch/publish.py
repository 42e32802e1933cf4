"""What the watchdog tells others after a poll: its status payload's verdicts and the keel.prom rows.

Both come from the same ``Watched`` records and the same ``health_word``, so
``bin/status`` and the page (which read the status payload) and Prometheus
(which reads keel.prom) show one verdict and one restart count per process.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from keel.host.sampling import ResourceSample
from keel.status.models import ProcessStatus, WatchedProcess
from keel.watch.prom import GpuRow, ProcessRow, RankRow, write_textfile
from keel.watch.state import Watched
from keel.watch.verdicts import health_word

__all__ = ["process_entry", "prom_rows", "write_prom_file"]

log = logging.getLogger("keel.watchdog")


def process_entry(w: Watched) -> WatchedProcess:
    """One process's published verdict, restart count and last action (before its first poll: starting)."""
    if w.verdict is None:
        health, rule, reason = ("failed" if w.budget.gave_up else "starting"), "not_polled", "not judged yet"
    else:
        health, rule, reason = health_word(w.verdict, w.budget.gave_up), w.verdict.rule, w.verdict.reason
    last = w.last_action
    return WatchedProcess(
        health=health, rule=rule, reason=reason, pid=w.pid, restarts_total=w.budget.restarts_total,
        last_action=last.action if last else None, last_action_reason=last.reason if last else None,
        last_action_at=datetime.fromtimestamp(last.wall, timezone.utc) if last else None,
        end=w.end.reason if w.end else None, end_reason=w.end.summary if w.end else None,
    )


def prom_rows(watched: dict[str, Watched], sample: ResourceSample | None, now: float) -> list[ProcessRow]:
    """One metrics row per watched process, from the last poll; in it one rank row per readable status file."""
    rows = []
    for name, w in watched.items():
        entry = process_entry(w)
        tree = sample.processes.get(w.pid) if sample and w.pid else None
        statuses = [s for s in w.statuses if isinstance(s, ProcessStatus)]
        rows.append(ProcessRow(
            process=name,
            kind=w.config.kind,
            up=bool(tree and tree.alive),
            health=entry.health,
            rule=entry.rule,
            restarts_total=entry.restarts_total,
            rss_bytes=tree.rss_bytes if tree else None,
            cpu_percent=tree.cpu_percent if tree else None,
            gpu_memory_bytes=tree.gpu_memory_bytes if tree else None,
            ranks=tuple(_rank_row(s, now) for s in statuses) or (RankRow(),),
            last_exit=entry.end,
        ))
    return rows


def _rank_row(status: ProcessStatus, now: float) -> RankRow:
    """One status file's series; ``rank`` (a label) only for a distributed trainer (world size > 1)."""
    payload = status.payload
    get = (payload.get if isinstance(payload, dict) else (lambda k: getattr(payload, k, None)))
    world = _num(get("world_size")) if payload is not None else None
    rank = _num(get("rank")) if payload is not None else None
    return RankRow(
        rank=str(int(rank)) if world is not None and world > 1 and rank is not None else "",
        state=status.state.value,
        heartbeat_age=status.heartbeat_age(now),
        progress_age=status.progress_age(now),
        step=_num(get("step")) if payload is not None else None,
        loss=_num(get("loss")) if payload is not None else None,
    )


def write_prom_file(path: Path, rows: list[ProcessRow], sample: ResourceSample | None, wall: float) -> None:
    """Replace keel.prom; a failure is logged (the next poll retries), never raised."""
    gpus = [GpuRow(g.index, g.name, g.memory_used, g.memory_total, g.util_percent, g.temperature_c)
            for g in (sample.gpus if sample else [])]
    try:
        write_textfile(path, rows, gpus, last_poll=wall, gpu_metrics=bool(sample and sample.gpu_error is None))
    except OSError as exc:
        log.error("cannot write %s", path, extra={"event": "prom_write_failed", "error": str(exc)})


def _num(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        return {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}.get(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
