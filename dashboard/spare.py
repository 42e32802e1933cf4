"""``SparePage``: the next tab's page models, built before the tab asks for them.

A Bokeh server builds a session's Document inside the tab's ``GET /``: for this page's ~430 models that
was 0.3-0.5 s of the event loop (measured in-process with a 200,000-row history) before the browser got a
byte, and a third tab opened in turn painted its loss curve at 2.5 s. The models of a page do not depend on
the tab, only on what the collector holds, and a built page is brought up to date by its own update (the
same one every push runs). So one page is kept built: a new tab takes it, and the next one is built once
the taker's whole page was sent (``refill_soon``), when the loop has nothing else to do for that tab.

No timers when nothing happens: a spare is built once and waits; idle CPU is unchanged.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Generic, TypeVar

log = logging.getLogger("dashboard.spare")
T = TypeVar("T")

# After the taker's whole page was sent, Bokeh still writes it to the websocket on the next loop turns;
# the spare is built after that, not in its way.
REFILL_AFTER_S = 0.25


class SparePage(Generic[T]):
    """At most one page built ahead; ``take`` hands it out (or builds one there and then)."""

    def __init__(self, build: Callable[[], T], call_later: Callable[[float, Callable[[], None]], Any]) -> None:
        self._build = build
        self._call_later = call_later  # the server loop's (tornado IOLoop.call_later)
        self._spare: T | None = None
        self._pending = False
        self.taken = self.built_on_request = 0  # counters, for the log and the tests

    def take(self) -> T:
        """The spare page if one is built, else a page built now."""
        spare, self._spare = self._spare, None
        if spare is not None:
            self.taken += 1
            return spare
        self.built_on_request += 1
        return self._build()

    def refill_soon(self, delay: float = REFILL_AFTER_S) -> None:
        """Build the next spare ``delay`` from now, unless one is built or on its way."""
        if self._spare is None and not self._pending:
            self._pending = True
            self._call_later(delay, self._fill)

    def _fill(self) -> None:
        self._pending = False
        if self._spare is not None:
            return
        try:
            self._spare = self._build()
        except Exception:  # noqa: BLE001 - no spare then: the next tab builds its page itself, and says why
            log.exception("cannot build a spare page")

    @property
    def ready(self) -> bool:
        return self._spare is not None
