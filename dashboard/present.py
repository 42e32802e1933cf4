"""Pure presentation logic: statuses and samples in, table rows and labels out.

Nothing here touches files, sockets or Bokeh, so every case (each typed read
error, a stale heartbeat, a dead pid) is a plain unit test.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Mapping

from keel.status.models import ProcessStatus, State, TrainingStatus
from keel.status.files import ReadError, Stale

from dashboard.config import ProcessInfo

OK, WARN, BAD = 0, 1, 2
LEVEL_COLOR = {OK: "#1a7f37", WARN: "#b8860b", BAD: "#c62828"}
GREY = "#9e9e9e"
TEXT = "#212121"
DASH = "—"

# Used when keel.json does not say (no stack file): generous, so a slow
# heartbeat is not shown as a failure by guesswork.
DEFAULT_HEARTBEAT_TIMEOUT = 30.0

ROW_COLUMNS = (
    "name", "kind", "state", "pid", "uptime", "restarts", "health",
    "heartbeat", "progress", "note", "color", "health_color",
)


def fmt_age(seconds: float | None) -> str:
    """A short, human age: 0.4s, 12s, 3m, 2h01m, 3d04h.

    Whole minutes from one minute on: a table of old ages that changed every second would
    cost every browser session a message per refresh and tell no one anything more.
    """
    if seconds is None or isinstance(seconds, float) and math.isnan(seconds):
        return DASH
    s = max(0.0, seconds)
    if s < 10:
        return f"{s:.1f}s"
    if s < 60:
        return f"{s:.0f}s"
    m = int(s) // 60
    if m < 60:
        return f"{m}m"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def fmt_num(value: float | None, digits: int = 4) -> str:
    """A compact number, or a dash for None/NaN (never a blank cell)."""
    if value is None:
        return DASH
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{digits}g}"
    return str(value)


def error_label(err: ReadError) -> str:
    """missing / corrupt / too large / unknown version / unreadable / stale."""
    name = type(err).__name__
    return {"TooLarge": "too large", "UnknownVersion": "unknown version"}.get(name, name.lower())


@dataclass(frozen=True)
class Verdict:
    label: str
    level: int
    note: str = ""


@dataclass(frozen=True)
class PidCheck:
    """What the resource sampler saw of a pid (None: not sampled)."""

    alive: bool
    create_time: float | None


def judge(
    status: ProcessStatus,
    info: ProcessInfo | None,
    now_mono: float,
    now_wall: datetime,
    pid: PidCheck | None = None,
) -> Verdict:
    """A simple health verdict from ages, state and the process's timeouts in keel.json."""
    if status.state == State.FAILED:
        return Verdict("failed", BAD, status.last_error or "")
    if status.state == State.STOPPED:
        return Verdict("stopped", WARN, status.last_error or "")
    if pid is not None and status.state in (State.RUNNING, State.STARTING, State.STOPPING):
        if not pid.alive:
            return Verdict("dead", BAD, f"pid {status.pid} is gone")
        if pid.create_time is not None and abs(pid.create_time - status.pid_start_time) > 1.0:
            return Verdict("dead", BAD, f"pid {status.pid} was reused by another process")
    hb_timeout = (info.heartbeat_timeout if info else None) or DEFAULT_HEARTBEAT_TIMEOUT
    hb_age = status.heartbeat_age(now_mono)
    if hb_age > hb_timeout:
        return Verdict("stale", BAD, f"no heartbeat for {fmt_age(hb_age)} (> {fmt_age(hb_timeout)})")
    if status.kind == "trainer" and info is not None and info.progress_timeout:
        grace = info.startup_grace or 0.0
        uptime = (now_wall - status.started_at).total_seconds()
        p_age = status.progress_age(now_mono)
        if p_age is None:
            if uptime > grace + info.progress_timeout:
                return Verdict("no progress", BAD, f"no step since start {fmt_age(uptime)} ago")
        elif p_age > info.progress_timeout and status.state == State.RUNNING:
            return Verdict("hung", BAD, f"no progress for {fmt_age(p_age)} (> {fmt_age(info.progress_timeout)})")
    if status.state in (State.STARTING, State.STOPPING):
        return Verdict(status.state.value, WARN)
    return Verdict("ok", OK)


def row_names(processes: Iterable[ProcessInfo], found: Iterable[str]) -> list[tuple[str, ProcessInfo | None]]:
    """Rows in stack order, then any other status file in the run dir (sorted)."""
    rows: list[tuple[str, ProcessInfo | None]] = []
    known: set[str] = set()
    for p in processes:
        for sname in p.status_names:
            rows.append((sname, p))
            known.add(sname)
    rows.extend((n, None) for n in sorted(set(found) - known) if n)
    return rows


def process_rows(
    processes: Iterable[ProcessInfo],
    statuses: Mapping[str, ProcessStatus | ReadError],
    now_mono: float,
    now_wall: datetime,
    *,
    restarts: Mapping[str, int] | None = None,
    pids: Mapping[int, PidCheck] | None = None,
    host: str | None = None,
) -> tuple[dict[str, list], list[Verdict]]:
    """The process table as columns (for a ColumnDataSource) and one verdict per row."""
    cols: dict[str, list] = {c: [] for c in ROW_COLUMNS}
    verdicts: list[Verdict] = []
    restarts = restarts or {}
    for sname, info in row_names(processes, statuses):
        result = statuses.get(sname)
        kind = info.kind if info else DASH
        status: ProcessStatus | None = None
        if isinstance(result, ProcessStatus):
            status = result
        elif isinstance(result, Stale) and result.status is not None:
            status = result.status
        if status is None:
            err = result if isinstance(result, ReadError) else None
            # ReadError is falsy by design ("no status"), so compare with None
            label = error_label(err) if err is not None else "missing"
            detail = err.detail if err is not None else "no status file yet"
            v = Verdict(label, BAD if label != "missing" else WARN, detail)
            _add_row(cols, sname, kind, label, DASH, DASH, restarts.get(sname), v, DASH, DASH, detail, GREY)
            verdicts.append(v)
            continue
        kind = status.kind
        if host is not None and status.host != host:
            # CLOCK_MONOTONIC is per host: another host's ages mean nothing here
            v = Verdict("other host", WARN, f"written on {status.host}")
            hb = pa = DASH
        else:
            pcheck = (pids or {}).get(status.pid)
            v = judge(status, info, now_mono, now_wall, pcheck)
            hb = fmt_age(status.heartbeat_age(now_mono))
            pa = fmt_age(status.progress_age(now_mono))
        fresh = v.label not in ("stale", "dead", "other host")
        uptime = fmt_age((now_wall - status.started_at).total_seconds()) if status.state not in (
            State.STOPPED, State.FAILED) else DASH
        _add_row(
            cols, sname, kind, status.state.value, str(status.pid), uptime, restarts.get(sname), v, hb, pa,
            v.note or (status.last_error or ""), TEXT if fresh else GREY,
        )
        verdicts.append(v)
    return cols, verdicts


def _add_row(cols: dict[str, list], name: str, kind: str, state: str, pid: str, uptime: str,
             restarts: int | None, v: Verdict, hb: str, pa: str, note: str, color: str) -> None:
    cols["name"].append(name)
    cols["kind"].append(kind)
    cols["state"].append(state)
    cols["pid"].append(pid)
    cols["uptime"].append(uptime)
    cols["restarts"].append(DASH if restarts is None else str(restarts))
    cols["health"].append(v.label)
    cols["heartbeat"].append(hb)
    cols["progress"].append(pa)
    cols["note"].append(note[:300])
    cols["color"].append(color)
    cols["health_color"].append(LEVEL_COLOR[v.level] if color != GREY or v.level == BAD else GREY)


def overall(verdicts: Iterable[Verdict], collector_errors: Mapping[str, str]) -> Verdict:
    """One word for the header: ok, degraded or failing."""
    vs = list(verdicts)
    worst = max((v.level for v in vs), default=WARN)
    bad = [v.label for v in vs if v.level == BAD]
    if collector_errors and worst < WARN:
        worst = WARN
    if not vs:
        return Verdict("no processes", WARN, "no status files in the run dir")
    if worst == BAD:
        return Verdict("failing", BAD, ", ".join(sorted(set(bad))))
    if worst == WARN:
        return Verdict("degraded", WARN)
    return Verdict("ok", OK)


def training_summary(result: ProcessStatus | ReadError | None, now_mono: float, stale_after: float) -> str:
    """HTML for one trainer: step/epoch/ETA/loss; greyed with a badge when not current."""
    if result is None or isinstance(result, ReadError) and not isinstance(result, Stale):
        label = error_label(result) if result is not None else "missing"
        detail = result.detail if result is not None else "no status file"
        return badge(label, BAD if label != "missing" else WARN) + f" <span style='color:{GREY}'>{esc(detail)}</span>"
    status = result.status if isinstance(result, Stale) else result
    if status is None:
        return badge("stale", BAD)
    p = status.payload
    if not isinstance(p, TrainingStatus):
        return badge("no training payload", WARN)
    age = status.heartbeat_age(now_mono)
    current = age <= stale_after and status.state in (State.RUNNING, State.STARTING)
    total = f"/{p.total_steps}" if p.total_steps else ""
    parts = [
        f"step <b>{p.step}{total}</b>", f"epoch <b>{p.epoch}</b>",
        f"loss <b>{fmt_num(p.loss)}</b>", f"val loss <b>{fmt_num(p.val_loss)}</b>",
        f"lr <b>{fmt_num(p.lr, 3)}</b>", f"samples/s <b>{fmt_num(p.samples_per_s, 4)}</b>",
        f"ETA <b>{fmt_age(p.eta_s) if p.eta_s is not None else DASH}</b>", f"device {esc(p.device)}",
    ]
    body = " · ".join(parts)
    if current:
        return body
    why = f"as of {fmt_age(age)} ago" if status.state in (State.RUNNING, State.STARTING) else status.state.value
    return f"<span style='color:{GREY}'>{body}</span> " + badge(why, WARN if status.state == State.STOPPED else BAD)


def badge(text: str, level: int) -> str:
    """A small coloured label."""
    return (
        f"<span class='keel-badge' style='background:{LEVEL_COLOR[level]};color:white;"
        f"border-radius:4px;padding:1px 6px;font-size:90%'>{esc(text)}</span>"
    )


def esc(text: Any) -> str:
    """HTML-escape anything read from the run dir before it reaches a Div."""
    return html.escape(str(text), quote=True)


def event_line(rec: Mapping[str, Any]) -> str:
    """One watchdog event as a line of text (the record's shape is the watchdog's; be lenient)."""
    ts = str(rec.get("ts") or rec.get("time") or rec.get("wall") or "")
    what = rec.get("event") or rec.get("action") or rec.get("kind") or rec.get("type") or "event"
    proc = rec.get("process") or rec.get("name") or ""
    msg = rec.get("message") or rec.get("reason") or rec.get("detail") or ""
    level = rec.get("level") or ""
    parts = [p for p in (ts[11:19] if len(ts) >= 19 else ts, str(level), str(what), str(proc), str(msg)) if p]
    return " ".join(parts)[:400]


def is_restart(rec: Mapping[str, Any]) -> str | None:
    """The process a watchdog event restarted, if it is a restart."""
    what = str(rec.get("action") or rec.get("event") or rec.get("kind") or "")
    if "restart" in what.lower():
        proc = rec.get("process") or rec.get("name")
        return str(proc) if proc else None
    return None
