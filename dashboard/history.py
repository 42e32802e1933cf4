"""A bounded in-memory time series for the dashboard's plots, kept at full resolution.

Each point gets a serial number that only grows, so a browser session can ask
for "everything after the last serial I sent" and stream just that. Points are
kept at full resolution up to ``max_points`` (the drawn lines are downsampled:
dashboard.curves); past it, the older half is
reduced with MinMaxLTTB (tsdownsample), so every spike survives and memory
stays bounded whatever the run length.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import numpy as np

from dashboard.downsample import select

FULL_RES_POINTS = 2_000_000  # metric rows kept at full resolution per stream (8 columns: ~130 MB at most)


class History:
    """Columns of floats keyed by name, appended to in rows; bounded by ``max_points``."""

    def __init__(self, columns: Iterable[str], max_points: int) -> None:
        if max_points < 4:
            raise ValueError(f"max_points must be at least 4, got {max_points}")
        self.columns = tuple(columns)
        self.max_points = max_points
        # numpy buffers that double when full: 8 bytes a value, and views for the downsampler.
        self._cap = 64
        self._n = 0
        self._serials = np.zeros(self._cap, dtype=np.int64)
        self._data: dict[str, np.ndarray] = {c: np.full(self._cap, math.nan) for c in self.columns}
        self._next = 0
        self.downsamples = 0

    def __len__(self) -> int:
        return self._n

    @property
    def last_serial(self) -> int:
        """Serial of the newest point, -1 when empty."""
        return self._next - 1

    def _grow(self, need: int) -> None:
        if need <= self._cap:
            return
        cap = max(need, 2 * self._cap)
        s = np.zeros(cap, dtype=np.int64)
        s[: self._n] = self._serials[: self._n]
        self._serials = s
        for c, col in self._data.items():
            new = np.full(cap, math.nan)
            new[: self._n] = col[: self._n]
            self._data[c] = new
        self._cap = cap

    def append(self, row: Mapping[str, object]) -> None:
        """Add one point; a missing or non-numeric column becomes NaN (no value at that point)."""
        self.extend([row])

    def extend(self, rows: Iterable[Mapping[str, object]]) -> None:
        """Append many points in order."""
        rows = list(rows)
        if not rows:
            return
        self._grow(self._n + len(rows))
        n, k = self._n, len(rows)
        self._serials[n: n + k] = np.arange(self._next, self._next + k)
        for c in self.columns:
            self._data[c][n: n + k] = _column(rows, c)
        self._n += k
        self._next += k
        while self._n > self.max_points:
            self._downsample()

    def add_column(self, name: str) -> None:
        """A new column; the points already held get NaN in it (a gap, not a made-up value)."""
        if name in self._data:
            return
        self.columns += (name,)
        self._data[name] = np.full(self._cap, math.nan)

    def _downsample(self) -> None:
        # Reduce the older half to a quarter with MinMaxLTTB per column (the union of the points
        # each column needs); the newest half is untouched so a session streaming "after serial N"
        # never misses a recent point.
        half = self._n // 2
        per_col = max(4, half // (2 * max(1, len(self.columns))))
        x = self._serials[:half].astype(np.float64)
        keep = [np.array([0, half - 1])]
        for c in self.columns:
            y = self._data[c][:half]
            ok = np.flatnonzero(np.isfinite(y))
            if len(ok):
                keep.append(ok[select(x[ok], y[ok], per_col)])
        idx = np.unique(np.concatenate(keep))
        while len(idx) > max(1, half // 2):  # tiny bounds: always shrink, keeping the ends
            idx = np.unique(np.append(idx[::2], idx[-1])) if len(idx) > 2 else idx[:1]
        idx = np.concatenate([idx, np.arange(half, self._n)])
        m = len(idx)
        self._serials[:m] = self._serials[idx]
        for c in self.columns:
            col = self._data[c]
            col[:m] = col[idx]
            col[m: self._n] = math.nan
        self._n = m
        self.downsamples += 1

    def _start(self, serial: int) -> int:
        return int(np.searchsorted(self._serials[: self._n], serial, side="right"))

    def since(self, serial: int, columns: Iterable[str] | None = None) -> dict[str, list[float]]:
        """Columns (all, or those named) of the points newer than ``serial`` (all points for -1)."""
        start = self._start(serial)
        return {c: self._data[c][start: self._n].tolist() for c in (self.columns if columns is None else columns)}

    def data(self, columns: Iterable[str] | None = None) -> dict[str, list[float]]:
        """All retained points of all (or the named) columns, as copies."""
        return self.since(-1, columns)

    def arrays(self) -> dict[str, np.ndarray]:
        """Read-only numpy views of every retained point, plus their ``serial`` column."""
        start = 0
        out = {c: self._data[c][start: self._n] for c in self.columns}
        out["serial"] = self._serials[start: self._n]
        for v in out.values():
            v.flags.writeable = False
        return out

    def latest(self, column: str) -> float | None:
        """The newest non-NaN value of ``column``, or None."""
        col = self._data[column][: self._n]
        ok = np.flatnonzero(~np.isnan(col))
        return float(col[ok[-1]]) if len(ok) else None


def _column(rows: list[Mapping[str, object]], name: str) -> np.ndarray | list[float]:
    """The rows' ``name`` values as floats: numpy converts numbers, None (NaN) and numeric strings at once
    (2.5x faster: a long history is read 20,000 records a cycle, on the event loop); anything else (a word,
    a list, an int too large) sends the column value by value through ``_as_float``."""
    values = [r.get(name) for r in rows]
    try:
        col = np.array(values, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        col = None
    if col is None or col.shape != (len(values),):
        return [_as_float(v) for v in values]
    return col


def _as_float(value: object) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:  # an int beyond a float's range
            return math.inf if value > 0 else -math.inf
    if isinstance(value, str):
        # the status layer writes non-finite floats as strings
        try:
            return float(value)
        except ValueError:
            return math.nan
    return math.nan
