"""Crash torture: writers SIGKILLed at random moments, with readers running alongside.

Writers are forked from the test process (a fork costs about a millisecond, a fresh
interpreter a hundred), so a thousand kills fit in seconds. Children leave only by
os._exit: no pytest code runs in them.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
import zlib
from datetime import datetime, timezone
from pathlib import Path

import pytest

from keel.status.models import ProcessStatus, State
from keel.status.jsonl import JsonlWriter
from keel.status.jsonl_tail import JsonlTail
from keel.status.reader import StatusReader
from keel.status.snapshot import StatusWriter
from tests.support import is_alive

pytestmark = pytest.mark.slow

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)
KILLS = 1000
METRICS_BACKUPS = 4  # the torture writer's rotations kept
READS = 100_000
MAX_SNAPSHOT = 2 << 20


def snapshot(n: int, size: int) -> ProcessStatus:
    """A status whose payload carries a blob of about `size` bytes and its CRC."""
    blob = (f"{n:08d}" * (size // 8 + 1))[:size]
    return ProcessStatus(
        name="torture", kind="torture", host="h", pid=os.getpid(), pid_start_time=0.0, state=State.RUNNING,
        started_at=T0, heartbeat_wall=T0, heartbeat_mono=time.monotonic(),
        payload={"n": n, "crc": zlib.crc32(blob.encode()), "blob": blob},
    )


def check(result, path) -> ProcessStatus:
    """The snapshot is whole: it parses and its embedded checksum matches."""
    assert isinstance(result, ProcessStatus), f"{path}: {result}"
    p = result.payload
    assert zlib.crc32(p["blob"].encode()) == p["crc"], f"torn snapshot n={p['n']}"
    return result


def random_size(rng: random.Random) -> int:
    # Mostly small (the real case), sometimes up to 2 MB: a kill still lands in a
    # big write often, since big writes take longest, and the reader's 100,000 reads
    # stay cheap (most of the time the file on disk is a small one).
    if rng.random() < 0.97:
        return rng.randint(1 << 10, 8 << 10)
    return int(2 ** rng.uniform(13, 21))


def fork(fn) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = fn()
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def reader_loop(run: Path, reads: int, report: Path) -> int:
    r = StatusReader(run, max_bytes=4 << 20)
    last_seq = 0
    for i in range(reads):
        got = r.read("torture")
        try:
            check(got, run)
            assert got.seq >= last_seq, f"seq went back: {got.seq} < {last_seq}"
        except AssertionError as e:
            report.write_text(f"read {i}: {e}")
            return 1
        last_seq = got.seq
    report.write_text(f"ok {reads} reads, last seq {last_seq}")
    return 0


def test_snapshots_survive_1000_sigkills_with_a_concurrent_reader(tmp_path, reaper):
    run = tmp_path / "run"
    run.mkdir()
    rng = random.Random(1234)
    StatusWriter(run, "torture").write(snapshot(0, 1024))  # readers never see "missing"
    report = tmp_path / "reader.txt"
    reader = fork(lambda: reader_loop(run, READS, report))
    reaper.track(reader)

    def writer(n0: int, seed: int, ready: int) -> int:
        wrng = random.Random(seed)
        w = StatusWriter(run, "torture")
        os.write(ready, b"r")  # the kill delay starts once we are really writing
        n = n0
        while True:
            n += 1
            w.write(snapshot(n, random_size(wrng)))

    kills, last_seq, mid_write, deadline = 0, 0, 0, time.monotonic() + 240
    reader_done = False
    ready_r, ready_w = os.pipe()
    while kills < KILLS or not reader_done:
        assert time.monotonic() < deadline, f"torture too slow: {kills} kills; reader {report.read_text() if report.exists() else 'running'}"
        child = fork(lambda: writer(kills * 1_000_000, rng.random(), ready_w))
        try:
            assert os.read(ready_r, 1) == b"r"
            time.sleep(rng.uniform(0, 0.012))
        finally:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
        kills += 1
        mid_write += any(p.name.startswith(".torture.status.json.tmp.") for p in run.iterdir())
        got = check(StatusReader(run, max_bytes=4 << 20).read("torture"), run)
        assert got.seq >= last_seq
        last_seq = got.seq
        if not reader_done and os.waitpid(reader, os.WNOHANG) != (0, 0):
            reader_done = True
            assert report.read_text().startswith("ok"), report.read_text()
    os.close(ready_r)
    os.close(ready_w)
    # The torture was real: kills landed inside a write (between temp open and replace,
    # so a temp file was left). On a quiet machine about a third do; under heavy load
    # the child is seldom running when the kill comes, hence the low bar.
    assert kills >= KILLS and mid_write >= KILLS // 100, (mid_write, last_seq)
    # A new writer sweeps the temps the killed ones left, and carries seq on.
    w = StatusWriter(run, "torture")
    assert sorted(p.name for p in run.iterdir()) == ["torture.lock", "torture.status.json"]
    assert w.write(snapshot(1, 10)).seq == last_seq + 1
    assert not is_alive(reader)


def test_metrics_tail_loses_and_repeats_nothing_across_1000_sigkills(tmp_path, reaper):
    log = tmp_path / "torture.metrics.jsonl"
    rng = random.Random(99)
    tail = JsonlTail(log)
    seen: list[int] = []

    def writer(start: int) -> int:
        # At most 3,000 records (~600 KB) a life, less than the 1.25 MB the rotation
        # keeps: the tail can always catch up, so any gap is a bug, not lag.
        w = JsonlWriter(log, max_bytes=256 << 10, backups=METRICS_BACKUPS)
        for i in range(start, start + 3000):
            body = "m" * (i % 300)
            w.append({"i": i, "crc": zlib.crc32(body.encode()), "body": body})
        time.sleep(60)
        return 0

    def take() -> None:
        for rec in tail.read_new():
            assert zlib.crc32(rec["body"].encode()) == rec["crc"], rec["i"]
            assert rec["i"] == (seen[-1] + 1 if seen else 0), f"after {seen[-1:]} got {rec['i']}"
            seen.append(rec["i"])

    for _ in range(KILLS):
        child = fork(lambda: writer(seen[-1] + 1 if seen else 0))
        reaper.track(child)
        try:
            end = time.monotonic() + rng.uniform(0, 0.006)
            while time.monotonic() < end:  # tail while the child writes: partial lines happen here
                take()
        finally:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
        take()  # everything up to the kill point
    assert len(seen) > KILLS and tail.rotations > 10
    # A line cut by the kill (a signal can stop a write between pages) is trimmed by the next
    # writer, never half-parsed, never taken for a record (keel.status.jsonl _drop_cut_line).
    assert tail.corrupt_lines <= KILLS and tail.gaps == 0
    # The last whole line on disk is the last record read. The newest whole line may be in a
    # rotated file: the last child can die between a rotation and its first line, leaving the
    # live file empty; a cut line after it (no later writer trimmed it) is no record.
    assert json.loads(_last_whole_line(log))["i"] == seen[-1]


def _last_whole_line(log: Path) -> bytes:
    for p in [log, *(Path(f"{log}.{i}") for i in range(1, METRICS_BACKUPS + 1))]:
        data = p.read_bytes() if p.exists() else b""
        whole = data[: data.rfind(b"\n") + 1].splitlines()
        if whole:
            return whole[-1]
    raise AssertionError(f"no whole line in {log} or its rotations")
