"""keel.watch.crashes: the same crash at the same step, run after run, stops the restarts early."""

from __future__ import annotations

from keel.render.contract import SameCrash
from keel.watch.crashes import CrashStreak
from keel.watch.endings import EndState

S = SameCrash(enabled=True, resumes=2, steps=3)


def crashed(step: int | None, exc: str | None = "ValueError: boom") -> EndState:
    return EndState("crashed", "crashed", pid=1, exit_code=1, exception=exc, step=step)


def streak(*ends: EndState) -> CrashStreak:
    s = CrashStreak()
    for e in ends:
        s.record(e, S)
    return s


def test_the_same_crash_after_k_resumes_gives_the_reason():
    s = streak(crashed(5), crashed(5))
    assert s.same_crash(S) is None  # one resume so far
    s.record(crashed(5), S)
    assert s.same_crash(S) == "crashes at step 5 each time: ValueError: boom (3 runs in a row)"


def test_steps_within_the_tolerance_count_as_the_same_step():
    assert streak(crashed(5), crashed(7), crashed(8)).same_crash(S).startswith("crashes at steps 5-8 each time")
    assert streak(crashed(5), crashed(7), crashed(9)).same_crash(S) is None


def test_another_exception_or_another_kind_of_end_breaks_the_streak():
    assert streak(crashed(5), crashed(5, "KeyError: x"), crashed(5)).same_crash(S) is None
    assert streak(crashed(5), crashed(5), EndState("killed", "killed by SIGKILL"), crashed(5)).same_crash(S) is None


def test_a_plain_command_without_step_or_exception_never_qualifies():
    assert streak(crashed(None), crashed(None), crashed(None)).same_crash(S) is None
    assert streak(crashed(5, None), crashed(5, None), crashed(5, None)).same_crash(S) is None


def test_disabled_never_gives_up_and_the_streak_round_trips():
    s = streak(crashed(5), crashed(5), crashed(5))
    assert s.same_crash(SameCrash(enabled=False, resumes=2, steps=5)) is None
    back = CrashStreak.from_list(s.to_list())
    assert back == s and back.same_crash(S) is not None
    assert CrashStreak.from_list([{"bad": 1}, None]).crashes == []
