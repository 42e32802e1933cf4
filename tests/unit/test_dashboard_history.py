"""dashboard.history: bounded, downsampled series with serials for streaming."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dashboard.history import History


def test_since_returns_only_newer_points_and_missing_values_are_nan():
    h = History(("step", "loss"), 100)
    h.extend([{"step": 1, "loss": 0.5}, {"step": 2}, {"step": 3, "loss": "NaN"}, {"step": 4, "loss": "x"}])
    assert h.last_serial == 3
    new = h.since(1)
    assert new["step"] == [3.0, 4.0] and all(math.isnan(v) for v in new["loss"])
    assert math.isnan(h.data()["loss"][1])
    assert h.since(3) == {"step": [], "loss": []}
    assert h.since(-1)["step"] == [1.0, 2.0, 3.0, 4.0]
    assert h.latest("loss") == 0.5


def test_bounded_and_the_newest_half_is_kept_at_full_resolution():
    h = History(("x",), 100)
    for i in range(10_000):
        h.append({"x": i})
    assert len(h) <= 100
    xs = h.data()["x"]
    assert xs == sorted(xs) and xs[-1] == 9999
    tail = xs[-40:]
    assert tail == [float(v) for v in range(9960, 10_000)]  # recent: every point
    assert xs[0] < 5000  # old data is thinned, not dropped wholesale
    assert h.downsamples > 0


def test_a_session_streaming_after_its_last_serial_misses_nothing_recent():
    h = History(("x",), 50)
    sent = -1
    got: list[float] = []
    for i in range(1000):
        h.append({"x": i})
        if i % 7 == 0:
            got += h.since(sent)["x"]
            sent = h.last_serial
    got += h.since(sent)["x"]
    assert got == [float(i) for i in range(1000)]


def test_rejects_tiny_bounds():
    with pytest.raises(ValueError):
        History(("x",), 3)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(min_value=4, max_value=64), count=st.integers(min_value=0, max_value=2000))
def test_length_never_exceeds_bound_and_order_is_kept(n, count):
    h = History(("x",), n)
    for i in range(count):
        h.append({"x": i})
        assert len(h) <= n
    xs = h.data()["x"]
    assert xs == sorted(set(xs))
    if count:
        assert xs[-1] == count - 1


def test_a_new_column_is_nan_for_the_points_before_it():
    h = History(("t",), 10)
    h.extend([{"t": 1}, {"t": 2}])
    h.add_column("cpu:trainer")
    h.add_column("cpu:trainer")  # twice: still one column
    h.append({"t": 3, "cpu:trainer": 50})
    assert h.columns == ("t", "cpu:trainer")
    cpu = h.data()["cpu:trainer"]
    assert math.isnan(cpu[0]) and math.isnan(cpu[1]) and cpu[2] == 50.0
    assert h.since(0, ["cpu:trainer"])["cpu:trainer"][1:] == [50.0]
    assert list(h.data(["t"])) == ["t"]


def test_every_kind_of_value_in_a_record_becomes_the_float_it_reads_as():
    # numbers, bools, None, the status layer's non-finite strings: the fast (whole-column) path;
    # a word, a list, a dict, an int beyond a float: value by value, NaN where it is no number
    h = History(["fast", "slow"], 100)
    fast = [1, 2.5, True, None, "inf", "-inf", " 3 "]
    slow = [1, "loss", [1, 2], {"a": 1}, 10**400, -10**400, "nan"]
    h.extend({"fast": f, "slow": s} for f, s in zip(fast, slow))
    got = h.since(-1)
    assert got["fast"][:3] == [1.0, 2.5, 1.0] and math.isnan(got["fast"][3])
    assert got["fast"][4:] == [math.inf, -math.inf, 3.0]
    assert got["slow"][0] == 1.0 and all(math.isnan(v) for v in got["slow"][1:4])
    assert got["slow"][4:6] == [math.inf, -math.inf] and math.isnan(got["slow"][6])
