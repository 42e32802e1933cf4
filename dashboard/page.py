"""The page: ``SessionView``, one browser session's models (put into its Document by dashboard.document).

Each session keeps its own data sources and sends only what changed since its last
update (pushed after each collector cycle): new resource points through
``ColumnDataSource.stream(..., rollover=history_points)``, changed table cells through
``patch``, Div text only when it differs, and a training line's new points streamed onto it
(drawn whole again, once for every session, after a resume or TAIL_MAX new rows:
dashboard.training_plots). The text is pushed at once, the plots at most once per PUSH_GAP_S
(dashboard.push). It reads the shared ``Collector`` (same event loop, no locks) and never touches the
run dir: the panels too read what the collector read off the loop (dashboard.rundir).
"""

from __future__ import annotations

import logging
from typing import Any

from bokeh.document import Document
from bokeh.layouts import column, row
from bokeh.model.util import collect_models
from bokeh.models import ColumnDataSource, CustomJS, DataTable, Div, Line, StringFormatter, TableColumn
from bokeh.palettes import Category10_10
from bokeh.plotting import figure

from dashboard.markup import text_div
from dashboard.training_plots import TrainingPlots
from dashboard.collector import RESOURCE_COLUMNS, Collector, gpu_column, proc_column
from dashboard.present import (
    BAD, DEFAULT_HEARTBEAT_TIMEOUT, GREY, OK, ROW_COLUMNS, WARN, badge, esc, fmt_age, fmt_num, key_html, pre_html,
    status_kind, training_summary,
)

log = logging.getLogger("dashboard.page")

_TABLE_FIELDS = (
    ("name", "process", 130), ("kind", "kind", 70), ("state", "state", 90), ("pid", "pid", 70),
    ("uptime", "uptime", 70), ("restarts", "restarts", 60), ("health", "health", 90),
    ("heartbeat", "heartbeat age", 90), ("progress", "progress age", 90), ("writes", "failed writes", 80),
    ("note", "note", 330),
)
_OVERALL_LEVEL = {"ok": OK, "degraded": WARN, "failing": BAD}
# Lines per plot. Every stream is read and listed in the table, but 64 torchrun ranks
# drawn as 64 lines are unreadable, and each line costs every session a model and a
# websocket message per refresh. The first ones by name (rank 0 first) are drawn.
MAX_PLOTTED = 8


def _fig(title: str, x_label: str, *, datetime_x: bool = False, name: str) -> Any:
    kw: dict[str, Any] = {"x_axis_type": "datetime"} if datetime_x else {}
    f = figure(title=title, height=230, sizing_mode="stretch_width", tools="pan,wheel_zoom,box_zoom,reset,save",
               name=name, **kw)
    f.xaxis.axis_label = x_label
    f.toolbar.logo = None
    return f


class SessionView:
    """One browser session's models, and the update that feeds them from the collector."""

    def __init__(self, collector: Collector) -> None:
        # The session's Document, once the view is put into one (dashboard.document make_doc): a view is
        # built before its tab asks for it (dashboard.spare), and a bare one draws like a connected one.
        self.doc: Document | None = None
        self.c = collector
        cfg = collector.cfg
        self.rollover = cfg.history_points
        self.header = text_div(name="header", css_classes=["keel-header"], sizing_mode="stretch_width")
        self.errors = text_div(name="errors", css_classes=["keel-errors"], sizing_mode="stretch_width")
        self.table_source = ColumnDataSource(dict(collector.rows) or _empty_rows(), name="processes")
        cols = [
            # plain-text cells coloured from a column: no per-cell template to run in the browser
            TableColumn(field=f, title=t, width=w,
                        formatter=StringFormatter(text_color="health_color", font_style="bold") if f == "health"
                        else StringFormatter(text_color="color"))
            for f, t, w in _TABLE_FIELDS
        ]
        # autosize_mode "none": the widths above stand, instead of a column-fitting pass
        # (a forced layout) on every repaint of the table.
        self.table = DataTable(source=self.table_source, columns=cols, name="process_table", index_position=None,
                               height=60 + 28 * max(3, len(self.table_source.data["name"])),
                               sizing_mode="stretch_width", row_height=26, autosize_mode="none")
        # BokehJS's DataTable redraws on a new data dict but not on a same-length patch
        # (its CDSView indices do not change); poke the view so patched cells repaint.
        self.table_source.js_on_change("patching", CustomJS(args={"table": self.table},
                                                            code="table.view.change.emit()"))
        self.training = text_div(name="training", css_classes=["keel-training"], sizing_mode="stretch_width")
        # Which colour is which stream/process: one line of HTML each, rewritten only when a
        # line is added. Bokeh legends drawn on the canvas cost every repaint of every plot.
        self.training_key = text_div(name="training_key", css_classes=["keel-key"], sizing_mode="stretch_width")
        self.resources_key = text_div(name="resources_key", css_classes=["keel-key"], sizing_mode="stretch_width")
        self._training_keys: list[tuple[str, str]] = []
        self._resource_keys: list[tuple[str, str]] = [("black", "host (RAM % dashed)")]
        self._set(self.resources_key, key_html(self._resource_keys))
        self.plots = TrainingPlots()  # the training figures and their reading tools (dashboard.training_plots)
        self.cpu = _fig("CPU % (host and processes)", "time", datetime_x=True, name="cpu_plot")
        self.ram = _fig("RSS MiB per process; host RAM % (dashed)", "time", datetime_x=True, name="ram_plot")
        self.gpu = _fig("GPU utilization % (line), memory % (dashed)", "time", datetime_x=True, name="gpu_plot")
        self.gpu_note = text_div(name="gpu_note", css_classes=["keel-gpu-note"], sizing_mode="stretch_width")
        self.events = text_div(name="events", css_classes=["keel-events"], sizing_mode="stretch_width")
        self.logs = text_div(name="logs", css_classes=["keel-logs"], sizing_mode="stretch_width")
        self.update_error = text_div(name="update_error", visible=False)
        self._sent: dict[str, int] = {}
        self._event_serial = -1
        self._event_lines: list[str] = []
        self._generation = self._plots_generation = -1  # the collector generation each part last drew
        self._failed: dict[str, str] = {}  # update part -> why it failed (shown until it succeeds again)
        # Host, process and GPU lines all read this one source (one row per sample).
        self.resources_source = ColumnDataSource(collector.resources.data(RESOURCE_COLUMNS),
                                                 name="resources")
        self._sent["resources"] = collector.resources.last_serial
        self._resource_columns: list[str] = list(RESOURCE_COLUMNS)
        self._plotted_proc_names: list[str] = []
        self._plotted_gpus: list[int] = []
        _line(self.cpu, self.resources_source, "t", "host_cpu", "black", line_width=2)
        _line(self.ram, self.resources_source, "t", "host_mem_pct", "black", line_dash="dashed")
        # Each part of the page is a root of its own, in this order. BokehJS lays out a whole root again
        # whenever a Div's text or a table's cells change: with the page as one root, every update (a new
        # step in the training line, new ages in the table) re-measured every plot and widget, ~0.1 s of
        # the browser's main thread each (measured with the CDP profiler: 98 % busy at 10 updates a
        # second). Apart, a change re-measures its own part.
        # ``lead``: what a person reads first (the verdict, the processes, the training text, the loss curve),
        # drawn before the rest (dashboard.document).
        self.lead = [self.header, self.errors, self.table, self.training, self.training_key, *self.plots.lead]
        self.rest = [
            *self.plots.rest,
            self.resources_key,
            row(self.cpu, self.ram, column(self.gpu_note, self.gpu, sizing_mode="stretch_width"),
                sizing_mode="stretch_width"),
            text_div(text="<b>Watchdog events</b>", sizing_mode="stretch_width"), self.events,
            text_div(text="<b>Process logs</b>", sizing_mode="stretch_width"), self.logs, self.update_error,
        ]
        self.roots = [*self.lead, *self.rest]
        self.update()
        _unsynced(self.roots, keep=self.plots.synced)

    # ----------------------------------------------------------------- series

    def _stream(self, key: str, src: ColumnDataSource, hist: Any, columns: list[str] | None = None) -> None:
        last = self._sent.get(key, -1)
        if hist.last_serial == last:
            return
        new = hist.since(last, columns)
        if new and len(next(iter(new.values()))):
            src.stream(new, rollover=self.rollover)
        self._sent[key] = hist.last_serial

    def _update_resources(self) -> None:
        """Stream the new samples; when a process or GPU is first plotted, resend the source once."""
        c = self.c
        procs = [n for n in self._plotted_procs() if n not in self._plotted_proc_names]
        gpus = [i for i in sorted(c.gpus) if i not in self._plotted_gpus]
        if not procs and not gpus:
            self._stream("resources", self.resources_source, c.resources, self._resource_columns)
            return
        for name in procs:
            self._resource_columns += [proc_column("cpu", name), proc_column("rss_mb", name)]
        for index in gpus:
            self._resource_columns += [gpu_column("util", index), gpu_column("mem_pct", index)]
        # New columns cannot be streamed into an existing source; their lines need them first.
        self.resources_source.data = c.resources.data(self._resource_columns)
        self._sent["resources"] = c.resources.last_serial
        src = self.resources_source
        for name in procs:
            color = Category10_10[len(self._plotted_proc_names) % 10]
            self._plotted_proc_names.append(name)
            _line(self.cpu, src, "t", proc_column("cpu", name), color)
            _line(self.ram, src, "t", proc_column("rss_mb", name), color)
            self._resource_keys.append((color, name))
        for index in gpus:
            self._plotted_gpus.append(index)
            color = Category10_10[index % 10]
            label = f"GPU {index} {c.gpus.get(index, '')}".strip()
            _line(self.gpu, src, "t", gpu_column("util", index), color)
            _line(self.gpu, src, "t", gpu_column("mem_pct", index), color, line_dash="dashed")
            self._resource_keys.append((color, label))
        self._set(self.resources_key, key_html(self._resource_keys))

    # ----------------------------------------------------------------- update

    def update(self) -> None:
        """Send this session what changed since its last update; never raises into the loop."""
        self.update_text()
        self.update_plots()

    def update_text(self) -> None:
        """The header, table and text panels (what a person reads: the step, the verdicts); never raises."""
        self._guarded("text", self._update_text)

    def update_plots(self) -> None:
        """The training lines, their markers, and the resource lines; never raises."""
        self._guarded("plots", self._update_plots)

    def _guarded(self, name: str, part: Any) -> None:
        """Run one part of the update; its failure is shown until that part succeeds again (the other
        part succeeding says nothing about it)."""
        try:
            part()
            self._failed.pop(name, None)
        except Exception as exc:  # noqa: BLE001 - keep the page alive and say what broke
            log.exception("session update failed")
            self._failed[name] = f"page update failed: {type(exc).__name__}: {exc}"
        text = " ".join(badge(why, BAD) for _, why in sorted(self._failed.items()))
        if self.update_error.text != text:
            self.update_error.text = text
        if self.update_error.visible != bool(text):
            self.update_error.visible = bool(text)

    def _connected(self) -> bool:
        """False once the browser's websocket is gone: Bokeh keeps the session a while, but
        sending to it only fails (and logs) once per change. Bare Documents (tests) count as connected."""
        ctx = self.doc.session_context if self.doc is not None else None
        session = getattr(ctx, "session", None) if ctx is not None else None
        return session is None or session.connection_count > 0

    def _update_text(self) -> None:
        c = self.c
        if not self._connected():
            return  # the doc stays consistent: the next update sends everything since the last one
        self._set(self.header, self._header_html())
        if c.generation == self._generation:
            return
        self._generation = c.generation
        self._set(self.errors, self._derived("errors", lambda: "".join(
            f"<div>{badge('error', BAD)} <b>{esc(k)}</b>: {esc(v)}</div>" for k, v in sorted(c.errors.items())
        )))
        self._update_table(c.rows)
        self._set(self.training, self._derived("training", self._training_html))
        no_gpu = not c.gpus
        self._set(self.gpu_note, f"{badge('no GPU', WARN)} {esc(c.gpu_error or 'no GPU metrics')}" if no_gpu
                  else self._derived("gpu_note", self._gpu_readings_html))
        if self.gpu.visible == no_gpu:
            self.gpu.visible = not no_gpu
        new_events = c.events_since(self._event_serial)
        if new_events:
            self._event_serial = new_events[-1][0]
            self._event_lines = (self._event_lines + [line for _, line in new_events])[-50:]
        self._set(self.events, pre_html(list(reversed(self._event_lines))) if self._event_lines
                  else f"<i style='color:{GREY}'>no watchdog events yet</i>")
        self._set(self.logs, self._derived("logs", lambda: "".join(
            f"<div><b>{esc(name)}</b>{pre_html(lines, newest_last=True)}</div>" for name, lines in sorted(c.logs.items())
        ) or f"<i style='color:{GREY}'>no log files configured (no stack file?)</i>"))

    def _update_plots(self) -> None:
        c = self.c
        if not self._connected() or c.generation == self._plots_generation:
            return
        streams = sorted(c.metrics)[:MAX_PLOTTED]
        writers = {s: tuple(p.name for p in c.cfg.processes if s in p.status_names) for s in streams}
        if self.plots.update(c.metrics, streams, c.event_records, writers, c.frame) and \
                len(streams) != len(self._training_keys):
            self._training_keys = [(Category10_10[i % 10], n) for i, n in enumerate(streams)]
            self._set(self.training_key, key_html(self._training_keys))
        self._update_resources()
        self._plots_generation = c.generation  # after: a part that failed is drawn again at the next push

    def _derived(self, key: str, make: Any) -> str:
        """Text shared by all sessions for this collector generation."""
        value = self.c.derived.get(key)
        if value is None:
            value = self.c.derived[key] = make()
        return value

    def _gpu_readings_html(self) -> str:
        """Each GPU's latest temperature and power (sampled with the plotted series, not drawn)."""
        res = self.c.resources
        return " · ".join(
            f"GPU {i}: {fmt_num(res.latest(gpu_column('temp', i)), 3)} °C, "
            f"{fmt_num(res.latest(gpu_column('power', i)), 4)} W"
            for i in sorted(self.c.gpus)
        )

    def _plotted_procs(self) -> list[str]:
        """The processes this session plots: those it already plots, then the stack's processes
        (in keel.json order), then others, at most MAX_PLOTTED. A plotted line is never dropped."""
        order = [n for p in self.c.cfg.processes for n in p.status_names]
        rank = {n: i for i, n in enumerate(order)}
        candidates = sorted((n for n in self.c.procs if n not in self._plotted_proc_names),
                            key=lambda n: (rank.get(n, len(rank)), n))
        return (self._plotted_proc_names + candidates)[:MAX_PLOTTED]

    def _update_table(self, rows: dict[str, list]) -> None:
        if not rows:
            return
        data = self.table_source.data
        if list(data.get("name", [])) != rows["name"]:
            self.table_source.data = dict(rows)  # rows came or went: a patch cannot change the length
            self.table.height = 60 + 28 * max(3, len(rows["name"]))
            return
        patches: dict[str, list[tuple[int, Any]]] = {}
        for col, values in rows.items():
            old = data[col]
            changed = [(i, v) for i, v in enumerate(values) if old[i] != v]
            if changed:
                patches[col] = changed
        if patches:
            self.table_source.patch(patches)

    def _header_html(self) -> str:
        c, cfg = self.c, self.c.cfg
        level = _OVERALL_LEVEL.get(c.overall.label, WARN)
        age = c.refresh_age()
        if age is None:
            fresh = badge("waiting for the first read", WARN)
        elif age > max(3 * cfg.refresh, cfg.read_timeout + cfg.refresh):
            fresh = badge(f"data {fmt_age(age)} old: reader stuck", BAD)
        else:
            # Not the exact age: a header that changes every refresh costs every session a
            # message per refresh for nothing a reader needs.
            fresh = f"live, every {fmt_age(cfg.refresh)}"
        why = f" ({esc(c.overall.note)})" if c.overall.note else ""
        # Said, not hidden: without the watchdog's report the verdicts are judged here and restarts are unknown.
        if c.watchdog_why:
            why += f" · {badge(c.watchdog_why, WARN)}"
        return (
            f"<div style='font-size:120%'><b>{esc(cfg.project)}</b> · {esc(cfg.environment)} · "
            f"{esc(c.host_name)} · health {badge(c.overall.label, level)}{why} · {fresh} · "
            f"{c.sessions} session{'s' if c.sessions != 1 else ''}</div>"
        )

    def _training_html(self) -> str:
        c = self.c
        names = sorted({n for n, r in c.statuses.items() if status_kind(r) == "trainer"}
                       | {n for p in c.cfg.processes if p.kind == "trainer" for n in p.status_names})
        if not names:
            return f"<i style='color:{GREY}'>no trainer status yet</i>"
        timeouts = {n: p.heartbeat_timeout for p in c.cfg.processes for n in p.status_names}
        now = c.last_refresh_mono or 0.0
        more = ""
        if len(c.metrics) > MAX_PLOTTED:
            more = (f"<div style='color:{GREY}'>plots show {MAX_PLOTTED} of {len(c.metrics)} metric streams "
                    f"({esc(', '.join(sorted(c.metrics)[:MAX_PLOTTED]))}); the table lists every process</div>")
        return more + "".join(
            f"<div><b>{esc(n)}</b>: "
            f"{training_summary(c.statuses.get(n), now, timeouts.get(n) or DEFAULT_HEARTBEAT_TIMEOUT)}</div>"
            for n in names
        )

    @staticmethod
    def _set(div: Div, text: str) -> None:
        if div.text != text:
            div.text = text


def _line(fig: Any, source: ColumnDataSource, x: str, y: str, color: str, **visuals: Any) -> None:
    """A line without the non-selection and muted copies of its glyph that ``figure.line`` adds:
    nothing here selects or mutes, and every model costs each message a pass over the document.
    Not synced back, like the rest of the page (see ``_unsynced``)."""
    fig.add_glyph(source, Line(x=x, y=y, line_color=color, syncable=False, **visuals), syncable=False)


def _unsynced(roots: list[Any], keep: tuple[Any, ...] = ()) -> None:
    """The browser sends none of this page's models back but ``keep`` (what the viewer chooses): the
    server does not read them, and auto-ranging plots otherwise send new range bounds for every
    streamed point. One walk over all the roots (a walk per root visited the shared models again)."""
    for model in collect_models(*roots):
        model.syncable = model in keep


def _empty_rows() -> dict[str, list]:
    return {c: [] for c in ROW_COLUMNS}
