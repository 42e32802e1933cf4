"""Per-metric series, incarnations, lost work and the spike-keeping downsampler."""

import math

import numpy as np

from dashboard import curves
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
