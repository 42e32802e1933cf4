"""The training figures of one browser session: per-metric continuous lines, lost work faint,
restarts marked, a debiased time-weighted EMA over the faint raw line (computed in the browser:
the slider needs no server round trip), a log/linear y toggle per plot, a min/max band where a
point stands for many, past runs overlaid (``overlay``), x as step, relative time or wall clock
(dashboard.xaxis), and a zoomed plot redrawn from the full-resolution rows of its visible range. Data
comes from the collector's full-resolution History; what is drawn is downsampled with MinMaxLTTB
(dashboard.curves)."""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable

import numpy as np
from bokeh.events import RangesUpdate, Reset
from bokeh.layouts import row
from bokeh.model.util import collect_models
from bokeh.models import (
    ColumnDataSource, CustomJS, CustomJSHover, CustomJSTransform, HoverTool, Line, LogScale, LogTicker,
    LogTickFormatter, Scatter, Select, Slider, Toggle, VArea,
)
from bokeh.palettes import Category10_10
from bokeh.plotting import figure
from bokeh.transform import transform

from dashboard import curve_events, curves, xaxis
from dashboard.history import History
from dashboard.smoothing import SMOOTH_JS

# metric -> (title, figure key); val_loss shares the loss plot
METRICS = (("loss", "loss"), ("val_loss", "loss"), ("samples_per_s", "throughput"), ("lr", "lr"))
FIGURES = (("loss", "loss and validation loss (dots)"), ("throughput", "throughput (samples/s)"),
           ("lr", "learning rate"))
METRICS_OF = {key: tuple(m for m, k in METRICS if k == key) for key, _ in FIGURES}
N_OUT = 2000  # points drawn per line: MinMaxLTTB keeps every spike of any length in these
# New rows are streamed onto the drawn lines as they are (a few points a message) until this many have
# come since the line was last downsampled whole; then it is downsampled again (and sent whole).
TAIL_MAX = 1000
_TOOLTIPS = [("run", "@run"), ("step", "@step{0,0}"), ("wall time", "@t{%F %T}"), ("value", "@y{raw}"),
             ("smoothed", "@y{smoothed}"), ("band", "@lo{0.0000g} to @hi{0.0000g}")]
# "@y{smoothed}" reads what the smoothed line drew at the hovered index (SMOOTH_JS stashes it by source name)
_VALUE_JS = """
const num = (v) => (v === null || v === undefined || !isFinite(v)) ? '-' : Number(v).toPrecision(5);
if (format !== 'smoothed') return num(value);
const s = (window.keel_smoothed || {})[source.name];
return s ? num(s[special_vars.index]) : '-';"""


_MARK_COLORS = {"resume": "red", "restart": "red", "gave_up": "black", "warning": "orange",
                "checkpoint": "green", "trainer": "purple"}


def _log_y_switch(fig: Any) -> CustomJS:
    """The browser-side switch of ``fig``'s y axis between linear and log: its scale, the axis's ticker and
    formatter, and the data range's log hint, then a reset so the range refits the data. One figure that
    changes scale, not a hidden log copy of it: the copies were a third of the page's models, each laid
    out again whenever its range moved (a tab's first paint and every update paid for them)."""
    axis = fig.yaxis[0]
    return CustomJS(args={"fig": fig, "axis": axis, "lin_scale": fig.y_scale, "log_scale": LogScale(),
                          "lin_ticker": axis.ticker, "log_ticker": LogTicker(), "lin_format": axis.formatter,
                          "log_format": LogTickFormatter()}, code="""
        const log = cb_obj.active;
        fig.y_scale = log ? log_scale : lin_scale;
        axis.ticker = log ? log_ticker : lin_ticker;
        axis.formatter = log ? log_format : lin_format;
        fig.y_range.scale_hint = log ? 'log' : 'auto';
        fig.reset.emit();""")


def _source_name(stream: str, metric: str) -> str:
    # "metrics:<stream>" is the loss line (the page's first curve; tests and tools read it by this name)
    return f"metrics:{stream}" if metric == "loss" else f"metrics:{stream}:{metric}"


def _empty() -> dict[str, list]:
    return {"x": [], "step": [], "t": [], "rel": [], "y": [], "lo": [], "hi": [], "run": []}


class TrainingPlots:
    """Figures, their sources and reading tools for one session; ``update`` feeds them."""

    def __init__(self) -> None:
        self.smoothing = Slider(start=0, end=0.99, step=0.01, value=0.6, title="smoothing (debiased EMA)",
                                name="smoothing", width=260)
        self.x_mode = "step"
        self.x_select = Select(title="x axis", value=self.x_mode, options=list(xaxis.MODES.items()), name="x_mode",
                               width=170)
        # The one model of the plots the browser sends back: the server redraws every line in the new x.
        self.synced = (self.x_select,)
        self.x_select.on_change("value", lambda attr, old, new: self.set_x_mode(new))
        self.zoom: dict[str, tuple[float, float]] = {}  # figure key -> visible x range, while zoomed in
        self._hists: dict[str, History] = {}  # stream -> its History (the collector's)
        # stream -> the History serial its frame was drawn at: its lines hold the rows after it as they are
        self._frame_serials: dict[str, int] = {}
        self._frame_fn: Callable[[str, Callable[[], curves.Frame]], tuple[int, curves.Frame]] | None = None
        self.figs: dict[str, Any] = {}
        toggles = []
        for key, title in FIGURES:
            f = self.figs[key] = self._fig(title, key)
            # a zoom or pan ends with RangesUpdate; the reset tool sends RangesUpdate, then Reset
            f.on_event(RangesUpdate, functools.partial(self._on_range, key))
            f.on_event(Reset, functools.partial(self._on_reset, key))
            tog = Toggle(label=f"log y: {key}", name=f"log_toggle:{key}", width=120, active=False)
            tog.js_on_change("active", _log_y_switch(f))
            toggles.append(tog)
        self.smoothed_transforms: list[CustomJSTransform] = []
        self.sources: dict[str, ColumnDataSource] = {}
        self.lost_sources: dict[str, ColumnDataSource] = {}
        # one marker source per figure: each marker sits on that figure's own line (its y scale)
        self.events = {k: ColumnDataSource({"x": [], "step": [], "y": [], "what": [], "kind": [], "color": []},
                                           name="training_events" if k == "loss" else f"training_events:{k}")
                       for k, _ in FIGURES}
        self.sent: dict[str, int] = {}  # stream -> the History serial last drawn
        self.frames: dict[str, curves.Frame] = {}  # stream -> the curves drawn (dashboard.curves.frame)
        self._events_seen = 0  # serial of the newest event record drawn
        self._records: list[dict] = []
        self._processes: dict[str, tuple[str, ...]] = {}
        self.overlays: dict[str, list[tuple[Any, Any]]] = {}
        for key, f in self.figs.items():
            r = f.add_glyph(self.events[key], Scatter(x="x", y="y", marker="inverted_triangle", size=11,
                                                      fill_color="color", line_color="black"))
            f.add_tools(HoverTool(renderers=[r], tooltips=[("event", "@what"), ("step", "@step{0,0}")]))
        self.smoothing.js_on_change("value", CustomJS(args={"ts": self.smoothed_transforms}, code="""
            for (const t of ts) t.change.emit();
            for (const d of Bokeh.documents) for (const m of d.all_models)
              if (m.type === 'ColumnDataSource' || (m.constructor && m.constructor.__name__ === 'ColumnDataSource'))
                if (m.name && m.name.startsWith('metrics:')) m.change.emit();"""))
        # Switching x resets each plot's view in the browser at once (the old range is in the old unit).
        self.x_select.js_on_change("value", CustomJS(args={"figs": list(self.figs.values())},
                                                     code="for (const f of figs) f.reset.emit()"))
        # The controls and each figure are roots of their own (the page's ``roots``): BokehJS lays a whole root
        # out again when one of its plots changes size (an axis's tick labels grew), and one root of all six
        # figures in rows and columns was laid out 1.5 times a second, ~0.1 s of the browser's main thread
        # each (measured by timing BokehJS's views in the page). Alone, a figure re-measures itself.
        self.controls = row(self.smoothing, self.x_select, *toggles, sizing_mode="stretch_width")
        self.lead = [self.controls, self.figs["loss"]]  # drawn first (dashboard.document make_doc)
        self.rest = [self.figs[k] for k, _ in FIGURES if k != "loss"]
        self.roots = [*self.lead, *self.rest]

    def _frozen(self) -> contextlib.AbstractContextManager:
        """Bokeh recounts a document's models on every change to its model graph (~0.2 s for this page):
        frozen, a batch of new lines, axes or overlays is recounted once, at the end."""
        doc = self.controls.document
        return doc.models.freeze() if doc is not None else contextlib.nullcontext()

    @staticmethod
    def _fig(title: str, key: str) -> Any:
        f = figure(title=title, height=230, sizing_mode="stretch_width", tools="pan,wheel_zoom,box_zoom,reset,save",
                   name=f"{key}_plot")
        f.xaxis.axis_label, f.xaxis.ticker, f.xaxis.formatter = xaxis.axis_models("step")
        f.toolbar.logo = None
        return f

    # -------------------------------------------------------------- lines

    def _add_metric(self, stream: str, metric: str, color: str) -> None:
        key = dict(METRICS)[metric]
        src = self.sources[f"{stream}/{metric}"] = ColumnDataSource(_empty(), name=_source_name(stream, metric))
        lost = self.lost_sources[f"{stream}/{metric}"] = ColumnDataSource(
            _empty(), name=_source_name(stream, metric) + ":lost")
        smooth = CustomJSTransform(args={"slider": self.smoothing, "source": src}, v_func=SMOOTH_JS)
        self.smoothed_transforms.append(smooth)
        f = self.figs[key]
        if metric == "val_loss":
            raw = f.add_glyph(src, Scatter(x="x", y="y", size=6, fill_color=color, line_color=color))
        else:
            f.add_glyph(src, VArea(x="x", y1="lo", y2="hi", fill_color=color, fill_alpha=0.12))
            raw = f.add_glyph(src, Line(x="x", y="y", line_color=color, line_alpha=0.3, line_width=1))
            f.add_glyph(src, Line(x="x", y=transform("y", smooth), line_color=color, line_width=2),
                        name=f"smoothed:{_source_name(stream, metric)}")
        f.add_glyph(lost, Line(x="x", y="y", line_color="grey", line_alpha=0.35, line_dash="dotted"))
        f.add_tools(HoverTool(renderers=[raw], tooltips=_TOOLTIPS, formatters={
            "@t": "datetime", "@y": CustomJSHover(args={"source": src}, code=_VALUE_JS)}))

    def update(self, metrics: dict[str, Any], streams: list[str], events: Any = (),
               processes: dict[str, tuple[str, ...]] | None = None,
               frame: Callable[[str, Callable[[], curves.Frame]], tuple[int, curves.Frame]] | None = None) -> bool:
        """Redraw the lines of the streams whose History changed, and the markers when new ``events`` came
        (the collector's ``(serial, record)`` ``event_records``; ``processes``: stream -> the programs
        writing it, whose watchdog events go on its curves). ``frame`` (the collector's ``frame``) keeps
        each stream's drawn curves for every session: N tabs downsample a History once, not N times.
        True when something was sent."""
        sent = False
        newest = events[-1][0] if len(events) else 0
        new_events = newest != self._events_seen
        self._events_seen, self._processes = newest, processes or {}
        self._records = [rec for _, rec in events] if new_events else self._records
        self._frame_fn = frame
        for i, stream in enumerate(streams):
            hist = self._hists[stream] = metrics[stream]
            if f"{stream}/loss" not in self.sources:
                with self._frozen():  # a new stream's glyphs: one recount (1.3 s unfrozen, measured)
                    for metric, _ in METRICS:
                        self._add_metric(stream, metric, Category10_10[i % 10])
                for m in collect_models(*self.roots):  # the browser sends back only the x
                    m.syncable = m in self.synced  # select (sliders and toggles act in JS, zooms come as events)
            if hist.last_serial == self.sent.get(stream, -1):
                continue
            if not self._append(stream) and not self._redraw(stream, only_new=True):
                continue  # the frame this session drew is still the shared one (a long history being read in)
            sent = True
        if sent or new_events:
            self._draw_markers()
        return sent or new_events

    def _append(self, stream: str) -> bool:
        """Stream the rows new since the last update onto the drawn lines, when they only go on from them
        (no resume, no zoom, under TAIL_MAX since the last whole drawing); False when a redraw is due."""
        f, hist = self.frames.get(stream), self._hists[stream]
        if f is None or self.zoom:
            return False
        rows = hist.arrays()
        serial = rows["serial"]
        start = int(np.searchsorted(serial, self.sent[stream], side="right"))
        since_frame = len(serial) - int(np.searchsorted(serial, self._frame_serials[stream], side="right"))
        if since_frame > TAIL_MAX or not curves.appends_only(rows, start):
            return False
        if f.t0 is None and np.isfinite(rows["t"][start:]).any():
            return False  # the first wall times: relative time needs its zero (the frame's)
        for metric, _ in METRICS:
            s = curves.tail(rows, start, metric)
            if len(s):
                self.sources[f"{stream}/{metric}"].stream(
                    xaxis.with_x({**s.columns(f.t0), "run": [stream] * len(s)}, self.x_mode))
        self.sent[stream] = hist.last_serial
        return True

    def _redraw(self, stream: str, only_new: bool = False) -> bool:
        """Draw ``stream`` whole from its History now: downsampled (the frame shared by all sessions at this
        serial), or for a zoomed-in figure from its visible range. ``only_new``: not when the shared frame is
        the one already drawn (the collector keeps one while it reads a long history in); False then."""
        hist = self._hists[stream]
        rows = hist.arrays()
        make = functools.partial(curves.frame, rows, stream, tuple(m for m, _ in METRICS), N_OUT)
        serial, shared = (hist.last_serial, make()) if self._frame_fn is None else self._frame_fn(stream, make)
        if only_new and not self.zoom and self.frames.get(stream) is shared:
            return False
        self.frames[stream] = shared
        self.sent[stream] = self._frame_serials[stream] = serial
        for key, _ in FIGURES:
            f = shared
            if key in self.zoom:
                win = xaxis.window(self.x_mode, *self.zoom[key], shared.t0)
                if not curves.covers(rows, win):
                    f = curves.frame(rows, stream, METRICS_OF[key], N_OUT, window=win)
            for metric in METRICS_OF[key]:
                self.sources[f"{stream}/{metric}"].data = xaxis.with_x(f.live[metric], self.x_mode)
                self.lost_sources[f"{stream}/{metric}"].data = xaxis.with_x(f.lost[metric], self.x_mode)
        return True

    # ------------------------------------------------------ reading tools

    def set_x_mode(self, mode: str) -> None:
        """Draw every line, marker and overlay against ``mode`` (a key of xaxis.MODES)."""
        if mode not in xaxis.MODES or mode == self.x_mode:
            return
        self.x_mode = mode
        self.zoom.clear()  # a range in the old unit means nothing in the new one (the browser reset the view)
        with self._frozen():
            for f in self.figs.values():
                f.xaxis.axis_label, f.xaxis.ticker, f.xaxis.formatter = xaxis.axis_models(mode)
                f.xaxis.ticker.syncable = f.xaxis.formatter.syncable = False
        for stream in self.frames:
            self._redraw(stream)
        for src in {id(r.data_source): r.data_source for rs in self.overlays.values() for _, r in rs}.values():
            src.data = xaxis.with_x(dict(src.data), mode)
        self._draw_markers()

    def _on_range(self, key: str, event: RangesUpdate) -> None:
        if event.x0 is None or event.x1 is None:
            return
        self.zoom[key] = (float(event.x0), float(event.x1))
        for stream in self.frames:
            self._redraw(stream)

    def _on_reset(self, key: str, event: Reset) -> None:
        if self.zoom.pop(key, None) is not None:
            for stream in self.frames:
                self._redraw(stream)

    def _marks(self, stream: str) -> list[curve_events.Marker]:
        f = self.frames[stream]
        # the frame's live loss rows, and the rows streamed on since (all live: they only went on)
        rows = self._hists[stream].arrays()
        on = rows["serial"] > self._frame_serials[stream]
        step = np.concatenate([f.live_step, rows["step"][on]])
        t = np.concatenate([f.live_t, rows["t"][on]])
        # the resumes last, drawn on top: a clean resume sits exactly on its checkpoint's marker
        return curve_events.markers(self._records, stream, step, t, self._processes.get(stream, ()), since=f.t0) + [
            curve_events.Marker(step, "resume", what) for step, what in f.resumes]

    def _draw_markers(self) -> None:
        # every stream's markers, each on its stream's line in each figure (that figure's y scale), placed
        # from the whole line (a zoomed-in source holds only the visible range: then the frame's), at the
        # marker's x in the chosen unit (its step mapped through the line's step -> x)
        marks_of = {stream: self._marks(stream) for stream in self.frames}
        for key, metric in (("loss", "loss"), ("throughput", "samples_per_s"), ("lr", "lr")):
            cols: dict[str, list] = {"x": [], "step": [], "y": [], "what": [], "kind": [], "color": []}
            for stream, marks in marks_of.items():
                d = self.frames[stream].live[metric] if key in self.zoom else self.sources[f"{stream}/{metric}"].data
                fin = [(s, x, y) for s, x, y in zip(d["step"], d[self.x_mode], d["y"]) if y == y and x == x]
                steps, xs, ys = [p[0] for p in fin], [p[1] for p in fin], [p[2] for p in fin]
                for m in marks:
                    cols["x"].append(float(np.interp(m.step, steps, xs)) if fin else math.nan)
                    cols["y"].append(float(np.interp(m.step, steps, ys)) if fin else math.nan)
                    cols["step"].append(m.step)
                    cols["what"].append(m.what)
                    cols["kind"].append(m.kind)
                    cols["color"].append(_MARK_COLORS.get(m.kind, "red"))
            if cols != dict(self.events[key].data):  # unchanged markers cost the browser a redraw of the plot
                self.events[key].data = cols

    # ------------------------------------------------------------ overlay

    def overlay(self, label: str, records: list[dict], *, baseline: bool = False) -> None:
        """Draw a past run's metrics as thin faint lines (baseline: black dashed) on the matching figures."""
        with self._frozen():
            self._overlay(label, records, baseline)

    def _overlay(self, label: str, records: list[dict], baseline: bool) -> None:
        self.clear_overlay(label)
        h = History(("step", "t", curves.BEGIN, *[m for m, _ in METRICS]), max(4, len(records) + 1))
        h.extend(curves.tag_begins(records))
        rows = h.arrays()
        added = []
        for metric, key in METRICS:
            live, _, gaps = curves.split(rows, metric)
            s = curves.draw(rows, live, metric, N_OUT, gaps)
            if not len(s):
                continue
            src = ColumnDataSource(xaxis.with_x({**s.columns(), "run": [label] * len(s)}, self.x_mode),
                                   name=f"overlay:{label}:{metric}")
            f = self.figs[key]
            glyph = (Line(x="x", y="y", line_color="black", line_dash="dashed", line_width=1.5, line_alpha=0.8)
                     if baseline else Line(x="x", y="y", line_color="grey", line_dash="dashed", line_alpha=0.5))
            added.append((f, f.add_glyph(src, glyph, name=f"overlay:{label}")))
        self.overlays[label] = added

    def clear_overlay(self, label: str) -> None:
        """Remove a run's overlay lines (no-op when absent)."""
        with self._frozen():
            for f, r in self.overlays.pop(label, []):
                f.renderers = [x for x in f.renderers if x is not r]
