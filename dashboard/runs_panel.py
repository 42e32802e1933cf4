"""The page's runs panel: past runs in a table, any of them overlaid on the live curves, one pinned as baseline.

Rows come from the run archive (keel.status.runs) of every trainer in keel.json. The
panel re-lists it only when a cheap stat check (the mtime of each trainer's archive dir
and of every run.json, ~20 stats) sees a change, on its own timer, so the collector's
loop is untouched.

Selecting rows overlays those runs (`overlay(label, records)`); the Select below the
table pins one as the baseline (`overlay(label, records, baseline=True)`). The pin is
kept in the browser's localStorage, not on the server: a pin is one viewer's reading
aid, so two people comparing against different baselines do not overwrite each other,
and the dashboard (often another user, read-only on the run dir) needs no write access.
On page load a CustomJS restores it from localStorage, and the value syncs back to
this session, which draws it.

The overlays go to the training plots' `overlay`/`clear_overlay` (dashboard/training_plots.py)
when the page hands them in; otherwise a plain line per run is drawn on the loss figure.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

from bokeh.document import Document
from bokeh.layouts import column
from bokeh.models import ColumnDataSource, CustomJS, DataTable, Div, Select, TableColumn

from keel.status.runs import RUN_COLUMNS, SUMMARY_FILE, RunSummary, list_runs, read_metrics, run_row, runs_root

log = logging.getLogger("dashboard.runs")

FIELDS = ("id", "trainer", "started", "steps", "loss", "best", "val", "best_val", "digest", "end")
WIDTHS = (110, 80, 150, 60, 70, 70, 70, 70, 110, 200)
REFRESH_MS = 2000
BASELINE_NONE = ""


def overlay_label(run_id: str) -> str:
    """The one name of a run's overlay (the plots' key and the line's name)."""
    return f"run {run_id}"


class LineOverlays:
    """A loss line per overlaid run on one figure: used until the page hands in the training plots."""

    def __init__(self, fig: Any) -> None:
        self.fig = fig
        self._lines: dict[str, Any] = {}

    def overlay(self, label: str, records: list[dict], *, baseline: bool = False) -> None:
        self.clear_overlay(label)
        pts = [(r["step"], r["loss"]) for r in records
               if "event" not in r and isinstance(r.get("step"), int) and isinstance(r.get("loss"), (int, float))]
        src = ColumnDataSource({"x": [p[0] for p in pts], "y": [p[1] for p in pts]}, name=f"overlay:{label}:loss")
        self._lines[label] = self.fig.line(
            "x", "y", source=src, name=f"overlay:{label}", line_width=2 if baseline else 1.5,
            line_dash="dashed" if baseline else "solid", color="black" if baseline else "grey", alpha=0.8,
        )

    def clear_overlay(self, label: str) -> None:
        line = self._lines.pop(label, None)
        if line is not None and line in self.fig.renderers:
            self.fig.renderers = [r for r in self.fig.renderers if r is not line]


class RunsPanel:
    """One session's runs table, overlay selection and baseline pin."""

    def __init__(self, doc: Document, run_dir: str, trainers: list[str], plots: Any, *, storage_key: str,
                 read: Callable[[Any, str], list[dict]] = read_metrics) -> None:
        self.doc = doc
        self.roots = [runs_root(run_dir, t) for t in trainers]
        self.plots = plots
        self._read = read
        self._signature: tuple = ()
        self._runs: list[RunSummary] = []
        self._overlaid: set[str] = set()
        self._baseline: str | None = None
        self.source = ColumnDataSource({f: [] for f in FIELDS}, name="runs")
        cols = [TableColumn(field=f, title=t.lower(), width=w) for f, t, w in zip(FIELDS, RUN_COLUMNS, WIDTHS)]
        self.table = DataTable(source=self.source, columns=cols, name="runs_table", index_position=None, height=180,
                               sizing_mode="stretch_width", row_height=24, autosize_mode="none", selectable=True)
        self.baseline = Select(title="baseline (kept in this browser)", value=BASELINE_NONE,
                               options=[(BASELINE_NONE, "none")], name="runs_baseline", width=260)
        self.baseline.js_on_change("value", CustomJS(args={"key": storage_key}, code="""
            try { localStorage.setItem(key, cb_obj.value) } catch (e) {}"""))
        doc.js_on_event("document_ready", CustomJS(args={"sel": self.baseline, "key": storage_key}, code="""
            let v = null
            try { v = localStorage.getItem(key) } catch (e) {}
            const known = sel.options.some(o => (Array.isArray(o) ? o[0] : o) === v)
            if (v && known && sel.value !== v) sel.value = v"""))
        self.source.selected.on_change("indices", lambda attr, old, new: self._select(new))
        self.baseline.on_change("value", lambda attr, old, new: self._pin(new))
        self.layout = column(Div(text="<b>Runs</b> (select rows to overlay them on the loss curve)"), self.table,
                             self.baseline, sizing_mode="stretch_width", name="runs_panel")
        # Only what the viewer chooses comes back from the browser (as the page's other models, the
        # rest is never sent back: auto-ranging and table repaints would otherwise echo to the server).
        self.synced = (self.source.selected, self.baseline)
        for model in self.layout.references():
            model.syncable = model in self.synced
        self.refresh()

    def _stat_signature(self) -> tuple:
        sig = []
        for root in self.roots:
            try:
                sig.append((str(root), os.stat(root).st_mtime_ns))
                for name in sorted(os.listdir(root)):
                    try:
                        sig.append((name, os.stat(root / name / SUMMARY_FILE).st_mtime_ns))
                    except OSError:
                        pass
            except OSError:
                sig.append((str(root), None))
        return tuple(sig)

    def refresh(self) -> None:
        """Re-list the archive when a stat says it changed; keeps the selection by run id."""
        sig = self._stat_signature()
        if sig == self._signature:
            return
        self._signature = sig
        runs = sorted((s for root in self.roots for s in list_runs(root)), key=lambda s: s.started, reverse=True)
        selected = {self._runs[i].id for i in self.source.selected.indices if i < len(self._runs)}
        self._runs = runs
        rows = [run_row(s) for s in runs]
        self.source.data = {f: [r[i] for r in rows] for i, f in enumerate(FIELDS)}
        self.source.selected.indices = [i for i, s in enumerate(runs) if s.id in selected]
        self.baseline.options = [(BASELINE_NONE, "none")] + [(s.id, f"{s.id} ({s.trainer})") for s in runs]

    def _root_of(self, run_id: str) -> Any:
        return next(runs_root_dir for runs_root_dir in self.roots if (runs_root_dir / run_id).is_dir())

    def _records(self, run_id: str) -> list[dict]:
        try:
            return self._read(self._root_of(run_id), run_id)
        except (StopIteration, OSError, ValueError) as e:
            log.warning("cannot read run %s: %s", run_id, e)
            return []

    def _select(self, indices: list[int]) -> None:
        wanted = {self._runs[i].id for i in indices if i < len(self._runs)}
        for run_id in sorted(self._overlaid - wanted):
            if run_id != self._baseline:
                self.plots.clear_overlay(overlay_label(run_id))
        for run_id in sorted(wanted - self._overlaid):
            if run_id != self._baseline:
                self.plots.overlay(overlay_label(run_id), self._records(run_id))
        self._overlaid = wanted

    def _pin(self, run_id: str) -> None:
        old, self._baseline = self._baseline, run_id or None
        if old and old not in self._overlaid:
            self.plots.clear_overlay(overlay_label(old))
        if old and old in self._overlaid:
            self.plots.overlay(overlay_label(old), self._records(old))
        if self._baseline:
            self.plots.overlay(overlay_label(self._baseline), self._records(self._baseline), baseline=True)


def mount_runs_panel(doc: Document, cfg: Any, plots: Any) -> RunsPanel:
    """Build the panel for the page's trainers, add it as a root of `doc`, refresh it on its own timer.

    `plots` is the training plots (with overlay/clear_overlay) or the loss figure."""
    trainers = [p.name for p in cfg.processes if p.kind == "trainer"]
    target = plots if hasattr(plots, "overlay") else LineOverlays(plots)
    panel = RunsPanel(doc, cfg.run_dir, trainers, target, storage_key=f"keel.baseline.{cfg.project}.{cfg.environment}")
    doc.add_root(panel.layout)
    doc.add_periodic_callback(panel.refresh, REFRESH_MS)
    return panel
