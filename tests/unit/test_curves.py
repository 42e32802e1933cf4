"""Per-metric series, incarnations, lost work and the spike-keeping downsampler."""

import math

import numpy as np

from dashboard import curve_events, curves
from dashboard.collector import METRIC_COLUMNS
from dashboard.history import History


def _rows(records):
    h = History(METRIC_COLUMNS, 5_000_000)
    h.extend(records)
    return h.arrays()


def test_validation_records_do_not_break_the_loss_line():
    recs = []
    for i in range(1, 201):
        recs.append({"step": i, "loss": 1 / i, "t": 1e9 + i})
        if i % 10 == 0:
            recs.append({"step": i, "val_loss": 2 / i, "t": 1e9 + i})
    rows = _rows(recs)
    live, gone, gaps = curves.split(rows, "loss")
    s = curves.draw(rows, live, "loss", 2000, gaps)
    assert len(s) == 200 and np.all(np.isfinite(s.y)) and len(gone) == 0 and len(gaps) == 0
    v_live, _, v_gaps = curves.split(rows, "val_loss")
    v = curves.draw(rows, v_live, "val_loss", 2000, v_gaps)
    assert len(v) == 20 and np.all(np.isfinite(v.y))


def test_resume_makes_lost_work_and_no_fold_back():
    recs = [{"step": i, "loss": 1.0, "t": i} for i in range(1, 101)]
    recs += [{"step": i, "loss": 0.5, "t": 1000 + i} for i in range(61, 151)]  # resumed from step 60
    rows = _rows(recs)
    assert list(curves.incarnation_starts(rows["step"])) == [0, 100]
    live, gone, gaps = curves.split(rows, "loss")
    assert sorted(rows["step"][gone]) == list(range(61, 101))  # the dead incarnation's steps 61..100
    s = curves.draw(rows, live, "loss", 2000, gaps)
    assert np.all(np.diff(s.step) >= 0)  # never back in x
    assert int(np.isnan(s.y).sum()) == 1  # one break, where the trainer was down
    assert s.step[np.flatnonzero(np.isnan(s.y))[0]] == 61


def test_a_million_points_keep_the_spike_and_the_band():
    n = 1_000_000
    step = np.arange(1, n + 1, dtype=float)
    rng = np.random.default_rng(0)
    y = 1.0 + 0.01 * rng.standard_normal(n)
    y[777_777] = 50.0
    rows = {"step": step, "t": step, "loss": y}
    live, _, gaps = curves.split(rows, "loss")
    s = curves.draw(rows, live, "loss", 2000, gaps)
    assert len(s) <= 2000 and s.y.max() == 50.0 and s.hi.max() == 50.0
    assert np.all(s.lo <= s.y) and np.all(s.y <= s.hi)


def test_history_reduction_keeps_every_spike():
    h = History(("step", "loss"), 1000)
    h.extend({"step": i, "loss": 100.0 if i == 123 else 1.0} for i in range(5000))
    assert len(h) <= 1000 and h.downsamples > 0 and np.nanmax(h.arrays()["loss"]) == 100.0
    assert math.isclose(h.latest("loss"), 1.0)


def test_a_clean_resume_after_downtime_is_a_restart_with_nothing_lost():
    # SIGTERM at step 100 with its checkpoint, resumed 4 h later: the step does not go back, but the
    # trainer's resume record says where it began again, so the line breaks and the marker says why
    recs = [{"step": i, "loss": 1.0, "t": i} for i in range(1, 101)]
    recs += [{"event": "resume", "step": 100, "t": 100 + 4 * 3600, "run_id": "r"}]
    recs += [{"step": i, "loss": 0.5, "t": 4 * 3600 + i} for i in range(101, 151)]
    rows = _rows(curves.tag_begins(recs))
    assert list(curves.incarnation_starts(rows["step"], rows[curves.BEGIN])) == [0, 100]
    f = curves.frame(rows, "trainer", ("loss",), 2000)
    ys = np.array(f.live["loss"]["y"])
    assert int(np.isnan(ys).sum()) == 1 and len(f.lost["loss"]["y"]) == 0
    assert f.live["loss"]["step"][int(np.flatnonzero(np.isnan(ys))[0])] == 101  # the break: just before 101
    ((at, what),) = f.resumes
    assert at == 100 and what == "trainer: restart, resumed at step 100 after 4h00m down (no steps lost)"


def test_a_resume_record_loses_exactly_the_steps_beyond_the_checkpoint():
    recs = [{"step": i, "loss": 1.0, "t": i} for i in range(1, 101)]
    recs += [{"event": "resume", "step": 60, "t": 130.0}]
    recs += [{"step": i, "loss": 0.5, "t": 70 + i} for i in range(61, 91)]
    rows = _rows(curves.tag_begins(recs))
    live, gone, _ = curves.split(rows, "loss")
    assert sorted(rows["step"][gone]) == list(range(61, 101))  # step 60 was saved: live, not lost
    assert 60 in rows["step"][live]
    (_, what), = curves.frame(rows, "trainer", ("loss",), 2000).resumes
    assert what == "trainer: restart, resumed at step 60 after 30s down (steps 61-100 lost)"


def test_a_new_run_in_the_same_file_starts_the_curves_afresh():
    # checkpoints cleared between two runs: the second is not the first's restart with 200 steps "lost"
    recs = [{"event": "new_run", "step": 0, "t": 0.0, "run_id": "a"}]
    recs += [{"step": i, "loss": 1.0, "t": float(i)} for i in range(1, 201)]
    recs += [{"event": "checkpoint", "step": 200, "t": 200.0}]
    recs += [{"event": "new_run", "step": 0, "t": 5000.0, "run_id": "b"}]
    recs += [{"step": i, "loss": 0.5, "t": 5000.0 + i} for i in range(1, 51)]
    rows = _rows(curves.tag_begins(recs))
    f = curves.frame(rows, "trainer", ("loss",), 2000)
    assert f.live["loss"]["step"] == [float(i) for i in range(1, 51)] and set(f.live["loss"]["y"]) == {0.5}
    assert f.lost["loss"]["y"] == [] and f.resumes == [] and f.t0 == 5000.0
    assert f.live["loss"]["rel"][0] == 1000.0  # relative time counts from the new run's start
    # the old run's checkpoint record is not a marker of the new run's curves
    cols = {c: rows[c] for c in ("step", "t")}
    tagged = [{**r, "stream": "trainer"} for r in recs if "event" in r]
    marks = curve_events.markers(tagged, "trainer", cols["step"][-50:], cols["t"][-50:], since=f.t0)
    assert marks == []
    assert not curves.appends_only(rows, len(rows["step"]) - 51)  # rows holding a new run: a whole redraw
    assert curves.appends_only(rows, len(rows["step"]) - 50)


def test_a_break_survives_the_downsampling_of_a_long_line():
    # MinMaxLTTB keeps extremes; the first point after a restart is rarely one, yet the line must break there
    n = 20_000
    recs = [{"step": i, "loss": 1.0 + 0.01 * ((i * 7919) % 13), "t": float(i)} for i in range(1, n + 1)]
    recs += [{"event": "resume", "step": n, "t": n + 3600.0}]
    recs += [{"step": i, "loss": 1.0 + 0.01 * ((i * 7919) % 13), "t": 3600.0 + i} for i in range(n + 1, 2 * n)]
    rows = _rows(curves.tag_begins(recs))
    f = curves.frame(rows, "trainer", ("loss",), 2000)
    y, step = np.array(f.live["loss"]["y"]), np.array(f.live["loss"]["step"])
    assert len(y) <= 2010 and int(np.isnan(y).sum()) == 1  # one break, kept through the downsampling
    at = int(np.flatnonzero(np.isnan(y))[0])
    assert step[at - 1] == n and step[at + 1] == n + 1  # between the last step before and the first after


def test_each_restart_counts_only_the_work_of_the_incarnation_that_died():
    recs = [{"step": i, "loss": 1.0, "t": float(i)} for i in range(1, 1001)]
    recs += [{"event": "resume", "step": 500, "t": 1100.0}]
    recs += [{"step": i, "loss": 1.0, "t": 600.0 + i} for i in range(501, 701)]
    recs += [{"event": "checkpoint_corrupt", "t": 1400.0}]  # written at the second start, before its resume record
    recs += [{"event": "resume", "step": 600, "t": 1400.0}]
    recs += [{"step": i, "loss": 1.0, "t": 800.0 + i} for i in range(601, 651)]
    rows = _rows(curves.tag_begins(recs))
    (_, first), (_, second) = curves.frame(rows, "trainer", ("loss",), 5000).resumes
    assert first == "trainer: restart, resumed at step 500 after 1m40s down (steps 501-1000 lost)"
    # 701-1000 were lost at the first restart already; the downtime is from the last step, not the corrupt record
    assert second == "trainer: restart, resumed at step 600 after 1m40s down (steps 601-700 lost)"
