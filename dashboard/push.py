"""When a session's page is sent what changed: pushed on the collector's news (and a timer), the text at once,
the plots paced per session."""

from __future__ import annotations

import time
from typing import Any, Callable

from bokeh.document import Document

# The plots of a session are sent at most once per PUSH_GAP_S: a trainer writing every few ms would otherwise
# have every tab repaint its plots 20 times a second (the poll's pace), which kept a headless Chromium's
# main thread busy (measured: a page evaluation took 2 s instead of ms). The text is not paced: it costs
# a browser a few ms, and each cycle's news is at most one text update (the collector's cycles are its
# pace: a settle of 0.02 s, then the read). Paced with the plots, a status write that came just after
# another push (the watchdog's status, the trainer's heartbeat, the refresh: ~3.5 a second) waited up
# to the whole gap before its step was sent.
PUSH_GAP_S = 0.1
# The plots follow the text by this much. A browser applies a new status text in a few ms, but shows it
# only with its next frame, and a frame after new points also repaints their plots: ~0.1 s of canvas work
# per update in a headless Chromium (measured: the text was in the DOM at 0.055 s median after the write,
# on screen at 0.124 s; the repaints were the page's long tasks). Sent apart, the text gets a frame of its
# own first; the lines come 0.04 s later.
PLOTS_AFTER_S = 0.04


def pusher(doc: Document, view: Any, clock: Callable[[], float] = time.monotonic) -> Callable[[], None]:
    """A collector listener (and the session's timer) that runs ``view.update_text`` (a
    dashboard.page.SessionView) on the session's next tick, under its document lock, and
    ``view.update_plots`` PLOTS_AFTER_S after it, or at the end of PUSH_GAP_S since the last plots.

    News is never dropped, and never costs a second repaint of the plots: news before a text went is in
    it (one text pending at a time, however far the loop has fallen behind); news after it gets a text of
    its own at once, and its lines go with the plots already due (one plots update pending at a time)."""
    text_due = False
    plots_due = False
    last_plots = -PUSH_GAP_S
    spent = 0.0  # server time of the texts since the last plots, and then of the plots

    def text() -> None:
        nonlocal text_due, plots_due, spent
        text_due = False
        t0 = time.perf_counter()
        view.update_text()
        spent += time.perf_counter() - t0
        if not plots_due:
            plots_due = True
            wait = max(PLOTS_AFTER_S, last_plots + PUSH_GAP_S - clock())
            doc.add_timeout_callback(plots, round(wait * 1000))

    def plots() -> None:
        nonlocal plots_due, last_plots, spent
        plots_due, last_plots = False, clock()
        t0 = time.perf_counter()
        view.update_plots()
        view.c.session_seconds.append(spent + time.perf_counter() - t0)  # in refresh_stats: the bench's session cost
        spent = 0.0

    def push() -> None:
        nonlocal text_due
        if not text_due:
            text_due = True
            doc.add_next_tick_callback(text)

    return push
