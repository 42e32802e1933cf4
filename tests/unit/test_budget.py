"""keel.watch.budget.RestartBudget: backoff sequence, jitter bounds, exhaustion, reset, persistence."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings, strategies as st

from keel.watch.budget import BudgetSettings, Decision, RestartBudget, backoff_delay

NO_JITTER = BudgetSettings(backoff_initial=1.0, backoff_max=8.0, max_restarts=10, window=1000.0, stable_after=60.0,
                           jitter="none")


def test_backoff_doubles_from_initial_to_max():
    b = RestartBudget(NO_JITTER)
    now, delays = 0.0, []
    for _ in range(6):
        assert b.check(now).decision is Decision.RESTART
        delays.append(b.record_restart(now))
        now = b.next_allowed
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_the_first_restart_is_immediate_and_the_next_waits():
    b = RestartBudget(NO_JITTER)
    assert b.check(100.0) == b.check(100.0)  # check() does not spend anything
    d = b.check(100.0)
    assert (d.decision, d.attempt, d.next_allowed_in) == (Decision.RESTART, 1, 0.0)
    b.record_restart(100.0)
    d = b.check(100.4)
    assert (d.decision, d.attempt) == (Decision.WAIT, 2) and d.next_allowed_in == pytest.approx(0.6)
    assert b.check(101.0).decision is Decision.RESTART


@given(attempt=st.integers(1, 30), seed=st.integers(0, 2**32), initial=st.floats(0.01, 100), cap=st.floats(0.01, 1000))
@settings(max_examples=300, deadline=None)
def test_jitter_bounds(attempt, seed, initial, cap):
    initial = min(initial, cap)
    base = min(cap, initial * 2 ** (attempt - 1))
    rng = random.Random(seed)
    full = backoff_delay(attempt, BudgetSettings(backoff_initial=initial, backoff_max=cap, jitter="full"), rng)
    equal = backoff_delay(attempt, BudgetSettings(backoff_initial=initial, backoff_max=cap, jitter="equal"), rng)
    assert 0.0 <= full <= base
    assert base / 2 <= equal <= base


def test_full_jitter_spreads_delays():
    b = BudgetSettings(backoff_initial=10.0, backoff_max=10.0, jitter="full")
    rng = random.Random(1)
    delays = [backoff_delay(1, b, rng) for _ in range(200)]
    assert min(delays) < 2.0 and max(delays) > 8.0  # not all the same: a fleet does not restart in lockstep


def test_budget_exhaustion_gives_up_and_stays_given_up():
    s = BudgetSettings(backoff_initial=1.0, backoff_max=1.0, max_restarts=3, window=100.0, jitter="none")
    b = RestartBudget(s)
    now = 0.0
    for _ in range(3):
        assert b.check(now).decision is Decision.RESTART
        b.record_restart(now)
        now += 1.0
    d = b.check(now)
    assert (d.decision, d.restarts_in_window, d.attempt) == (Decision.GIVE_UP, 3, 4)
    b.record_give_up()
    assert b.check(now + 1000).decision is Decision.GIVE_UP  # even after the window: given up means given up


def test_restarts_older_than_the_window_no_longer_count():
    s = BudgetSettings(backoff_initial=1.0, backoff_max=1.0, max_restarts=2, window=10.0, jitter="none")
    b = RestartBudget(s)
    b.record_restart(0.0)
    b.record_restart(1.0)
    assert b.check(5.0).decision is Decision.GIVE_UP
    assert b.check(10.5).decision is Decision.RESTART  # the one at 0.0 left the window
    assert b.check(10.5).restarts_in_window == 1


def test_budget_resets_after_a_stable_period():
    b = RestartBudget(NO_JITTER)
    b.record_restart(0.0)
    b.record_restart(2.0)
    assert not b.record_healthy(10.0)
    assert not b.record_healthy(69.0)
    assert b.record_healthy(70.0)  # 60 s healthy in a row
    assert (b.attempt, b.restarts, b.next_allowed, b.restarts_total) == (0, [], 0.0, 2)
    assert not b.record_healthy(200.0)  # nothing left to reset: no second reset event


def test_an_unhealthy_poll_restarts_the_stable_period():
    b = RestartBudget(NO_JITTER)
    b.record_restart(0.0)
    b.record_healthy(10.0)
    b.record_unhealthy()
    assert not b.record_healthy(71.0)
    assert not b.record_healthy(130.0)
    assert b.record_healthy(131.0)


def test_round_trip_through_a_dict():
    b = RestartBudget(NO_JITTER)
    b.record_restart(5.0)
    b.record_healthy(7.0)
    b.record_give_up()
    again = RestartBudget.from_dict(b.to_dict(), NO_JITTER)
    assert again.to_dict() == b.to_dict()


def test_times_from_another_boot_are_dropped_but_give_up_kept():
    b = RestartBudget(NO_JITTER)
    b.record_restart(5_000_000.0)
    b.record_give_up()
    again = RestartBudget.from_dict(b.to_dict(), NO_JITTER, times_valid=False)
    assert again.restarts == [] and again.next_allowed == 0.0 and again.gave_up and again.restarts_total == 1


def test_settings_from_a_keel_json_restart_block():
    s = BudgetSettings.from_config(
        {"policy": "always", "backoff_initial": 2.0, "backoff_max": 60.0, "max_restarts": 5, "window": 600.0}, 300.0
    )
    assert (s.backoff_initial, s.backoff_max, s.max_restarts, s.window, s.stable_after) == (2.0, 60.0, 5, 600.0, 300.0)
