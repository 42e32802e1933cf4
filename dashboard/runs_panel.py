"""The page's runs panel: past runs in a table, any of them overlaid on the live curves, one pinned as baseline.

Rows come from the run archive (keel.status.runs) of every trainer in keel.json, as the
collector read it (off the event loop, when a stat says it changed: dashboard.rundir);
the panel redraws its table only when the collector's ``runs_serial`` moves. An
overlay's records are read in the collector's blocking runner too, not on the loop.

Selecting rows overlays those runs (`overlay(label, records)`); the Select below the
table pins one as the baseline (`overlay(label, records, baseline=True)`). The pin is
kept in the browser's localStorage, not on the server: a pin is one viewer's reading
aid, so two people comparing against different baselines do not overwrite each other,
and the dashboard (often another user, read-only on the run dir) needs no write access.
On page load a CustomJS restores it from localStorage, and the value syncs back to
this session, which draws it.

The overlays go to the training plots' `overlay`/`clear_overlay` (dashboard/training_plots.py).
"""

from __future__ import annotations

import logging
from typing import Any

from bokeh.document import Document
from bokeh.layouts import column
from bokeh.models import ColumnDataSource, CustomJS, DataTable, Select, TableColumn

from keel.status.runs import RUN_COLUMNS, RunSummary, run_row

from dashboard.markup import text_div

log = logging.getLogger("dashboard.runs")

FIELDS = ("id", "trainer", "started", "steps", "loss", "best", "val", "best_val", "digest", "end")
WIDTHS = (110, 80, 150, 60, 70, 70, 70, 70, 110, 200)
BASELINE_NONE = ""
# The table is as tall as its runs, up to this many rows (more scroll): a fixed height left a live run's
# one row above an empty box as tall as the loss plot's controls.
ROWS_SHOWN = 8
ROW_HEIGHT = 24


def table_height(runs: int) -> int:
    """Pixels for a table of ``runs`` rows: the header and at least two rows (an empty table still reads as one)."""
    return 30 + ROW_HEIGHT * min(max(runs, 2), ROWS_SHOWN)


def overlay_label(run_id: str) -> str:
    """The one name of a run's overlay (the plots' key and the line's name)."""
    return f"run {run_id}"


class RunsPanel:
    """One session's runs table, overlay selection and baseline pin."""

    def __init__(self, collector: Any, plots: Any, *, storage_key: str) -> None:
        self.doc: Document | None = None  # the session's, once mounted (mount_runs_panel)
        self.storage_key = storage_key
        self.collector = collector
        self.plots = plots
        self._seen = -1  # the collector's runs_serial last drawn
        self._runs: list[RunSummary] = []
        self._overlaid: set[str] = set()
        self._baseline: str | None = None
        self.source = ColumnDataSource({f: [] for f in FIELDS}, name="runs")
        cols = [TableColumn(field=f, title=t.lower(), width=w) for f, t, w in zip(FIELDS, RUN_COLUMNS, WIDTHS)]
        self.table = DataTable(source=self.source, columns=cols, name="runs_table", index_position=None,
                               height=table_height(0), sizing_mode="stretch_width", row_height=ROW_HEIGHT,
                               autosize_mode="none", selectable=True)
        self.baseline = Select(title="baseline (kept in this browser)", value=BASELINE_NONE,
                               options=[(BASELINE_NONE, "none")], name="runs_baseline", width=260)
        self.baseline.js_on_change("value", CustomJS(args={"key": storage_key}, code="""
            try { localStorage.setItem(key, cb_obj.value) } catch (e) {}"""))
        self.source.selected.on_change("indices", lambda attr, old, new: self._select(new))
        self.baseline.on_change("value", lambda attr, old, new: self._pin(new))
        title = text_div(text="<b>Runs</b> (select rows to overlay them on the loss curve)")
        self.layout = column(title, self.table, self.baseline, sizing_mode="stretch_width", name="runs_panel")
        # Only what the viewer chooses comes back from the browser (as the page's other models, the
        # rest is never sent back: auto-ranging and table repaints would otherwise echo to the server).
        self.synced = (self.source.selected, self.baseline)
        for model in self.layout.references():
            model.syncable = model in self.synced
        self.refresh()

    def refresh(self) -> None:
        """Redraw the table when the collector read a changed archive; keeps the selection by run id."""
        if self.collector.runs_serial == self._seen:
            return
        self._seen = self.collector.runs_serial
        runs = list(self.collector.runs)
        selected = {self._runs[i].id for i in self.source.selected.indices if i < len(self._runs)}
        self._runs = runs
        rows = [run_row(s) for s in runs]
        self.source.data = {f: [r[i] for r in rows] for i, f in enumerate(FIELDS)}
        self.table.height = table_height(len(rows))
        self.source.selected.indices = [i for i, s in enumerate(runs) if s.id in selected]
        self.baseline.options = [(BASELINE_NONE, "none")] + [(s.id, f"{s.id} ({s.trainer})") for s in runs]

    def _show(self, run_id: str, *, baseline: bool = False) -> None:
        """Overlay ``run_id``: its records are read in the collector's blocking runner, then drawn."""
        trainer = next((s.trainer for s in self._runs if s.id == run_id), None)
        if trainer is None:
            return

        async def read_and_draw() -> None:
            try:
                records = await self.collector.runner.run(self.collector.reader.run_records, trainer, run_id,
                                                          timeout=self.collector.cfg.read_timeout, what=f"run {run_id}")
            except Exception as e:  # noqa: BLE001 - a run that cannot be read is no overlay, and says so
                log.warning("cannot read run %s: %s", run_id, e)
                return
            self.plots.overlay(overlay_label(run_id), records, baseline=baseline)

        if self.doc is not None:
            self.doc.add_next_tick_callback(read_and_draw)

    def _select(self, indices: list[int]) -> None:
        wanted = {self._runs[i].id for i in indices if i < len(self._runs)}
        for run_id in sorted(self._overlaid - wanted):
            if run_id != self._baseline:
                self.plots.clear_overlay(overlay_label(run_id))
        for run_id in sorted(wanted - self._overlaid):
            if run_id != self._baseline:
                self._show(run_id)
        self._overlaid = wanted

    def _pin(self, run_id: str) -> None:
        old, self._baseline = self._baseline, run_id or None
        if old and old not in self._overlaid:
            self.plots.clear_overlay(overlay_label(old))
        if old and old in self._overlaid:
            self._show(old)
        if self._baseline:
            self._show(self._baseline, baseline=True)


def runs_panel(collector: Any, plots: Any) -> RunsPanel:
    """The panel for the page's trainers (``plots``: the TrainingPlots), not yet in a Document."""
    cfg = collector.cfg
    return RunsPanel(collector, plots, storage_key=f"keel.baseline.{cfg.project}.{cfg.environment}")


def mount_runs_panel(doc: Document, panel: RunsPanel) -> RunsPanel:
    """Put ``panel`` into ``doc``: the baseline pin restored from the browser's localStorage when the page
    is ready, the table refreshed after each of the collector's refreshes (it reads only the collector's
    state); the caller adds ``panel.layout``."""
    panel.doc = doc
    doc.js_on_event("document_ready", CustomJS(args={"sel": panel.baseline, "key": panel.storage_key}, code="""
        let v = null
        try { v = localStorage.getItem(key) } catch (e) {}
        const known = sel.options.some(o => (Array.isArray(o) ? o[0] : o) === v)
        if (v && known && sel.value !== v) sel.value = v"""))
    panel.refresh()
    doc.add_periodic_callback(panel.refresh, int(panel.collector.cfg.refresh * 1000))
    return panel
