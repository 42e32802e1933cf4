"""The training plots' x axis: the step, the time since the (latest) run's first record, or the wall clock.

Every drawn source carries all three (dashboard.curves.Series.columns: ``step``, ``rel`` and ``t``,
both times in ms); ``x`` is a copy of the chosen one, so switching the axis resends the same points
with another ``x``, and hover keeps showing step and wall time whatever the axis.
"""

from __future__ import annotations

from typing import Any

from bokeh.models import BasicTicker, CustomJSTickFormatter, DatetimeTicker, DatetimeTickFormatter, NumeralTickFormatter

# mode (the source column x copies) -> what the select and the axis call it
MODES = {"step": "step", "rel": "relative time", "t": "wall clock"}

# Steps with thousands separators: Bokeh's default formatter turns to scientific notation at 100,000
# ("2.000e+4" under every tick of a long run's step axis); a fraction only where a deep zoom has one.
STEP_FORMAT = "0,0.[00]"

# ms -> "45s", "12m30s", "3h05m", "2d04h": a duration, never a date
_DURATION_JS = """
const s = Math.round(tick / 1000), a = Math.abs(s), sign = s < 0 ? '-' : '';
const d = Math.floor(a / 86400), h = Math.floor(a % 86400 / 3600), m = Math.floor(a % 3600 / 60), r = a % 60;
const p = (v) => String(v).padStart(2, '0');
if (d) return `${sign}${d}d${p(h)}h`;
if (h) return `${sign}${h}h${p(m)}m`;
if (m) return `${sign}${m}m${p(r)}s`;
return `${sign}${r}s`;"""


def with_x(cols: dict[str, list], mode: str) -> dict[str, list]:
    """A copy of ``cols`` (a drawn source's columns) with ``x`` the ``mode`` column. Every list is new:
    a source's lists grow in place when points are streamed onto it, and a frame's are shared by all
    sessions (and ``x`` must not be the same list as the column it copies)."""
    return {**{k: list(v) for k, v in cols.items()}, "x": list(cols[mode])}


def window(mode: str, x0: float, x1: float, t0: float | None) -> tuple[str, float, float]:
    """The stream rows' column and bounds (dashboard.curves.within) of the visible x range [x0, x1]."""
    if mode == "step":
        return ("step", x0, x1)
    base = (t0 or 0.0) if mode == "rel" else 0.0
    return ("t", base + x0 / 1000.0, base + x1 / 1000.0)


def axis_models(mode: str) -> tuple[str, Any, Any]:
    """Label, ticker and tick formatter of an x axis showing ``mode``."""
    if mode == "step":
        return "step", BasicTicker(), NumeralTickFormatter(format=STEP_FORMAT)
    if mode == "rel":
        return "time since the run's first record", DatetimeTicker(), CustomJSTickFormatter(code=_DURATION_JS)
    return "wall clock", DatetimeTicker(), DatetimeTickFormatter()
