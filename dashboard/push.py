"""When a session's page is sent what changed: pushed on the collector's news, paced per session."""

from __future__ import annotations

import time
from typing import Any, Callable

from bokeh.document import Document

# At most one pushed update a session per PUSH_GAP_S: a trainer writing every few ms would otherwise
# have every tab repaint its plots 20 times a second (the poll's pace), which kept a headless Chromium's
# main thread busy (measured: a page evaluation took 2 s instead of ms). A push within the gap waits for
# its end, so a write still shows within the gap plus one poll.
PUSH_GAP_S = 0.1


def pusher(doc: Document, view: Any, clock: Callable[[], float] = time.monotonic) -> Callable[[], None]:
    """A collector listener that runs ``view.update`` (a dashboard.page.SessionView) on the session's next
    tick (under its document lock), at most one pending at a time however far the loop has fallen behind,
    and at most one per PUSH_GAP_S."""
    pending = False
    last = -PUSH_GAP_S

    def run() -> None:
        nonlocal pending, last
        pending, last = False, clock()
        t0 = time.perf_counter()
        view.update()
        view.c.session_seconds.append(time.perf_counter() - t0)  # in refresh_stats: the bench's session cost

    def push() -> None:
        nonlocal pending
        if pending:
            return
        pending = True
        wait = last + PUSH_GAP_S - clock()
        if wait > 0:
            doc.add_timeout_callback(run, int(wait * 1000) + 1)
        else:
            doc.add_next_tick_callback(run)

    return push
