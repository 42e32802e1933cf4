"""What a training curve is, from a stream's metric rows (pure numpy, no Bokeh).

A metrics file interleaves records that carry different metrics (a validation
record has only ``val_loss``), so each metric is its own series: x only where
that metric has a value, and the line is continuous. Restarts split the rows
into incarnations: an incarnation starts where the step goes back. After a
resume at step S, what the dead incarnation did beyond S is lost work: kept
apart (drawn faint), never part of the live line, which therefore never folds
back in x. Where the trainer was down, the live line gets one NaN point (a gap).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dashboard.downsample import envelope, select


def incarnation_starts(step: np.ndarray) -> np.ndarray:
    """Row indices where a new incarnation begins (0 first): the step went below the one before it."""
    s = np.asarray(step, dtype=np.float64)
    ok = np.flatnonzero(np.isfinite(s))
    if not len(ok):
        return np.array([0], dtype=np.int64)
    back = ok[1:][s[ok[1:]] < s[ok[:-1]]]
    return np.concatenate([[0], back]).astype(np.int64)


def lost_mask(step: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """True for rows of a dead incarnation that a later one redid (step at or beyond a later resume step)."""
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
            cut = min(cut, float(fin[0]))
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
    starts = incarnation_starts(step) if starts is None else starts
    lost = lost_mask(step, starts) if lost is None else lost
    has = np.isfinite(y) & np.isfinite(step)
    live = np.flatnonzero(has & ~lost)
    gone = np.flatnonzero(has & lost)
    inc = np.searchsorted(starts, live, side="right")  # incarnation number of each live point
    gaps = live[1:][inc[1:] != inc[:-1]] if len(live) > 1 else live[:0]
    return live, gone, gaps


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
    """True when ``window`` holds every row of the stream (a reset view, padded): nothing to zoom into."""
    col, lo, hi = window
    v = rows[col][np.isfinite(rows[col])]
    return not len(v) or (lo <= float(v.min()) and hi >= float(v.max()))


def appends_only(step: np.ndarray, start: int) -> bool:
    """True when rows ``start:`` only go on from the rows before them: no step goes back (no new
    incarnation, no lost work), so they can be added to a drawn line as they are."""
    s = np.asarray(step, dtype=np.float64)
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
    t0: float | None  # the stream's first wall time: relative time counts from it


def frame(rows: dict[str, np.ndarray], stream: str, metrics: tuple[str, ...], n_out: int,
          window: tuple[str, float, float] | None = None) -> Frame:
    """Every metric's live line and lost work, downsampled to ``n_out``, and the resumes, of one stream.

    With a ``window`` (column ``step`` or ``t``, lo, hi: a zoomed plot's visible range), only the rows in it
    are drawn, so the ``n_out`` points show that range at full resolution (down to every row)."""
    fin_t = rows["t"][np.isfinite(rows["t"])]
    t0 = float(fin_t.min()) if len(fin_t) else None  # relative time counts from the stream's first record
    live_cols, lost_cols = {}, {}
    live_step = live_t = np.empty(0)
    step = rows["step"]
    starts = incarnation_starts(step)
    lost = lost_mask(step, starts)
    for metric in metrics:
        live, gone, gaps = split(rows, metric, starts, lost)
        if window is not None:
            live, gone = within(rows, live, window), within(rows, gone, window)
            gaps = gaps[np.isin(gaps, live)]
        s, g = draw(rows, live, metric, n_out, gaps), draw(rows, gone, metric, n_out)
        live_cols[metric] = {**s.columns(t0), "run": [stream] * len(s)}
        lost_cols[metric] = {**g.columns(t0), "run": [stream + " (lost work)"] * len(g)}
        if metric == "loss":
            live_step, live_t = rows["step"][live], rows["t"][live]
    resumes = []
    for start in starts[1:]:
        prev = step[:start][np.isfinite(step[:start])]
        resumes.append((float(step[start]), f"{stream}: restart, resumed at step {step[start]:.0f}"
                        + (f" (steps {step[start]:.0f}-{prev.max():.0f} lost)" if len(prev) else "")))
    return Frame(live_cols, lost_cols, resumes, live_step, live_t, t0)
