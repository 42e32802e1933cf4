"""The page's latest incident: what the watchdog captured before its last restart/give-up, stuck thread first.

Reads ``<run_dir>/incidents`` through keel.watch.incidents (the one place that knows
the layout). Only the newest bundle's name is listed each refresh; its summary is read
again only when that name changes, so an idle page costs one directory listing.
"""

from __future__ import annotations

from typing import Any

from bokeh.document import Document
from bokeh.models import Div

from keel.watch.incidents import load_incident, newest_bundle

from dashboard.present import esc

REFRESH_MS = 2000
MAX_FRAMES = 12


def incident_html(summary: dict[str, Any] | None) -> str:
    """The panel's HTML: header line, the stuck thread's frames (innermost first), the bundle's path."""
    if summary is None:
        return "<b>Latest incident</b>: none"
    v = summary.get("verdict") or {}
    stuck = summary.get("stuck") or {}
    where = (f"stuck in <code>{esc(stuck.get('function'))}</code> at <code>{esc(stuck.get('file'))}:"
             f"{esc(stuck.get('line'))}</code>") if stuck.get("function") else "no stacks captured"
    frames = "\n".join(esc(f) for f in (stuck.get("frames") or [])[:MAX_FRAMES])
    return (f"<b>Latest incident</b> {esc(summary.get('id'))}: {esc(summary.get('process'))} "
            f"{esc(v.get('rule'))} ({esc(v.get('reason'))}), action {esc(summary.get('action'))}; {where}"
            f"<pre class='keel-incident-stack'>{frames}</pre>"
            f"<div>bundle: <code>{esc(summary.get('path'))}</code></div>")


class IncidentPanel:
    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.div = Div(name="incident", css_classes=["keel-incident"], sizing_mode="stretch_width",
                       text=incident_html(None))
        self.div.syncable = False  # the browser never changes it: nothing to send back (like the page's models)
        self._newest: str | None = None

    def refresh(self) -> None:
        newest = newest_bundle(self.run_dir)
        if newest == self._newest:
            return
        self._newest = newest
        summary = None
        if newest is not None:
            try:
                summary = load_incident(self.run_dir, newest)[0]
            except (LookupError, OSError, ValueError) as exc:
                summary = {"id": newest, "stuck": None, "verdict": {"reason": f"unreadable: {exc}"}}
        self.div.text = incident_html(summary)


def mount_incident_panel(doc: Document, cfg: Any) -> IncidentPanel:
    """Add the panel to ``doc`` (its own root, below the page) and refresh it every 2 s."""
    panel = IncidentPanel(cfg.run_dir)
    panel.refresh()
    doc.add_root(panel.div)
    doc.add_periodic_callback(panel.refresh, REFRESH_MS)
    return panel
