"""What a training curve is, from a stream's metric rows (pure numpy, no Bokeh).

A metrics file interleaves records that carry different metrics (a validation
record has only ``val_loss``), so each metric is its own series: x only where
that metric has a value, and the line is continuous. Restarts split the rows
into incarnations: an incarnation starts at the trainer's own ``resume`` record
(``{"event": "resume", "step": S}``, written as it loads the checkpoint of step S:
a clean resume at the very step it stopped is a restart too), or, in a file
without those records, where the step goes back. After a resume at step S, what
the dead incarnation did beyond S is lost work: kept apart (drawn faint), never
part of the live line, which therefore never folds back in x. Where the trainer
was down, the live line gets one NaN point (a gap).

A ``new_run`` record (a start with no checkpoint of its run to resume) begins
another run in the same file: the stream's curves are its latest run's (earlier
runs are the run archive's, listed in the page and overlaid from there), so a
new run is never drawn as a restart of the last one with all its work lost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from keel.status.runs import NEW_RUN_EVENT, RESUME_EVENT

from dashboard.downsample import envelope, select

BEGIN = "_begin"  # the rows' column where the trainer began: RESUMED or NEW_RUN, else NaN (no metric's name)
RESUMED, NEW_RUN = 1.0, 2.0
_BEGIN_OF = {RESUME_EVENT: RESUMED, NEW_RUN_EVENT: NEW_RUN}  # the trainer's records of where it began
BEGIN_EVENTS = frozenset(_BEGIN_OF)  # the event records the curves draw themselves


def tag_begins(records: list[dict]) -> list[dict]:
    """``records`` with ``BEGIN`` set on the trainer's resume and new-run records (the rest as they are)."""
    return [{**r, BEGIN: _BEGIN_OF[r["event"]]} if isinstance(r.get("event"), str) and r["event"] in _BEGIN_OF
            else r for r in records]


def run_start(rows: dict[str, np.ndarray]) -> int:
    """The row index where the rows' latest run begins (its ``new_run`` record; 0 when there is none)."""
    b = rows.get(BEGIN)
    at = np.flatnonzero(b == NEW_RUN) if b is not None else ()
    return int(at[-1]) if len(at) else 0


def latest_run(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The rows of the latest run only (views, no copy)."""
    a = run_start(rows)
    return rows if a == 0 else {k: v[a:] for k, v in rows.items()}


def incarnation_starts(step: np.ndarray, begin: np.ndarray | None = None) -> np.ndarray:
    """Row indices where a new incarnation begins (0 first): a resume record (``begin``: the rows' BEGIN
    column), or, where there is none, the step went below the one before it."""
    s = np.asarray(step, dtype=np.float64)
    ok = np.flatnonzero(np.isfinite(s))
    back = ok[1:][s[ok[1:]] < s[ok[:-1]]] if len(ok) else ok
    marked = np.flatnonzero(begin == RESUMED) if begin is not None else back[:0]  # a new run is another run
    return np.unique(np.concatenate([[0], back, marked])).astype(np.int64)


def lost_mask(step: np.ndarray, starts: np.ndarray, begin: np.ndarray | None = None) -> np.ndarray:
    """True for rows of a dead incarnation that a later one redid: beyond a later resume step (the step of
    its resume record, or, without one, at or beyond its first step)."""
    s = np.asarray(step, dtype=np.float64)
    lost = np.zeros(len(s), dtype=bool)
    cut = math.inf
    bounds = list(starts) + [len(s)]
    for j in range(len(starts) - 1, -1, -1):
        a, b = bounds[j], bounds[j + 1]
        if cut < math.inf:
            lost[a:b] = s[a:b] >= cut
        seg = s[a:b]
        fin = seg[np.isfinite(seg)]
        if len(fin):
            resumed = begin is not None and begin[a] == RESUMED and np.isfinite(s[a])
            # a resume record's step S was saved, not lost: the work lost is beyond it
            cut = min(cut, float(np.nextafter(s[a], math.inf)) if resumed else float(fin[0]))
    return lost


@dataclass(frozen=True)
class Series:
    """One metric's points as drawn: x, its step and wall time, value, and the band it stands for."""

    step: np.ndarray
    t: np.ndarray
    y: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def columns(self, t0: float | None = None) -> dict[str, list[float]]:
        """Source columns: x (step, the default x), step, t (wall time in ms since the epoch, as Bokeh's
        datetime axes and formatters take it), rel (ms since ``t0``, the run's first wall time: in ms, a datetime
        ticker puts its ticks on whole seconds, minutes and hours of the duration), y, band."""
        t0 = t0 if t0 is not None and math.isfinite(t0) else (float(np.nanmin(self.t)) if np.isfinite(self.t).any()
                                                              else 0.0)
        return {"x": self.step.tolist(), "step": self.step.tolist(), "t": (self.t * 1000.0).tolist(),
                "rel": ((self.t - t0) * 1000.0).tolist(), "y": self.y.tolist(), "lo": self.lo.tolist(), "hi": self.hi.tolist()}


def _empty() -> Series:
    e = np.empty(0)
    return Series(e, e, e, e, e)


def split(rows: dict[str, np.ndarray], metric: str, starts: np.ndarray | None = None,
          lost: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices of ``metric``'s live points, of its lost-work points, and of the live line's gap rows.

    A gap row is the first live point of each later incarnation: the line breaks just before it.
    ``starts``/``lost`` (``incarnation_starts``, ``lost_mask`` of the rows): pass them to split several
    metrics of the same rows without recomputing them (the dearest part on a long run)."""
    step = rows["step"]
    y = rows[metric]
    starts = incarnation_starts(step, rows.get(BEGIN)) if starts is None else starts
    lost = lost_mask(step, starts, rows.get(BEGIN)) if lost is None else lost
    has = np.isfinite(y) & np.isfinite(step)
    live = np.flatnonzero(has & ~lost)
    gone = np.flatnonzero(has & lost)
    return live, gone, breaks(live, starts)


def breaks(idx: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """The rows of ``idx`` that begin another incarnation than the row before them: a line breaks there."""
    inc = np.searchsorted(starts, idx, side="right")  # incarnation number of each row
    return idx[1:][inc[1:] != inc[:-1]] if len(idx) > 1 else idx[:0]


def draw(rows: dict[str, np.ndarray], idx: np.ndarray, metric: str, n_out: int,
         gaps: np.ndarray | None = None) -> Series:
    """The rows ``idx`` of ``metric`` (step order), downsampled to about ``n_out`` points with MinMaxLTTB,
    each point with the min/max of what it stands for; a NaN point before each gap row (a break in the line)."""
    if not len(idx):
        return _empty()
    step = rows["step"][idx]
    y = rows[metric][idx]
    t = rows["t"][idx] if "t" in rows else np.full(len(idx), math.nan)
    pick = select(step, y, n_out)
    if gaps is not None and len(gaps):
        # a break must survive the downsampling: MinMaxLTTB keeps extremes, and the first point after a
        # restart is rarely one. Keep each gap row and the row before it, so the NaN goes between them.
        at = np.flatnonzero(np.isin(idx, gaps))
        pick = np.union1d(pick, np.concatenate([at, at - 1]).clip(0))
    lo, hi = envelope(y, pick)
    out_idx = idx[pick]
    s, tt, yy = step[pick], t[pick], y[pick]
    if gaps is not None and len(gaps):
        at = np.flatnonzero(np.isin(out_idx, gaps))
        if len(at):
            s = np.insert(s, at, s[at])
            tt = np.insert(tt, at, math.nan)
            yy = np.insert(yy, at, math.nan)
            lo = np.insert(lo, at, math.nan)
            hi = np.insert(hi, at, math.nan)
    return Series(s, tt, yy, lo, hi)


def within(rows: dict[str, np.ndarray], idx: np.ndarray, window: tuple[str, float, float]) -> np.ndarray:
    """The rows ``idx`` whose ``window`` column (``step`` or ``t``) lies in [lo, hi], and one more on each
    side, so the line runs on to the plot's edges instead of stopping short of them."""
    col, lo, hi = window
    v = rows[col][idx]
    k = np.flatnonzero((v >= lo) & (v <= hi))
    if not len(k):
        return idx[:0]
    return idx[max(0, int(k[0]) - 1): int(k[-1]) + 2]


def covers(rows: dict[str, np.ndarray], window: tuple[str, float, float]) -> bool:
    """True when ``window`` holds every row of the stream's latest run (a reset view, padded): nothing to
    zoom into."""
    rows = latest_run(rows)
    col, lo, hi = window
    v = rows[col][np.isfinite(rows[col])]
    return not len(v) or (lo <= float(v.min()) and hi >= float(v.max()))


def appends_only(rows: dict[str, np.ndarray], start: int) -> bool:
    """True when rows ``start:`` only go on from the rows before them: no resume or new run, no step goes
    back (no new incarnation, no lost work), so they can be added to a drawn line as they are."""
    b = rows.get(BEGIN)
    if b is not None and np.isfinite(b[start:]).any():
        return False
    s = np.asarray(rows["step"], dtype=np.float64)
    new = s[start:][np.isfinite(s[start:])]
    before = s[:start][np.isfinite(s[:start])]
    if len(new) > 1 and bool((np.diff(new) < 0).any()):
        return False
    return not len(new) or not len(before) or float(new[0]) >= float(before[-1])


def tail(rows: dict[str, np.ndarray], start: int, metric: str) -> Series:
    """The raw rows ``start:`` that carry ``metric``, as drawn points standing for themselves (band = value)."""
    y = rows[metric][start:]
    k = np.flatnonzero(np.isfinite(y) & np.isfinite(rows["step"][start:]))
    yy = y[k]
    t = rows["t"][start:][k] if "t" in rows else np.full(len(k), math.nan)
    return Series(rows["step"][start:][k], t, yy, yy, yy)


@dataclass(frozen=True)
class Frame:
    """What every session draws of one stream at one History serial: computed once, shared by all."""

    live: dict[str, dict[str, list[float]]]  # metric -> source columns of its live line
    lost: dict[str, dict[str, list[float]]]  # metric -> source columns of its lost work
    resumes: list[tuple[float, str]]  # (step, hover text) where a later incarnation resumed
    live_step: np.ndarray  # the loss line's live rows, where markers placed by wall time go
    live_t: np.ndarray
    t0: float | None  # the latest run's first wall time: relative time counts from it


def frame(rows: dict[str, np.ndarray], stream: str, metrics: tuple[str, ...], n_out: int,
          window: tuple[str, float, float] | None = None) -> Frame:
    """Every metric's live line and lost work, downsampled to ``n_out``, and the resumes, of the latest run
    of one stream.

    With a ``window`` (column ``step`` or ``t``, lo, hi: a zoomed plot's visible range), only the rows in it
    are drawn, so the ``n_out`` points show that range at full resolution (down to every row)."""
    rows = latest_run(rows)
    fin_t = rows["t"][np.isfinite(rows["t"])]
    t0 = float(fin_t.min()) if len(fin_t) else None  # relative time counts from the run's first record
    live_cols, lost_cols = {}, {}
    live_step = live_t = np.empty(0)
    step, t = rows["step"], rows["t"]
    starts = incarnation_starts(step, rows.get(BEGIN))
    lost = lost_mask(step, starts, rows.get(BEGIN))
    for metric in metrics:
        live, gone, gaps = split(rows, metric, starts, lost)
        if window is not None:
            live, gone = within(rows, live, window), within(rows, gone, window)
            gaps = gaps[np.isin(gaps, live)]
        # lost work breaks between dead incarnations too: each is its own stretch, not one line folding back
        s, g = draw(rows, live, metric, n_out, gaps), draw(rows, gone, metric, n_out, breaks(gone, starts))
        live_cols[metric] = {**s.columns(t0), "run": [stream] * len(s)}
        lost_cols[metric] = {**g.columns(t0), "run": [stream + " (lost work)"] * len(g)}
        if metric == "loss":
            live_step, live_t = rows["step"][live], rows["t"][live]
    begin = rows.get(BEGIN)
    resumes = [(float(step[a]), resume_text(stream, step, t, int(prev), int(a),
                                            begin is not None and bool(begin[a] == RESUMED)))
               for prev, a in zip(starts[:-1], starts[1:]) if np.isfinite(step[a])]
    return Frame(live_cols, lost_cols, resumes, live_step, live_t, t0)


def resume_text(stream: str, step: np.ndarray, t: np.ndarray, p: int, a: int, recorded: bool) -> str:
    """The hover text of the restart at row ``a``: where it resumed, how long the trainer was down, what
    was lost (the steps of the incarnation that died, rows ``p:a``, beyond the resume step). ``recorded``:
    row ``a`` is the trainer's resume record (its step is the checkpoint's); else the first row after the
    step went back."""
    s = float(step[a])
    had = np.isfinite(step[p:a])  # rows with a step: its work (a record written at the restart is not)
    prev = step[p:a][had]
    before = t[p:a][had & np.isfinite(t[p:a])]
    down = float(t[a] - before.max()) if len(before) and math.isfinite(t[a]) else math.nan
    text = f"{stream}: restart, resumed at step {s:.0f}" if recorded else f"{stream}: restart, resumed by step {s:.0f}"
    if math.isfinite(down) and down >= 1:
        text += f" after {duration(down)} down"
    lost = prev[prev > s] if recorded else prev[prev >= s]
    first = s + 1 if recorded else s
    return text + (f" (steps {first:.0f}-{lost.max():.0f} lost)" if len(lost) else " (no steps lost)")


def duration(seconds: float) -> str:
    """``45s``, ``12m30s``, ``3h05m``, ``2d04h``: how long, as a person reads it (as the relative-time axis
    writes its ticks: dashboard.xaxis)."""
    sec = int(round(seconds))
    if sec < 60:
        return f"{sec}s"
    if sec < 3600:
        return f"{sec // 60}m{sec % 60:02d}s"
    if sec < 86400:
        return f"{sec // 3600}h{sec % 3600 // 60:02d}m"
    return f"{sec // 86400}d{sec % 86400 // 3600:02d}h"
