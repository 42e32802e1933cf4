"""The page's latest incident: what the watchdog captured before its last restart/give-up, stuck thread first.

The collector reads the newest bundle's summary (dashboard.rundir, through keel.watch.incidents,
the one place that knows the layout) off the event loop, only when a new bundle appears; the
panel redraws only when the collector's ``incident_serial`` moves.
"""

from __future__ import annotations

from typing import Any

from bokeh.document import Document

from keel.watch.incidents import stuck_words

from dashboard.markup import text_div
from dashboard.present import esc

MAX_FRAMES = 12


def incident_html(summary: dict[str, Any] | None) -> str:
    """The panel's HTML: header line, the stuck thread's frames (innermost first), the bundle's path."""
    if summary is None:
        return "<b>Latest incident</b>: none"
    if "error" in summary:
        return f"<b>Latest incident</b> {esc(summary.get('id'))}: {esc(summary['error'])}"
    v = summary.get("verdict") or {}
    stuck = summary.get("stuck") or {}
    frames = "\n".join(esc(f) for f in (stuck.get("frames") or [])[:MAX_FRAMES])
    return (f"<b>Latest incident</b> {esc(summary.get('id'))}: {esc(summary.get('process'))} "
            f"{esc(v.get('rule'))} ({esc(v.get('reason'))}), action {esc(summary.get('action'))}; "
            f"<code>{esc(stuck_words(stuck))}</code>"
            f"<pre class='keel-incident-stack'>{frames}</pre>"
            f"<div>bundle: <code>{esc(summary.get('path'))}</code></div>")


class IncidentPanel:
    def __init__(self, collector: Any) -> None:
        self.collector = collector
        self.div = text_div(name="incident", css_classes=["keel-incident"], sizing_mode="stretch_width",
                       text=incident_html(None))
        self.div.syncable = False  # the browser never changes it: nothing to send back (like the page's models)
        self._seen = -1

    def refresh(self) -> None:
        if self.collector.incident_serial == self._seen:
            return
        self._seen = self.collector.incident_serial
        self.div.text = incident_html(self.collector.incident)


def mount_incident_panel(doc: Document, panel: IncidentPanel) -> IncidentPanel:
    """Put ``panel`` into ``doc``, refreshed from the collector's state; the caller adds ``panel.div`` (its
    own root, below the page)."""
    panel.refresh()
    doc.add_periodic_callback(panel.refresh, int(panel.collector.cfg.refresh * 1000))
    return panel
