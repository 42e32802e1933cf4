"""ProcessReporter: state transitions, heartbeat vs progress clocks, metrics, thread safety."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest

from keel.status.models import ProcessStatus, State, TrainingStatus
from keel.status.reporter import ProcessReporter
from keel.status.jsonl_tail import JsonlTail
from keel.status.reader import StatusReader
from tests.support import wait_until


class FakeClocks:
    def __init__(self) -> None:
        self.wall_t = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)
        self.mono_t = 1000.0

    def wall(self) -> datetime:
        return self.wall_t

    def mono(self) -> float:
        return self.mono_t


def test_lifecycle_progress_and_metrics(tmp_path):
    c = FakeClocks()
    rep = ProcessReporter(tmp_path, "trainer", "trainer", heartbeat_interval=60, wall=c.wall, mono=c.mono)
    rep.start(payload={"run_id": "r1"})
    r = StatusReader(tmp_path)
    s = r.read("trainer")
    assert s.state is State.STARTING and s.progress_mono is None and isinstance(s.payload, TrainingStatus)
    rep.set_state(State.RUNNING)
    c.mono_t += 5
    rep.progress(step=10, loss=0.25)
    s = r.read("trainer")
    assert (s.state, s.payload.step, s.payload.loss, s.progress_mono) == (State.RUNNING, 10, 0.25, 1005.0)
    rep.metrics([{"step": i, "loss": 1.0 / (i + 1)} for i in range(5)])
    assert [m["step"] for m in JsonlTail(tmp_path / "trainer.metrics.jsonl").read_new()] == list(range(5))
    rep.close()
    s = r.read("trainer")
    assert s.state is State.STOPPED and s.payload.step == 10
    assert not rep.heartbeat.running


@pytest.mark.parametrize("jump", [timedelta(hours=1), timedelta(hours=-1)])
def test_heartbeat_thread_never_moves_progress_clock(tmp_path, jump):
    c = FakeClocks()
    rep = ProcessReporter(tmp_path, "trainer", "trainer", heartbeat_interval=0.01, wall=c.wall, mono=c.mono)
    rep.start(payload={"run_id": "r1"})
    rep.progress(step=1)
    c.mono_t = 2000.0
    c.wall_t += jump  # the wall clock jumps: ages come from the monotonic clock only
    wait_until(lambda: r.read("trainer").heartbeat_mono == 2000.0 if (r := StatusReader(tmp_path)) else False, 5)
    s = StatusReader(tmp_path).read("trainer")
    assert s.heartbeat_wall == c.wall_t  # the jumped wall clock is recorded, for people
    assert s.progress_mono == 1000.0 and s.progress_age(2010.0) == 1010.0 and s.heartbeat_age(2010.0) == 10.0
    rep.close()


def test_close_after_exception_marks_failed(tmp_path):
    try:
        with ProcessReporter(tmp_path, "dashboard", "dashboard", heartbeat_interval=60) as rep:
            rep.start()
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    s = StatusReader(tmp_path).read("dashboard")
    assert isinstance(s, ProcessStatus) and s.state is State.FAILED and "boom" in s.last_error


def test_heartbeat_and_main_thread_write_concurrently(tmp_path):
    rep = ProcessReporter(tmp_path, "trainer", "trainer", heartbeat_interval=0.001)
    rep.start(payload={"run_id": "r1"})
    def work(k):
        for i in range(100):
            rep.progress(step=i)
    ts = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    rep.close()
    s = StatusReader(tmp_path).read("trainer")
    assert s.seq == rep.status.seq and s.seq >= 302 and s.state is State.STOPPED


def test_heartbeat_survives_a_failing_beat_and_stops_cleanly():
    from keel.status.heartbeat import Heartbeat

    calls = []

    def beat():
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")

    hb = Heartbeat(0.005, beat)
    hb.start()
    wait_until(lambda: len(calls) >= 5, 5)
    hb.stop()
    n = len(calls)
    assert not hb.running and isinstance(hb.last_error, OSError) and hb.beats == n - 1
    threading.Event().wait(0.05)
    assert len(calls) == n  # really stopped


def test_reporter_before_start_and_double_close(tmp_path):
    rep = ProcessReporter(tmp_path, "watchdog", "watchdog", heartbeat_interval=60)
    rep.beat()  # no status yet: nothing to refresh, nothing written
    assert not (tmp_path / "watchdog.status.json").exists()
    rep.start(payload={"processes_watched": ["trainer"]})
    rep.update_payload(actions_taken=2)
    s = StatusReader(tmp_path).read("watchdog")
    assert s.payload.actions_taken == 2 and s.payload.processes_watched == ["trainer"] and s.progress_mono is None
    rep.close()
    seq = StatusReader(tmp_path).read("watchdog").seq
    rep.close()
    assert StatusReader(tmp_path).read("watchdog").seq == seq


def test_calls_before_start_are_refused_and_wall_clock_is_normalised(tmp_path):
    plus2 = timezone(timedelta(hours=2))
    rep = ProcessReporter(tmp_path, "job", "custom", heartbeat_interval=60,
                          wall=lambda: datetime(2026, 11, 28, 14, 0, tzinfo=plus2))
    with pytest.raises(RuntimeError, match="start"):
        rep.progress(step=1)
    rep.start({"a": 1})
    rep.progress(step=2)
    raw = (tmp_path / "job.status.json").read_text()
    assert '"progress_wall":"2026-11-28T12:00:00Z"' in raw and '"payload":{"a":1,"step":2}' in raw
    rep.close()
