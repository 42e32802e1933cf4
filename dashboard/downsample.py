"""Spike-keeping downsampling through tsdownsample's MinMaxLTTB (a maintained Rust kernel).

MinMaxLTTB first keeps each bin's min and max, then runs LTTB over those: the
largest spike of a 1,000,000-point series is always among the points kept,
which a stride or an average would drop (wandb/wandb#1453).
"""

from __future__ import annotations

import numpy as np
from tsdownsample import MinMaxLTTBDownsampler

_DS = MinMaxLTTBDownsampler()


def select(x: np.ndarray, y: np.ndarray, n_out: int) -> np.ndarray:
    """Indices (sorted) of at most ``n_out`` points of (x, y) that keep its shape and extremes.

    ``x`` must be non-decreasing; NaNs in ``y`` are the caller's to drop first."""
    n = len(y)
    if n <= n_out or n < 3:
        return np.arange(n)
    n_out = max(3, n_out)
    x = np.ascontiguousarray(x, dtype=np.float64)
    y = np.ascontiguousarray(y, dtype=np.float64)
    idx = _DS.downsample(x, y, n_out=n_out)
    return np.unique(np.asarray(idx, dtype=np.int64))


def envelope(y: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of ``y`` over the points each kept index stands for (from it up to the next kept one)."""
    if len(idx) == 0:
        return np.empty(0), np.empty(0)
    bounds = np.append(idx, len(y))
    lo = np.minimum.reduceat(y, bounds[:-1]) if len(y) else np.empty(0)
    hi = np.maximum.reduceat(y, bounds[:-1]) if len(y) else np.empty(0)
    return lo, hi
