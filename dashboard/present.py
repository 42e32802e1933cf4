"""Pure presentation logic: statuses and verdicts in, table rows, labels and colours out.

Health is never judged here: each process's ``ProcessHealth`` comes from
``keel.watch.verdicts`` (the watchdog's published verdict, or the same rules run
locally when it is not reporting); this module maps it to a label and a colour.
Nothing here touches files, sockets or Bokeh, so every case is a plain unit test.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Mapping

from keel.status.models import ProcessStatus, State, TrainingStatus
from keel.watch.verdicts import ProcessHealth
from keel.status.results import ReadError, Stale

from dashboard.config import ProcessInfo

OK, WARN, BAD = 0, 1, 2
LEVEL_COLOR = {OK: "#1a7f37", WARN: "#b8860b", BAD: "#c62828"}
GREY = "#9e9e9e"
TEXT = "#212121"
DASH = "—"
# A health word (keel.watch.verdicts.HEALTH_WORDS) to its colour level.
HEALTH_LEVEL = {"ok": OK, "starting": WARN, "degraded": WARN, "stopped": WARN, "unhealthy": BAD, "failed": BAD}

# Only dashboard.page's training summary still uses this, for a trainer status file of no process in
# keel.json (the health table does not judge those at all).
DEFAULT_HEARTBEAT_TIMEOUT = 30.0

ROW_COLUMNS = (
    "name", "kind", "state", "pid", "uptime", "restarts", "health",
    "heartbeat", "progress", "writes", "note", "color", "health_color",
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


def health_verdict(h: ProcessHealth) -> Verdict:
    """A process's health as a label, a colour level and a note (the reason; who judged when not the watchdog)."""
    note = "" if h.health == "ok" else h.reason
    if not h.by_watchdog:
        note = f"{note} [{h.judged_by}]".strip()
    return Verdict(h.health, HEALTH_LEVEL.get(h.health, BAD), note)


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
    health: Mapping[str, ProcessHealth],
    now_mono: float,
    now_wall: datetime,
    *,
    host: str | None = None,
) -> tuple[dict[str, list], list[Verdict]]:
    """The process table as columns (for a ColumnDataSource) and one verdict per row.

    ``health`` is keyed by process (every torchrun rank's row shows its process's
    verdict and restarts). A status file of no process in keel.json has no entry
    and shows as "unknown". A row without a status shows the read error, unless
    the watchdog judged it.
    """
    cols: dict[str, list] = {c: [] for c in ROW_COLUMNS}
    verdicts: list[Verdict] = []
    for sname, info in row_names(processes, statuses):
        result = statuses.get(sname)
        kind = info.kind if info else DASH
        h = health.get(info.name if info else sname)
        restarts = h.restarts_total if h is not None else None
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
            if h is not None and h.by_watchdog:
                v = health_verdict(h)
                label = v.label
                detail = v.note or detail
            else:
                v = Verdict(label, BAD if label != "missing" else WARN, detail)
            state = error_label(err) if err is not None else "missing"
            _add_row(cols, sname, kind, state, DASH, DASH, restarts, v, DASH, DASH, DASH, detail, GREY)
            verdicts.append(v)
            continue
        kind = status.kind
        if host is not None and status.host != host:
            # CLOCK_MONOTONIC is per host: another host's ages mean nothing here
            v = Verdict("other host", WARN, f"written on {status.host}")
            hb = pa = DASH
        else:
            # A status file of no process in keel.json has no health or limits to judge it by: said, not guessed.
            v = health_verdict(h) if h is not None else Verdict(
                "unknown", WARN, "not in keel.json: not judged" if info is None else "not judged yet")
            hb = fmt_age(status.heartbeat_age(now_mono))
            pa = fmt_age(status.progress_age(now_mono))
        # Greyed: values that are not the running process's now (frozen, gone, another host's).
        fresh = v.label != "other host" and (h is None or h.rule not in ("heartbeat_stale", "pid_gone", "pid_reused"))
        uptime = fmt_age((now_wall - status.started_at).total_seconds()) if status.state not in (
            State.STOPPED, State.FAILED) else DASH
        writes = str(status.write_failures)
        note = v.note or (status.last_error or "")
        if h is not None and h.end_reason and (v.label != "ok" or status.state in (State.STOPPED, State.FAILED)):
            note = f"{note}; last end: {h.end_reason}".lstrip("; ")  # the watchdog's classification (End states)
        if status.write_failures:
            note = f"{note}; status writes failing: {status.last_write_error or '?'}".lstrip("; ")
        _add_row(cols, sname, kind, status.state.value, str(status.pid), uptime, restarts, v, hb, pa, writes,
                 note, TEXT if fresh else GREY)
        verdicts.append(v)
    return cols, verdicts


def _add_row(cols: dict[str, list], name: str, kind: str, state: str, pid: str, uptime: str,
             restarts: int | None, v: Verdict, hb: str, pa: str, writes: str, note: str, color: str) -> None:
    cols["name"].append(name)
    cols["kind"].append(kind)
    cols["state"].append(state)
    cols["pid"].append(pid)
    cols["uptime"].append(uptime)
    cols["restarts"].append(DASH if restarts is None else str(restarts))
    cols["health"].append(v.label)
    cols["heartbeat"].append(hb)
    cols["progress"].append(pa)
    cols["writes"].append(writes)
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


def key_html(keys: list[tuple[str, str]]) -> str:
    """Which colour is which line: one line of HTML (a canvas legend costs every repaint of the plot)."""
    return " ".join(f"<span style='color:{color};white-space:nowrap'>&#9473;&#9473; {esc(label)}</span>"
                    for color, label in keys)


def pre_html(lines: list[str], *, newest_last: bool = False) -> str:
    """Lines as a scrolling preformatted block, escaped. ``newest_last`` (a log, oldest line first): the
    block opens scrolled to its end, where the newest lines are, like ``tail``; a plain scroll box
    opens at its top, and a log longer than the box showed only its oldest lines, as if stale. The
    reversed flex column is what anchors the scroll at the end: plain CSS, no script in the page."""
    body, box = "\n".join(esc(x) for x in lines), "max-height:260px;overflow:auto;margin:2px 0"
    if not newest_last:
        return f"<pre style='font-size:85%;{box}'>{body}</pre>"
    return (f"<div class='keel-log-box' style='{box};display:flex;flex-direction:column-reverse'>"
            f"<pre style='font-size:85%;margin:0'>{body}</pre></div>")


def status_kind(r: ProcessStatus | ReadError | None) -> str | None:
    """The kind of process a status read is of (a stale one's too), None for an error or nothing."""
    s = r.status if isinstance(r, Stale) else r
    return s.kind if isinstance(s, ProcessStatus) else None
