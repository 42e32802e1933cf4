"""make_doc on a bare Document over a real fixture run dir (the collector's failure paths: test_dashboard_collector)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from bokeh.document import Document
from bokeh.document.events import ColumnDataChangedEvent, ColumnsPatchedEvent, ColumnsStreamedEvent

from keel.status.models import State, WatchdogStatus, WatchedProcess
from keel.host.gpus import GpuSample
from keel.host.sampling import HostSample, ProcessSample, ResourceSample
from keel.status.reporter import ProcessReporter
from keel.status.jsonl import JsonlWriter

from dashboard.collector import Collector
from dashboard.rundir import RunDirReader
from dashboard.config import load_config
from dashboard.training_plots import N_OUT
from dashboard.document import make_doc
from tests.resolved import resolve_stack


def make_cfg(tmp_path: Path, history_points: int = 500, refresh: float = 0.3):
    """The dashboard's config for a trainer, a watchdog and itself, by the real resolver (and keel.json)."""
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "log").mkdir(exist_ok=True)
    build = resolve_stack(tmp_path, {
        "trainer": {"kind": "trainer",
                    "health": {"heartbeat_timeout": "10s", "progress_timeout": "20s", "startup_grace": "30s"}},
        "watchdog": {"kind": "watchdog", "health": {"heartbeat_timeout": "10s"}},
        "dashboard": {"kind": "dashboard", "refresh": refresh, "history_points": history_points, "log_tail_lines": 3},
    }, env="unit")
    return load_config(build / "dashboard.json")


def publish_watchdog(run_dir: str, restarts: dict[str, int]) -> ProcessReporter:
    """A reporting watchdog, as keel.watch.main publishes one: this process, running, polled just now,
    each process judged ok with the given restart count."""
    rep = ProcessReporter(run_dir, "watchdog", "watchdog", heartbeat_interval=60)
    rep.start(payload=WatchdogStatus(processes_watched=sorted(restarts)))
    rep.set_state(State.RUNNING)
    rep.progress(last_poll=datetime.now(timezone.utc), poll_interval=5.0, processes={
        name: WatchedProcess(health="ok", rule="ok", reason="healthy", restarts_total=n) for name, n in restarts.items()
    })
    return rep


@pytest.fixture
def run_dir(tmp_path):
    """A trainer that reported 30 steps, a corrupt status, a restart event and a log file."""
    cfg = make_cfg(tmp_path)
    rep = ProcessReporter(cfg.run_dir, "trainer", "trainer", heartbeat_interval=60)
    rep.start({"run_id": "unit"})
    rep.set_state(State.RUNNING)
    rep.metrics([{"step": i, "loss": 1 / i, "lr": 0.01, "samples_per_s": 100.0} for i in range(1, 31)])
    rep.progress(step=30, loss=1 / 30)
    (tmp_path / "run" / "ghost.status.json").write_text("{broken")
    with JsonlWriter(tmp_path / "run" / "watchdog.events.jsonl") as ev:
        ev.append({"ts": "2026-01-01T12:00:00Z", "level": "warning", "action": "restart", "process": "trainer",
                   "reason": "heartbeat stale"})
    (tmp_path / "log" / "trainer.log").write_text(
        "".join(json.dumps({"ts": "2026-01-01T12:00:0%d" % i, "level": "info", "message": f"line {i}"}) + "\n"
                for i in range(5)))
    yield cfg, rep
    rep.close()


def cycle(collector: Collector) -> None:
    asyncio.run(collector.cycle())


def test_make_doc_on_a_bare_document_shows_everything(run_dir):
    cfg, _ = run_dir
    c = Collector(cfg)
    cycle(c)
    doc = Document()
    view = make_doc(doc, c)
    assert doc.roots and c.sessions == 1
    rows = dict(zip(view.table_source.data["name"], view.table_source.data["health"]))
    assert rows == {"trainer": "ok", "watchdog": "missing", "dashboard": "missing", "ghost": "corrupt"}
    # restarts are the watchdog's count: none is reporting, so none is shown (not a count of our own)
    assert view.table_source.data["restarts"][0] == "—"
    src = doc.get_model_by_name("metrics:trainer")
    assert src.data["step"] == [float(i) for i in range(1, 31)]
    assert "keel" in view.header.text and "unit" in view.header.text and "failing" in view.header.text
    assert "status ghost" in view.errors.text and "corrupt" in view.errors.text
    assert "no GPU" in view.gpu_note.text and view.gpu.visible is False
    assert "restart trainer heartbeat stale" in view.events.text
    assert "line 4" in view.logs.text and "line 1" not in view.logs.text  # tail of 3
    assert "no log file" in view.logs.text  # watchdog's log does not exist: said, not blank
    assert "step <b>30" in view.training.text
    # the watchdog reports: its published count is the one shown
    watchdog = publish_watchdog(cfg.run_dir, {"trainer": 1, "dashboard": 0})
    cycle(c)
    view.update()
    rows = dict(zip(view.table_source.data["name"], view.table_source.data["restarts"]))
    assert rows["trainer"] == "1" and rows["dashboard"] == "0"
    watchdog.close()
    c.runner.close()


def test_a_session_gets_each_change_once_and_nothing_when_nothing_changed(run_dir):
    # New points that only go on from the line are streamed onto it (a resume, which can turn earlier
    # points into lost work, redraws it whole: test_plot_reading); table cells go by patch. Nothing new:
    # nothing is sent.
    cfg, rep = run_dir
    c = Collector(cfg)
    cycle(c)
    doc = Document()
    view = make_doc(doc, c)
    events = []
    doc.on_change(lambda e: events.append(e))
    rep.metrics([{"step": i, "loss": 1 / i} for i in range(31, 36)])
    rep.progress(step=35)  # written before it returns: the next cycle reads it
    cycle(c)
    view.update()
    src = doc.get_model_by_name("metrics:trainer")
    streamed = [e for e in events if isinstance(e, ColumnsStreamedEvent) and e.model is src]
    assert len(streamed) == 1 and streamed[0].data["step"] == [float(i) for i in range(31, 36)]
    assert not [e for e in events if isinstance(e, ColumnDataChangedEvent) and e.model is src]
    assert src.data["step"] == [float(i) for i in range(1, 36)]
    assert any(isinstance(e, ColumnsPatchedEvent) and e.model is view.table_source for e in events)
    # nothing new: nothing sent
    events.clear()
    view.update()
    assert not [e for e in events if isinstance(e, (ColumnsStreamedEvent, ColumnDataChangedEvent))]
    # session end
    for cb in list(doc.session_destroyed_callbacks):
        cb(None)
    assert c.sessions == 0
    c.runner.close()


def test_a_long_run_is_drawn_with_at_most_n_out_points_and_keeps_its_spike(tmp_path):
    cfg = make_cfg(tmp_path)
    rep = ProcessReporter(cfg.run_dir, "trainer", "trainer", heartbeat_interval=60)
    rep.start({"run_id": "unit"})
    c = Collector(cfg)
    doc = Document()
    view = make_doc(doc, c)
    n = 3 * N_OUT
    rep.metrics([{"step": i, "loss": 100.0 if i == 4321 else 1.0} for i in range(n)])
    cycle(c)
    view.update()
    src = doc.get_model_by_name("metrics:trainer")
    assert len(src.data["step"]) <= N_OUT and max(src.data["y"]) == 100.0
    fresh = Document()
    make_doc(fresh, c)  # a new session gets the same drawn history at once
    steps = fresh.get_model_by_name("metrics:trainer").data["step"]
    assert len(steps) <= N_OUT and steps[0] == 0.0 and steps[-1] == n - 1
    rep.close()
    c.runner.close()


class ScriptedSampler:
    """Resource samples chosen by the test (the real sampler is covered in test_resources)."""

    def __init__(self) -> None:
        self.procs: dict[int, ProcessSample] = {}
        self.gpus: list[GpuSample] = []

    def sample(self, pids):
        return ResourceSample(time.monotonic(), HostSample(25.0, 4 << 30, 16 << 30), dict(self.procs),
                              list(self.gpus), None if self.gpus else "no GPU metrics: test", {})

    def close(self) -> None:
        pass


def test_every_resource_plot_is_fed_by_one_stream_and_a_gone_process_is_a_gap(run_dir):
    cfg, rep = run_dir
    sampler = ScriptedSampler()
    me = os.getpid()
    sampler.procs = {me: ProcessSample(me, True, 1.0, 300 << 20, 90.0, 1)}
    sampler.gpus = [GpuSample(0, "H200", 80.0, 10 << 30, 140 << 30, 60.0, 400.0),
                    GpuSample(1, "H200", 5.0, 1 << 30, 140 << 30, 40.0, 90.0)]
    c = Collector(cfg, reader=RunDirReader(cfg, sampler=sampler))
    cycle(c)
    assert c.procs == ["trainer"] and sorted(c.gpus) == [0, 1]
    doc = Document()
    view = make_doc(doc, c)
    src = doc.get_model_by_name("resources")
    assert {"t", "host_cpu", "cpu:trainer", "rss_mb:trainer", "gpu_util:0", "gpu_mem_pct:1"} <= set(src.data)
    assert list(src.data["rss_mb:trainer"]) == [300.0] and view.gpu.visible is True
    assert "trainer" in view.resources_key.text and "GPU 1 H200" in view.resources_key.text
    assert view.gpu_note.text == "GPU 0: 60 °C, 400 W · GPU 1: 40 °C, 90 W"
    events = []
    doc.on_change(lambda e: events.append(e))
    sampler.procs = {me: ProcessSample(me, False, 1.0, 0, 0.0, 0)}  # the trainer died
    cycle(c)
    view.update()
    streamed = [e for e in events if isinstance(e, ColumnsStreamedEvent)]
    assert [e.model.name for e in streamed] == ["resources"]  # host, process and GPUs: one message
    assert math.isnan(src.data["cpu:trainer"][-1]) and src.data["gpu_util:0"][-1] == 80.0
    c.runner.close()


def test_the_browser_sends_nothing_back_and_new_data_is_pushed_after_each_cycle(run_dir):
    cfg, rep = run_dir
    c = Collector(cfg)
    cycle(c)
    doc = Document()
    view = make_doc(doc, c)
    # auto-ranging plots would otherwise send their new bounds for every streamed point; the runs panel's
    # selection and baseline choice, and the plots' x-axis choice, are the only models the browser may send
    # back (on purpose)
    chosen = view.runs.synced + view.plots.synced
    assert all(not m.syncable for m in doc.models if m not in chosen) and all(m.syncable for m in chosen)
    late = ProcessReporter(cfg.run_dir, "late", "trainer", heartbeat_interval=60)
    late.start({"run_id": "unit"})
    late.metrics([{"step": 1, "loss": 1.0}])
    cycle(c)
    view.update()
    assert doc.get_model_by_name("metrics:late") is not None
    # lines added later are not synced either (their views and selections are Bokeh's defaults)
    defaults = {"CDSView", "AllIndices", "Selection", "UnionRenderers"}
    assert not [m for m in doc.models if m.syncable and type(m).__name__ not in defaults and m not in chosen]
    late.close()
    calls = []
    c.subscribe(lambda: 1 / 0)  # a broken listener does not stop the others
    unsubscribe = c.subscribe(lambda: calls.append(c.generation))
    cycle(c)
    cycle(c)
    unsubscribe()
    cycle(c)
    assert calls == [c.generation - 2, c.generation - 1]
    c.runner.close()


def test_sessions_share_one_drawn_frame_per_change(run_dir, monkeypatch):
    # Downsampling a long History is the page's dearest step: N sessions must pay it once, not N times.
    import dashboard.curves as curves

    cfg, rep = run_dir
    c = Collector(cfg)
    cycle(c)
    calls = []
    real = curves.frame
    monkeypatch.setattr(curves, "frame", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    views = [make_doc(Document(), c) for _ in range(3)]
    assert calls == ["trainer"]  # the first session drew it, the other two reused it
    rep.metrics([{"step": 31, "loss": 0.5}])
    cycle(c)
    for view in views:
        view.update()
    assert calls == ["trainer"]  # a point that only goes on is streamed onto each line: no downsampling
    assert all(v.plots.sources["trainer/loss"].data["step"][-1] == 31.0 for v in views)
    rep.metrics([{"step": 21, "loss": 0.4}])  # a resume: the lines are drawn again, once for all sessions
    cycle(c)
    for view in views:
        view.update()
    assert calls == ["trainer", "trainer"]
    assert all(v.plots.sources["trainer/loss"].data["step"][-1] == 21.0 for v in views)
    cycle(c)  # nothing new: a tab opened now reuses the same frame
    make_doc(Document(), c)
    assert calls == ["trainer", "trainer"]
    c.runner.close()


def _view(run_dir):
    """A session's page over the run dir's collector, after one read cycle."""
    cfg, _ = run_dir
    c = Collector(cfg)
    cycle(c)
    return make_doc(Document(), c), c


def test_the_page_typesets_no_tex_a_log_line_with_dollars_reads_as_written(run_dir):
    from bokeh.models import Div

    view, c = _view(run_dir)
    divs = [m for m in view.doc.models if isinstance(m, Div)]
    assert len(divs) >= 10 and all(d.disable_math for d in divs), [d.name for d in divs if not d.disable_math]
    c.runner.close()


def test_a_failing_part_of_the_update_stays_shown_until_it_succeeds(run_dir):
    view, c = _view(run_dir)
    real = view.plots.update

    def broken(*a, **kw):
        raise RuntimeError("no lines today")

    view.plots.update = broken
    c.generation += 1
    view.update_text()
    view.update_plots()
    assert view.update_error.visible and "no lines today" in view.update_error.text
    c.generation += 1
    view.update_text()  # the text part succeeding says nothing about the plots
    assert view.update_error.visible and "no lines today" in view.update_error.text
    view.plots.update = real
    view.update_plots()  # the failed generation is drawn again, and the badge goes
    assert not view.update_error.visible and view.update_error.text == ""
    c.runner.close()


def test_the_runs_table_is_as_tall_as_its_runs_up_to_a_scroll(run_dir):
    from keel.status.runs import RunSummary

    from dashboard.runs_panel import ROW_HEIGHT, ROWS_SHOWN

    cfg, _ = run_dir
    c = Collector(cfg)
    cycle(c)
    view = make_doc(Document(), c)
    heights = []
    for n in (1, 3, ROWS_SHOWN + 5):
        c.runs = [RunSummary(id=f"r{i}", trainer="trainer", started=1.7e9, updated=1.7e9, config_digest="d")
                  for i in range(n)]
        c.runs_serial += 1
        view.runs.refresh()
        heights.append(view.runs.table.height)
        assert len(view.runs.source.data["id"]) == n
    # one run: two rows tall; three: three; more than ROWS_SHOWN: ROWS_SHOWN rows (the rest scroll)
    assert [b - a for a, b in zip(heights, heights[1:])] == [ROW_HEIGHT, ROW_HEIGHT * (ROWS_SHOWN - 3)]
    c.runner.close()


def test_the_page_passes_bokehs_validation(run_dir):
    # The server does not validate each session's document (dashboard.server): this does, once.
    from bokeh.core.validation import check_integrity
    from bokeh.core.validation.warnings import MISSING_RENDERERS

    cfg, _ = run_dir
    c = Collector(cfg)
    cycle(c)
    doc = Document()
    make_doc(doc, c)
    issues = check_integrity(list(doc.models))
    assert issues.error == []
    # the GPU plot has no lines on a host without GPUs; nothing else may warn
    assert [w.code for w in issues.warning if w.code != MISSING_RENDERERS.code] == []
    c.runner.close()
