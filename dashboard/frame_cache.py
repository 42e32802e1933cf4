"""Each stream's drawn curves (dashboard.curves.Frame), made once for every session at a History serial.

The first session that needs a stream's curves makes them; they are kept until the stream changes, so a
tab opened later, or one more tab, costs no downsampling. While a long history is read in (the collector's
``catching_up``: METRICS_PER_CYCLE records a cycle, cycles back to back), curves made under
CATCHING_UP_REDRAW_S ago are kept although the stream grew: each making is a downsampling of up to
1,000,000 rows and 2,000 points a metric sent to every tab and repainted there, and the tabs being opened
meanwhile waited behind it (the sessions draw the rows after the serial at their next redraw).
"""

from __future__ import annotations

from typing import Any, Callable

CATCHING_UP_REDRAW_S = 1.0


class FrameCache:
    """stream -> (History serial, made at (monotonic seconds), Frame)."""

    def __init__(self, mono: Callable[[], float]) -> None:
        self._mono = mono
        self._kept: dict[str, tuple[int, float, Any]] = {}

    def get(self, stream: str, serial: int, make: Callable[[], Any], *, catching_up: bool) -> tuple[int, Any]:
        """The curves of ``stream`` and the serial they are at: the kept ones, unless ``serial`` moved on
        and (while catching up) they are CATCHING_UP_REDRAW_S old."""
        now, kept = self._mono(), self._kept.get(stream)
        fresh_enough = catching_up and kept is not None and now - kept[1] < CATCHING_UP_REDRAW_S
        if kept is None or (kept[0] != serial and not fresh_enough):
            kept = self._kept[stream] = (serial, now, make())
        return kept[0], kept[2]

    def latest(self, stream: str) -> Any:
        """The curves last made for ``stream`` (KeyError if none were)."""
        return self._kept[stream][2]
