"""The debiased, time-weighted EMA drawn over every raw curve."""

import math

import numpy as np

from dashboard.smoothing import ema


def test_weight_zero_is_the_raw_series():
    y = np.array([1.0, 5.0, 2.0])
    assert np.array_equal(ema(np.arange(3.0), y, 0.0), y)


def test_debiased_first_value_is_the_first_point_not_pulled_to_zero():
    out = ema(np.arange(5.0), np.full(5, 10.0), 0.9)
    assert np.allclose(out, 10.0)  # a biased EMA would start at 1.0


def test_time_weighted_a_long_gap_forgets_more():
    even = ema(np.array([0.0, 1, 2, 3]), np.array([0.0, 0, 0, 10]), 0.9)
    gap = ema(np.array([0.0, 1, 2, 30]), np.array([0.0, 0, 0, 10]), 0.9)
    assert gap[-1] > even[-1]


def test_nan_is_skipped_and_kept():
    out = ema(np.arange(4.0), np.array([1.0, math.nan, 1.0, 1.0]), 0.5)
    assert math.isnan(out[1]) and np.allclose(out[[0, 2, 3]], 1.0)
