"""The smoothing drawn over each raw curve: a debiased, time-weighted EMA (pure numpy).

Debiased as TensorBoard fixed it (tensorflow/tensorboard#610): the running sum
starts at zero, so each value is divided by the weight mass seen so far
(1 - prod of decays) instead of being pulled towards 0 at the start.
Time-weighted: the decay of one step is ``weight ** (dx / typical dx)``, so a
burst of closely spaced points does not count more than the same span sampled
sparsely, and a gap forgets more. ``SMOOTH_JS`` is the same code for the
browser (tests/browser/test_training_curves.py checks the page draws what ``ema`` computes).
"""

from __future__ import annotations

import math

import numpy as np


def typical_dx(x: np.ndarray) -> float:
    """The median positive spacing of x (1.0 when there is none)."""
    d = np.diff(np.asarray(x, dtype=np.float64))
    d = d[np.isfinite(d) & (d > 0)]
    return float(np.median(d)) if len(d) else 1.0


def ema(x: np.ndarray, y: np.ndarray, weight: float, unit: float | None = None) -> np.ndarray:
    """Smoothed y; NaN stays NaN and does not reset the average; ``weight`` 0 returns y."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    out = np.full(len(y), math.nan)
    if weight <= 0:
        return y.copy()
    unit = unit or typical_dx(x)
    acc = norm = 0.0
    last_x = None
    for i in range(len(y)):
        v = y[i]
        if not math.isfinite(v):
            continue
        dx = 1.0 if last_x is None else max(0.0, (x[i] - last_x) / unit)
        a = weight ** dx
        acc = acc * a + (1 - a) * v if norm else (1 - a) * v if dx else v
        norm = norm * a + (1 - a) if norm else ((1 - a) if dx else 1.0)
        out[i] = acc / norm if norm else v
        last_x = x[i]
    return out


# The same algorithm for a CustomJSTransform (v_func): ``xs`` are the y values, ``source.data.x`` the x.
SMOOTH_JS = """
const w = slider.value;
const data = source.data;
const get = (k) => (data instanceof Map ? data.get(k) : data[k]);
const x = get('x');
const n = xs.length;
const out = new Float64Array(n);
const stash = (o) => { window.keel_smoothed = window.keel_smoothed || {}; window.keel_smoothed[source.name] = Array.from(o); return o; };
if (w <= 0) { for (let i = 0; i < n; i++) out[i] = xs[i]; return stash(out); }
const d = [];
for (let i = 1; i < n; i++) { const v = x[i] - x[i-1]; if (v > 0 && isFinite(v)) d.push(v); }
d.sort((a, b) => a - b);
const unit = d.length ? (d.length % 2 ? d[(d.length - 1) / 2] : (d[d.length / 2 - 1] + d[d.length / 2]) / 2) : 1.0;
let acc = 0, norm = 0, lastx = null;
for (let i = 0; i < n; i++) {
  const v = xs[i];
  if (!isFinite(v) || v === null) { out[i] = NaN; continue; }
  const dx = lastx === null ? 1.0 : Math.max(0, (x[i] - lastx) / unit);
  const a = Math.pow(w, dx);
  if (norm) { acc = acc * a + (1 - a) * v; norm = norm * a + (1 - a); }
  else if (dx) { acc = (1 - a) * v; norm = 1 - a; }
  else { acc = v; norm = 1.0; }
  out[i] = norm ? acc / norm : v;
  lastx = x[i];
}
return stash(out);
"""
