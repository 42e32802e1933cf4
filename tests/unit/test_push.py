"""dashboard.push: when a session is sent its text and its plots."""

from __future__ import annotations

from types import SimpleNamespace

from dashboard.push import PLOTS_AFTER_S, PUSH_GAP_S, pusher


def test_a_sessions_text_goes_at_once_and_its_plots_at_most_once_a_push_gap_never_twice_for_one_news():

    class Doc:  # the two scheduling calls of a Bokeh Document, recorded
        def __init__(self):
            self.calls = []

        def add_next_tick_callback(self, cb):
            self.calls.append(("tick", None, cb))

        def add_timeout_callback(self, cb, ms):
            self.calls.append(("timeout", ms, cb))

    class View:
        def __init__(self, c):
            self.c, self.parts = c, []

        def update_text(self):
            self.parts.append("text")

        def update_plots(self):
            self.parts.append("plots")

    c = SimpleNamespace(session_seconds=[])  # the collector's list of session update times
    now = [100.0]
    doc, view = Doc(), View(c)
    push = pusher(doc, view, clock=lambda: now[0])
    push()
    push()  # one text pending at a time: news before the text went is in it
    assert [k for k, _, _ in doc.calls] == ["tick"]
    doc.calls.pop()[2]()
    assert view.parts == ["text"]  # the text goes first, in a message of its own
    kind, ms, plots = doc.calls.pop()
    assert kind == "timeout" and ms == round(PLOTS_AFTER_S * 1000)
    push()  # news after the text went, before the plots: its text goes at once, on the next tick
    kind, _, text = doc.calls.pop()
    assert kind == "tick" and doc.calls == []
    text()
    assert view.parts == ["text", "text"] and doc.calls == []  # its lines go with the plots already due
    now[0] += PUSH_GAP_S / 4
    plots()
    assert view.parts == ["text", "text", "plots"] and len(c.session_seconds) == 1
    assert doc.calls == []  # nothing dropped, and no second repaint of the plots for it
    push()  # news soon after the plots went: its text at once, its plots at the end of the gap
    doc.calls.pop()[2]()
    kind, ms, plots = doc.calls.pop()
    assert view.parts == ["text", "text", "plots", "text"]
    assert kind == "timeout" and abs(ms - PUSH_GAP_S * 1000) <= 1.5 and doc.calls == []
    now[0] += PUSH_GAP_S
    plots()
    assert view.parts == ["text", "text", "plots", "text", "plots"]
    now[0] += 2 * PUSH_GAP_S
    push()  # long after: the text at once, the plots PLOTS_AFTER_S after it
    doc.calls.pop()[2]()
    assert doc.calls[-1][:2] == ("timeout", round(PLOTS_AFTER_S * 1000))
