"""The training plots' x axis (step, relative time, wall clock) and zoom redrawn at full resolution."""

from __future__ import annotations

import time

import numpy as np
from bokeh.document import Document
from bokeh.events import RangesUpdate, Reset
from bokeh.models import CustomJSTickFormatter, DatetimeTickFormatter, NumeralTickFormatter

from keel.status.reporter import ProcessReporter

from dashboard import curves
from dashboard.collector import Collector
from dashboard.document import make_doc
from dashboard.rundir import METRICS_PER_CYCLE
from dashboard.training_plots import N_OUT
from tests.unit.test_dashboard_page import cycle, make_cfg

T0 = 1_700_000_000.0


def _session(tmp_path, records):
    cfg = make_cfg(tmp_path)
    rep = ProcessReporter(cfg.run_dir, "trainer", "trainer", heartbeat_interval=60)
    rep.start({"run_id": "unit"})
    rep.metrics(records)
    c = Collector(cfg)
    # the reader catches up a cycle's worth at a time (a read that timed out on a loaded box, with the next)
    deadline = time.monotonic() + 60
    while "trainer" not in c.metrics or len(c.metrics["trainer"]) < len(records):
        assert time.monotonic() < deadline, f"the reader did not catch up: {c.errors}"
        cycle(c)
    assert len(c.metrics["trainer"]) == len(records)  # no more than written either
    doc = Document()
    view = make_doc(doc, c)
    return view, doc, rep, c


def test_within_keeps_the_window_and_one_row_each_side():
    rows = {"step": np.arange(100.0), "t": np.arange(100.0)}
    idx = np.arange(100)
    assert list(curves.within(rows, idx, ("step", 10, 20))) == list(range(9, 22))
    assert len(curves.within(rows, idx, ("step", 200, 300))) == 0
    assert curves.covers(rows, ("step", -5, 105)) and not curves.covers(rows, ("step", 0, 50))


def test_x_as_relative_time_and_wall_clock_moves_every_line_and_marker(tmp_path):
    recs = [{"step": i, "loss": 1.0 / (i + 1), "t": T0 + 2.0 * i} for i in range(50)]
    recs += [{"step": i, "loss": 0.5, "t": T0 + 200 + 2.0 * i} for i in range(30, 60)]  # resumed at 30
    view, doc, rep, c = _session(tmp_path, recs)
    plots = view.plots
    src = doc.get_model_by_name("metrics:trainer")
    marks = doc.get_model_by_name("training_events")
    assert src.data["x"] == src.data["step"] and marks.data["x"] == [30.0]
    step_format = doc.get_model_by_name("loss_plot").xaxis[0].formatter  # 200,000, never 2.000e+5
    assert isinstance(step_format, NumeralTickFormatter) and step_format.format == "0,0.[00]"
    plots.x_select.value = "rel"  # what the browser sends when the viewer picks it
    x = np.array(src.data["x"], dtype=float)
    fin = np.isfinite(x)
    # ms since the first record: 0 at step 0, and the resumed incarnation (step 30) starts 260 s in
    assert x[0] == 0.0 and np.nanmax(x) == (200 + 2.0 * 59) * 1000
    assert np.all(np.diff(x[fin]) > 0)  # time only goes on, even across the resume
    assert marks.data["x"] == [260_000.0] and marks.data["step"] == [30.0]
    fig = doc.get_model_by_name("loss_plot")
    assert isinstance(fig.xaxis[0].formatter, CustomJSTickFormatter)
    assert fig.xaxis[0].axis_label == "time since the run's first record"
    plots.x_select.value = "t"
    assert src.data["x"][0] == T0 * 1000 and isinstance(fig.xaxis[0].formatter, DatetimeTickFormatter)
    assert doc.get_model_by_name("throughput_plot").xaxis[0].axis_label == "wall clock"
    plots.x_select.value = "step"
    assert src.data["x"] == src.data["step"] and fig.xaxis[0].axis_label == "step"
    assert isinstance(fig.xaxis[0].formatter, NumeralTickFormatter)
    rep.close()
    c.runner.close()


def test_a_zoomed_plot_shows_its_range_at_full_resolution_and_a_reset_goes_back(tmp_path):
    n = 20 * N_OUT
    rng = np.random.default_rng(1)
    noise = 1.0 + 0.01 * rng.standard_normal(n)
    recs = [{"step": i, "loss": float(noise[i]), "samples_per_s": 100.0, "t": T0 + i} for i in range(n)]
    view, doc, rep, c = _session(tmp_path, recs)
    src = doc.get_model_by_name("metrics:trainer")
    speed = doc.get_model_by_name("metrics:trainer:samples_per_s")
    assert len(src.data["x"]) <= N_OUT  # the whole run, downsampled
    fig = doc.get_model_by_name("loss_plot")
    fig._trigger_event(RangesUpdate(fig, x0=10_000.5, x1=11_500.5, y0=0, y1=2))
    # every row from 10,001 to 11,500, and the one beyond each edge so the line reaches them
    assert src.data["x"] == [float(s) for s in range(10_000, 11_502)]
    assert src.data["y"] == [float(v) for v in noise[10_000:11_502]]
    assert len(speed.data["x"]) <= N_OUT  # another plot is not zoomed
    rep.metrics([{"step": n, "loss": 1.0, "t": T0 + n}])  # new data while zoomed: the view stays
    cycle(c)
    view.update()
    assert src.data["x"][0] == 10_000.0 and src.data["x"][-1] == 11_501.0
    fig._trigger_event(Reset(fig))
    assert len(src.data["x"]) <= N_OUT and src.data["x"][-1] == float(n)
    # a reset view (padded beyond the data) is not a zoom: new points keep arriving at the right
    fig._trigger_event(RangesUpdate(fig, x0=-5000, x1=n + 5000, y0=0, y1=2))
    assert len(src.data["x"]) <= N_OUT and src.data["x"][-1] == float(n)
    rep.close()
    c.runner.close()


def test_a_zoom_in_relative_time_reads_the_rows_of_that_time(tmp_path):
    recs = [{"step": i, "loss": float(i), "t": T0 + 0.5 * i} for i in range(10 * N_OUT)]
    view, doc, rep, c = _session(tmp_path, recs)
    view.plots.x_select.value = "rel"
    fig = doc.get_model_by_name("loss_plot")
    fig._trigger_event(RangesUpdate(fig, x0=1000_000, x1=1500_000, y0=1, y1=2))  # 1000 s to 1500 s
    src = doc.get_model_by_name("metrics:trainer")
    assert src.data["step"][0] == 1999.0 and src.data["step"][-1] == 3001.0 and len(src.data["step"]) == 1003
    rep.close()
    c.runner.close()


def test_new_points_are_streamed_onto_the_lines_until_a_whole_redraw_is_due(tmp_path):
    from bokeh.document.events import ColumnDataChangedEvent, ColumnsStreamedEvent

    from dashboard.training_plots import TAIL_MAX

    view, doc, rep, c = _session(tmp_path, [{"step": i, "loss": 1.0, "t": T0 + i} for i in range(3 * N_OUT)])
    other = make_doc(Document(), c)  # a second tab on the same shared frame
    view.plots.x_select.value = "rel"
    src = doc.get_model_by_name("metrics:trainer")
    shared = c.frames.latest("trainer").live["loss"]
    kept = {k: len(v) for k, v in shared.items()}
    events = []
    doc.on_change(lambda e: events.append(e))
    step = 3 * N_OUT
    rep.metrics([{"step": step, "loss": 9.0, "t": T0 + step}])  # a spike, one point on
    cycle(c)
    view.update()
    other.update()
    streamed = [e for e in events if isinstance(e, ColumnsStreamedEvent) and e.model is src]
    assert len(streamed) == 1 and streamed[0].data["y"] == [9.0] and streamed[0].data["x"] == [step * 1000.0]
    assert src.data["x"][-1] == step * 1000.0 and src.data["rel"][-1] == step * 1000.0  # x and rel grew once
    assert {k: len(v) for k, v in shared.items()} == kept  # the frame all tabs share was not grown in place
    assert other.plots.sources["trainer/loss"].data["x"][-1] == float(step)  # the other tab: still by step
    events.clear()
    more = [{"step": step + i, "loss": 1.0, "t": T0 + step + i} for i in range(1, TAIL_MAX + 1)]
    rep.metrics(more)
    cycle(c)
    view.update()
    assert [e for e in events if isinstance(e, ColumnDataChangedEvent) and e.model is src]  # drawn whole again
    assert not [e for e in events if isinstance(e, ColumnsStreamedEvent) and e.model is src]
    assert len(src.data["x"]) <= N_OUT and max(src.data["y"]) == 9.0  # downsampled, the spike kept
    assert src.data["x"][-1] == (step + TAIL_MAX) * 1000.0
    rep.close()
    c.runner.close()


def test_a_clean_resume_is_marked_on_top_of_its_checkpoint(tmp_path):
    recs = [{"step": i, "loss": 1.0, "t": T0 + i} for i in range(1, 51)]
    recs += [{"event": "checkpoint", "step": 50, "t": T0 + 50}, {"event": "resume", "step": 50, "t": T0 + 650}]
    recs += [{"step": i, "loss": 0.9, "t": T0 + 600 + i} for i in range(51, 81)]
    view, doc, rep, c = _session(tmp_path, recs)
    marks = doc.get_model_by_name("training_events").data
    assert marks["kind"] == ["checkpoint", "resume"] and marks["step"] == [50.0, 50.0]  # the restart drawn last
    assert marks["what"][-1] == "trainer: restart, resumed at step 50 after 10m00s down (no steps lost)"
    src = doc.get_model_by_name("metrics:trainer").data
    assert [s for s, y in zip(src["step"], src["y"]) if y != y] == [51.0]  # the line breaks where it was down
    rep.close()
    c.runner.close()


def test_while_a_long_history_is_read_in_its_lines_are_drawn_whole_at_most_once_a_second(tmp_path):
    from dashboard.frame_cache import CATCHING_UP_REDRAW_S
    from dashboard.training_plots import TrainingPlots

    cfg = make_cfg(tmp_path)
    rep = ProcessReporter(cfg.run_dir, "trainer", "trainer", heartbeat_interval=60)
    rep.start({"run_id": "unit"})
    n = 2 * METRICS_PER_CYCLE + 5
    rep.metrics([{"step": i, "loss": 1.0, "t": T0 + i} for i in range(n)])
    now = [100.0]
    c = Collector(cfg, mono=lambda: now[0])
    tabs = [TrainingPlots(), TrainingPlots()]
    drawn = []

    def update():
        for plots in tabs:
            plots.update(c.metrics, ["trainer"], frame=c.frame)
        drawn.append([plots.sources["trainer/loss"].data["x"][-1] for plots in tabs])

    cycle(c)
    assert c.catching_up
    update()  # the first chunk: drawn
    cycle(c)
    assert c.catching_up
    update()  # the second chunk, at once: the curves are not made again yet, and no tab draws them again
    assert drawn == [[METRICS_PER_CYCLE - 1] * 2] * 2 and tabs[0].frames["trainer"] is tabs[1].frames["trainer"]
    now[0] += CATCHING_UP_REDRAW_S
    update()  # a second on: made again, drawn
    cycle(c)
    assert not c.catching_up
    update()  # all read: made and drawn at once
    assert drawn[2:] == [[2 * METRICS_PER_CYCLE - 1] * 2, [n - 1] * 2]
    rep.close()
    c.runner.close()
