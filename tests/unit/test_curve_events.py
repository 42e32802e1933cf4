"""Watchdog and trainer events as markers on the training curves: which, with what text, at which step."""

from collections import deque
from datetime import datetime, timezone

import numpy as np

from dashboard import curve_events
from dashboard.collector import METRIC_COLUMNS
from dashboard.history import History
from dashboard.training_plots import TrainingPlots

T0 = 1_800_000_000.0  # epoch seconds of step 0


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _wd(t: float, action: str, reason: str, process: str = "trainer", verdict=None, rule=None) -> dict:
    return {"ts": _iso(t), "mono": 1.0, "process": process, "rule": rule, "verdict": verdict, "action": action,
            "attempt": 1, "next_allowed_in": None, "reason": reason}


def _hist(n: int = 100) -> History:
    h = History(METRIC_COLUMNS, 100_000)
    h.extend({"step": i, "t": T0 + 2 * i, "loss": 1 / (i + 1), "lr": 1e-3, "samples_per_s": 100.0} for i in range(n))
    return h


def test_watchdog_events_are_placed_at_the_step_nearest_in_wall_time_with_their_reason():
    step = np.arange(100.0)
    t = T0 + 2 * step
    recs = [
        _wd(T0 + 40.9, "restart", "heartbeat 31s old", verdict="unhealthy", rule="heartbeat"),
        _wd(T0 + 120.2, "observed", "input wait 80%", verdict="degraded", rule="data_starved"),
        _wd(T0 + 150, "observed", "fine", verdict="ok"),            # an ok verdict is no marker
        _wd(T0 + 198, "gave_up", "5 restarts in 600s"),
        _wd(T0 + 10, "restart", "not ours", process="dashboard"),  # another program's restart
        {"event": "checkpoint_saved", "t": T0 + 60, "step": 30, "stream": "trainer"},
        {"event": "checkpoint_saved", "t": T0 + 60, "step": 30, "stream": "other"},
    ]
    got = curve_events.markers(recs, "trainer", step, t)
    assert [(m.step, m.kind) for m in got] == [(20.0, "restart"), (60.0, "warning"), (99.0, "gave_up"),
                                               (30.0, "checkpoint")]
    assert "heartbeat 31s old" in got[0].what and "[heartbeat]" in got[0].what
    assert "data_starved" in got[1].what and "input wait 80%" in got[1].what
    assert "5 restarts" in got[2].what
    # a program writing the stream under another status name counts once named
    assert [m.kind for m in curve_events.markers(recs, "trainer", step, t, ("dashboard",))][0] == "restart"
    assert curve_events.markers(recs, "trainer", step, np.full(100, np.nan))[-1].kind == "checkpoint"


def test_training_plots_draw_the_collectors_event_records_as_markers_on_each_figure():
    plots = TrainingPlots()
    hist = _hist()
    events: deque = deque(maxlen=200)
    assert plots.update({"trainer": hist}, ["trainer"], events)
    assert plots.events["loss"].data["x"] == []
    lines_before = plots.sources["trainer/loss"].data
    # new events alone (no new metric point) redraw the markers, not the lines
    events.append((1, _wd(T0 + 100, "restart", "heartbeat 31s old", verdict="unhealthy", rule="heartbeat")))
    events.append((2, _wd(T0 + 160, "observed", "input wait 80%", verdict="degraded", rule="data_starved")))
    assert plots.update({"trainer": hist}, ["trainer"], events)
    assert plots.sources["trainer/loss"].data is lines_before
    d = plots.events["loss"].data
    assert d["x"] == [50.0, 80.0] and d["kind"] == ["restart", "warning"]
    assert "heartbeat 31s old" in d["what"][0] and "data_starved" in d["what"][1]
    assert abs(d["y"][0] - 1 / 51) < 1e-9  # on the loss line at that step
    assert plots.events["throughput"].data["y"] == [100.0, 100.0]
    assert d["color"][0] != d["color"][1]
    # nothing new: nothing sent
    assert not plots.update({"trainer": hist}, ["trainer"], events)


def test_the_trainers_own_checkpoint_records_become_markers_through_the_collector(tmp_path):
    # The trainer writes {"event": "checkpoint", "step": N} into its metrics (trainer.run.Run.save_checkpoint);
    # the collector tags it with its stream, and the curves mark it at that step.
    import asyncio

    from dashboard.collector import Collector
    from keel.status.reporter import ProcessReporter
    from tests.unit.test_dashboard_page import make_cfg

    cfg = make_cfg(tmp_path)
    rep = ProcessReporter(cfg.run_dir, "trainer", "trainer", heartbeat_interval=60)
    rep.start({"run_id": "unit"})
    rep.metrics([{"step": i, "t": T0 + i, "loss": 1.0} for i in range(40)]
                + [{"event": "checkpoint", "t": T0 + 40, "step": 39},
                   {"event": "nonfinite_loss", "t": T0 + 41, "step": 39, "loss": "nan", "action": "skip"}])
    c = Collector(cfg)
    asyncio.run(c.cycle())
    plots = TrainingPlots()
    assert plots.update(c.metrics, ["trainer"], c.event_records, frame=c.frame)
    d = plots.events["loss"].data
    assert d["kind"] == ["checkpoint", "trainer"] and d["x"] == [39.0, 39.0]
    assert "nonfinite_loss" in d["what"][1]
    rep.close()
    c.runner.close()
