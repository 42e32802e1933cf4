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
# The plots follow the text by this much. A browser applies a new status text in a few ms, but shows it
# only with its next frame, and a frame after new points also repaints their plots: ~0.1 s of canvas work
# per update in a headless Chromium (measured: the text was in the DOM at 0.055 s median after the write,
# on screen at 0.124 s; the repaints were the page's long tasks). Sent apart, the text gets a frame of its
# own first; the lines come 0.04 s later.
PLOTS_AFTER_S = 0.04


def pusher(doc: Document, view: Any, clock: Callable[[], float] = time.monotonic) -> Callable[[], None]:
    """A collector listener that runs ``view.update_text`` (a dashboard.page.SessionView) on the session's
    next tick (under its document lock), then ``view.update_plots`` PLOTS_AFTER_S later; at most one
    pending at a time however far the loop has fallen behind, and at most one per PUSH_GAP_S.

    News is never dropped, and never costs a second repaint of the plots: news that comes before the text
    went is in it; news that comes between the text and the plots (a trainer's metrics and status writes,
    or a write and the refresh, a few ms apart) has its text sent with the plots, in the same update
    (before, it got an update of its own after them: every tab repainted its plots twice a second); news
    after the plots went is the next update."""
    pending = False
    text_went = False  # this update's text has gone: news now is sent with its plots
    news = False  # news came after the text went
    last = -PUSH_GAP_S
    spent = 0.0  # this update's server time so far (text, then plots)

    def run() -> None:
        nonlocal last, spent, text_went
        last, text_went = clock(), True
        t0 = time.perf_counter()
        view.update_text()
        spent = time.perf_counter() - t0
        doc.add_timeout_callback(plots, int(PLOTS_AFTER_S * 1000))

    def plots() -> None:
        nonlocal pending, text_went, news
        t0 = time.perf_counter()
        if news:
            view.update_text()
        view.update_plots()
        view.c.session_seconds.append(spent + time.perf_counter() - t0)  # in refresh_stats: the bench's session cost
        pending = text_went = news = False

    def push() -> None:
        nonlocal pending, news
        if pending:
            news = news or text_went
            return
        pending = True
        wait = last + PUSH_GAP_S - clock()
        if wait > 0:
            doc.add_timeout_callback(run, int(wait * 1000) + 1)
        else:
            doc.add_next_tick_callback(run)

    return push
