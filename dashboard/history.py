"""A bounded, downsampled in-memory time series for the dashboard's plots.

Each point gets a serial number that only grows, so a browser session can ask
for "everything after the last serial I sent" and stream just that. When the
series grows past ``max_points``, the older half is thinned to every other
point: recent data stays at full resolution, old data at a coarser one, and
memory stays bounded whatever the run length.
"""

from __future__ import annotations

import bisect
import math
from array import array
from typing import Iterable, Mapping


class History:
    """Columns of floats keyed by name, appended to in rows; bounded by ``max_points``."""

    def __init__(self, columns: Iterable[str], max_points: int) -> None:
        if max_points < 4:
            raise ValueError(f"max_points must be at least 4, got {max_points}")
        self.columns = tuple(columns)
        self.max_points = max_points
        # array('d'): 8 bytes a value instead of a 24-byte float object plus a pointer,
        # which is most of the dashboard's memory with 64 streams of 2000 points.
        self._serials = array("q")
        self._data: dict[str, array] = {c: array("d") for c in self.columns}
        self._next = 0
        self.downsamples = 0

    def __len__(self) -> int:
        return len(self._serials)

    @property
    def last_serial(self) -> int:
        """Serial of the newest point, -1 when empty."""
        return self._next - 1

    def append(self, row: Mapping[str, object]) -> None:
        """Add one point; a missing or non-numeric column becomes NaN (a gap in the plot)."""
        self._serials.append(self._next)
        self._next += 1
        for c in self.columns:
            self._data[c].append(_as_float(row.get(c)))
        if len(self._serials) > self.max_points:
            self._downsample()

    def extend(self, rows: Iterable[Mapping[str, object]]) -> None:
        """Append many points in order."""
        for r in rows:
            self.append(r)

    def add_column(self, name: str) -> None:
        """A new column; the points already held get NaN in it (a gap, not a made-up value)."""
        if name in self._data:
            return
        self.columns += (name,)
        self._data[name] = array("d", [math.nan]) * len(self._serials)

    def _downsample(self) -> None:
        # Thin the older half to every other point; the newest half is untouched
        # so a session streaming "after serial N" never misses a recent point.
        half = len(self._serials) // 2
        self._serials = self._serials[0:half:2] + self._serials[half:]
        for c in self.columns:
            col = self._data[c]
            self._data[c] = col[0:half:2] + col[half:]
        self.downsamples += 1

    def since(self, serial: int, columns: Iterable[str] | None = None) -> dict[str, list[float]]:
        """Columns (all, or those named) of the points newer than ``serial`` (all points for -1)."""
        start = bisect.bisect_right(self._serials, serial)
        return {c: self._data[c][start:].tolist() for c in (self.columns if columns is None else columns)}

    def data(self, columns: Iterable[str] | None = None) -> dict[str, list[float]]:
        """All retained points of all (or the named) columns, as copies."""
        return self.since(-1, columns)

    def latest(self, column: str) -> float | None:
        """The newest non-NaN value of ``column``, or None."""
        for v in reversed(self._data[column]):
            if not math.isnan(v):
                return v
        return None


def _as_float(value: object) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        # the status layer writes non-finite floats as strings
        try:
            return float(value)
        except ValueError:
            return math.nan
    return math.nan

