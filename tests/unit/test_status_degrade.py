"""The status channel degrades, never kills: a failed write is counted, logged once per kind,
retried with backoff, and carried by the next snapshot that gets through; metrics wait in memory.

Each failure kind is injected on one chosen OS call through the OsOps seam; the
clock is injected, so backoff is checked by moving time, not by waiting.
"""

from __future__ import annotations

import errno
import json
import logging
import os

import pytest

from keel.fs.lock import FileLock
from keel.fs.osops import OsOps
from keel.status.degrade import Backoff, WriteFailures, failure_kind
from keel.status.jsonl import JsonlWriter, encode_record
from keel.status.models import State
from keel.status.paths import lock_path
from keel.status.reader import StatusReader
from keel.status.reporter import ProcessReporter
from keel.status.results import StatusLockTimeout
from keel.status.spool import JsonlSpool


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Breakable(OsOps):
    """Fails every call of one op (`fail_op`) with `err` while `broken`; otherwise the real call."""

    def __init__(self, fail_op: str, err: int) -> None:
        self.fail_op, self.err, self.broken = fail_op, err, False

    def _check(self, op: str) -> None:
        if self.broken and op == self.fail_op:
            raise OSError(self.err, os.strerror(self.err))

    def open(self, *a, **kw):
        self._check("open")
        return super().open(*a, **kw)

    def write(self, fd, data):
        self._check("write")
        return super().write(fd, data)

    def replace(self, *a, **kw):
        self._check("replace")
        return super().replace(*a, **kw)


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def make_reporter(tmp_path, ops, clock, **kw) -> ProcessReporter:
    rep = ProcessReporter(tmp_path, "trainer", "trainer", heartbeat_interval=3600, mono=clock, ops=ops,
                          retry_initial=1.0, retry_max=8.0, **kw)
    rep.start(payload={"run_id": "r1"})
    return rep


@pytest.mark.parametrize(
    ("op", "err"),
    [("write", errno.ENOSPC), ("write", errno.EIO), ("write", errno.EDQUOT), ("open", errno.EROFS), ("replace", errno.EIO)],
)
def test_failed_status_writes_are_counted_and_carried_by_the_next_snapshot(tmp_path, caplog, op, err):
    clock, ops = Clock(), Breakable(op, err)
    rep = make_reporter(tmp_path, ops, clock)
    reader = StatusReader(tmp_path)
    rep.progress(step=1)
    ops.broken = True
    caplog.set_level(logging.INFO, logger="keel.status")
    for step in range(2, 6):  # never raises; in backoff only the first attempt is made
        rep.progress(step=step)
    assert rep.failures.count == 1 and reader.read("trainer").payload.step == 1
    clock.t += 1.0
    rep.progress(step=6)  # due again: fails again, counted, not logged again
    assert rep.failures.count == 2
    kind = errno.errorcode[err]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].kind == kind and warnings[0].channel == "status"
    ops.broken = False
    rep.progress(step=7)  # still in backoff (2 s after the second failure): memory only
    assert reader.read("trainer").payload.step == 1
    clock.t += 2.0
    rep.beat()  # the heartbeat resumes the channel by itself
    s = reader.read("trainer")
    assert s.payload.step == 7 and s.pid == os.getpid() and s.write_failures == 2
    assert s.last_write_error.startswith(f"{kind}: ") and os.strerror(err) in s.last_write_error
    assert any(r.getMessage().endswith("writes resumed (2 failed writes so far)") for r in caplog.records)
    rep.close()
    assert reader.read("trainer").state is State.STOPPED


def test_lock_timeout_degrades_like_a_write_error(tmp_path):
    clock = Clock()
    rep = make_reporter(tmp_path, OsOps(), clock, lock_timeout=0.05)
    other = FileLock(lock_path(tmp_path, "trainer"), timeout=1.0)
    with other:  # another writer holds the lock (same process, other FileLock: flock excludes it)
        rep.set_state(State.RUNNING)
    assert rep.failures.count == 1 and rep.failures.last_error.startswith("StatusLockTimeout: ")
    assert failure_kind(StatusLockTimeout("/x", 1.0)) == "StatusLockTimeout"
    clock.t += 1.0
    rep.beat()
    s = StatusReader(tmp_path).read("trainer")
    assert s.state is State.RUNNING and s.write_failures == 1 and "could not lock" in s.last_write_error
    rep.close()


def test_metrics_wait_in_memory_and_are_written_in_order_when_space_returns(tmp_path):
    clock, ops = Clock(), Breakable("write", errno.ENOSPC)
    rep = make_reporter(tmp_path, ops, clock)
    log = tmp_path / "trainer.metrics.jsonl"
    rep.metrics([{"step": 0}])
    ops.broken = True
    for step in range(1, 20):
        rep.metrics([{"step": step}])
    assert records(log) == [{"step": 0}] and rep.metrics_pending == 19
    ops.broken = False
    clock.t += 1.0
    rep.beat()  # nothing new to append: the heartbeat flushes the queue
    assert [r["step"] for r in records(log)] == list(range(20)) and rep.metrics_pending == 0
    s = StatusReader(tmp_path).read("trainer")
    assert s.metrics_dropped == 0 and s.write_failures >= 1 and "ENOSPC" in s.last_write_error
    rep.close()


def test_over_budget_the_oldest_waiting_records_are_dropped_and_counted(tmp_path):
    clock, ops = Clock(), Breakable("write", errno.ENOSPC)
    line = len(encode_record({"step": 10}))
    rep = make_reporter(tmp_path, ops, clock, metrics_buffer_bytes=5 * line)
    ops.broken = True
    for step in range(10, 20):
        rep.metrics([{"step": step}])
    assert rep.metrics_pending == 5
    ops.broken = False
    clock.t += 1.0
    rep.beat()
    assert [r["step"] for r in records(tmp_path / "trainer.metrics.jsonl")] == [15, 16, 17, 18, 19]
    rep.beat()
    assert StatusReader(tmp_path).read("trainer").metrics_dropped == 5
    rep.close()


def test_close_on_a_full_disk_does_not_raise_and_counts_what_stayed_unwritten(tmp_path):
    clock, ops = Clock(), Breakable("write", errno.ENOSPC)
    rep = make_reporter(tmp_path, ops, clock)
    ops.broken = True
    rep.metrics([{"step": 1}, {"step": 2}])
    rep.close(State.STOPPED)  # neither the final state nor the metrics can be written
    assert rep._spool.dropped == 2 and rep.failures.count >= 2
    assert StatusReader(tmp_path).read("trainer").state is State.STARTING  # the last one that got through


def test_a_batch_cut_by_a_full_disk_keeps_its_whole_records_and_retries_the_rest(tmp_path):
    class FillsUp(OsOps):
        room = 30  # bytes left on the "disk"

        def write(self, fd, data):
            if self.room <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            n = os.write(fd, bytes(data[: self.room]))
            self.room -= n
            return n

    ops = FillsUp()
    log = tmp_path / "m.jsonl"
    spool = JsonlSpool(JsonlWriter(log, ops=ops), budget_bytes=1 << 20, failures=WriteFailures("t"),
                       backoff=Backoff(1.0, 1.0, mono=(clock := Clock())))
    spool.append_many([{"step": i} for i in range(5)])  # 11 bytes each: two fit, the third is cut
    assert log.read_bytes() == b'{"step":0}\n{"step":1}\n' and spool.pending == 3
    ops.room = 1000
    clock.t += 1.0
    assert spool.retry() and [r["step"] for r in records(log)] == [0, 1, 2, 3, 4]


def test_backoff_doubles_to_its_cap_and_resets_on_success():
    clock = Clock()
    b = Backoff(0.5, 2.0, mono=clock)
    assert b.ready() and not b.failing
    delays = []
    for _ in range(4):
        b.failed()
        delays.append(b.delay)
        assert not b.ready()
        clock.t += b.delay
        assert b.ready()
    assert delays == [0.5, 1.0, 2.0, 2.0]
    b.succeeded()
    assert b.ready() and not b.failing
    with pytest.raises(ValueError):
        Backoff(0, 1)


def test_write_failures_log_once_per_kind(caplog):
    caplog.set_level(logging.WARNING, logger="keel.status")
    f = WriteFailures("trainer")
    for err in (errno.ENOSPC, errno.ENOSPC, errno.EIO, errno.ENOSPC, errno.EIO):
        f.record(OSError(err, os.strerror(err)), "metrics")
    assert f.count == 5 and f.kinds == {"ENOSPC": 3, "EIO": 2}
    assert [r.kind for r in caplog.records] == ["ENOSPC", "EIO"]
    assert f.last_error == "EIO: [Errno 5] Input/output error"
