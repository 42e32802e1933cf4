"""``make_doc(doc, collector)``: one browser session's Document, from its first roots to its end.

The session's models are a ``SessionView`` (dashboard.page) with the runs and incident panels, made by
``build_page`` (ahead of the tab, by dashboard.spare, or there and then); ``make_doc`` brings them up to
date, puts them into the Document, the lead first, and ties the session's updates (the collector's push,
a timer) to its life.
"""

from __future__ import annotations

from typing import Any, Callable

from bokeh.document import Document
from bokeh.events import DocumentReady

from dashboard.collector import Collector
from dashboard.incident_panel import IncidentPanel, mount_incident_panel
from dashboard.page import SessionView
from dashboard.push import pusher
from dashboard.runs_panel import mount_runs_panel, runs_panel

# The rest of a new tab's page comes at the browser's DocumentReady, or this long after the page was
# built should it never come (a browser that cannot lay out the lead still gets the whole page).
REST_AFTER_S = 3.0


def build_page(collector: Collector) -> SessionView:
    """A page's models, in no Document yet: the view with its runs panel (past runs: a table, overlays on
    the loss curve, a baseline pin; dashboard/runs_panel.py) and incident panel (dashboard/incident_panel.py)."""
    view = SessionView(collector)
    view.runs = runs_panel(collector, view.plots)
    view.incident = IncidentPanel(collector)
    return view


def make_doc(doc: Document, collector: Collector, view: SessionView | None = None,
             served: Callable[[], None] | None = None) -> SessionView:
    """Put a page into ``doc`` (``view``, built ahead by ``build_page``, or one built now) and start its
    per-session updates; ``served`` is called once the whole page is in ``doc``. Returns the view (for tests).

    A browser's page gets the lead first (``SessionView.lead``, then the runs panel: its overlays are on
    the loss curve) and the rest of the page when BokehJS says the lead is on screen (its DocumentReady
    event), or REST_AFTER_S after the page was built should that never come: a new tab's browser builds
    and lays out every root before it paints any (measured with the CDP profiler: 1.2 s of script before
    the loss line showed, 0.4 s of it building views, 0.3 s laying out). A bare Document (tests, an
    export) gets everything at once."""
    if view is None:
        view = build_page(collector)  # up to date: its constructor ran the update
    else:
        view.update()  # a view built ahead holds what the collector held then
    view.doc = doc
    doc.title = f"{collector.cfg.project} · {collector.cfg.environment}"
    mount_runs_panel(doc, view.runs)
    mount_incident_panel(doc, view.incident)
    rest = [*view.rest, view.incident.div]

    def add(roots: list[Any]) -> None:
        # Each add_root recounts the document's models (~0.05 s for this page): frozen, ~20 roots are
        # counted once (a new tab's document took 1.0 s to build with a 1,000,000-row stream; 0.3 s frozen).
        with doc.models.freeze():
            for root in roots:
                doc.add_root(root)

    def add_rest(*_: Any) -> None:
        if rest:
            add(rest[:])
            rest.clear()
            if served is not None:
                served()

    add([*view.lead, view.runs.layout])
    if doc.session_context is None:
        add_rest()
    else:
        doc.on_event(DocumentReady, add_rest)
        doc.add_timeout_callback(add_rest, int(REST_AFTER_S * 1000))
    collector.sessions += 1
    # New data arrives by the push; the timer keeps the header honest when the reader stalls. The timer
    # goes through the same push: on its own it sent text and plots in one message, at its own phase, and
    # a step sent with them showed only after their repaint.
    push = pusher(doc, view) if doc.session_context is not None else None
    callback = doc.add_periodic_callback(push or view.update, int(collector.cfg.refresh * 1000))
    unsubscribe = collector.subscribe(push) if push is not None else None

    def _destroyed(session_context: Any) -> None:
        collector.sessions = max(0, collector.sessions - 1)
        if unsubscribe is not None:
            unsubscribe()
        try:
            doc.remove_periodic_callback(callback)
        except Exception:  # noqa: BLE001 - Bokeh may have torn the document down already
            pass

    doc.on_session_destroyed(_destroyed)
    return view
