"""Fault injection, SQLite style: make the k-th OS call of a write fail, once or for good.

After every failure the old snapshot is byte-identical, no temp file remains and the
error names the path. Plus real limits: EFBIG from RLIMIT_FSIZE in a forked child,
and a read-only run dir.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import resource
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from keel.status.models import State
from keel.fs.osops import OsOps
from keel.status.jsonl import JsonlWriter, encode_record
from keel.status.jsonl_tail import JsonlTail
from keel.status.reader import StatusReader
from keel.status.results import StatusWriteError
from keel.status.snapshot import StatusWriter
from tests.unit.test_statusfile import make_status

FAULTY = ("open", "write", "fsync", "close", "replace")


class FaultOps(OsOps):
    """Counts calls to the faulty ops; the k-th (1-based) fails with `err`, once or from then on."""

    def __init__(self, k: int = 0, persistent: bool = False, err: int = errno.EIO) -> None:
        self.k, self.persistent, self.err = k, persistent, err
        self.calls: list[str] = []
        self.failed: list[str] = []

    def _tick(self, op: str) -> None:
        self.calls.append(op)
        n = len(self.calls)
        if self.k and (n == self.k or (self.persistent and n > self.k)):
            self.failed.append(op)
            raise OSError(self.err, os.strerror(self.err))


for _op in FAULTY:
    def _make(op: str):
        base = getattr(OsOps, op)

        def wrapped(self, *a, **kw):
            self._tick(op)
            return base(self, *a, **kw)
        return wrapped
    setattr(FaultOps, _op, _make(_op))


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if ".tmp." in p.name)


def ops_per_write(tmp_path: Path, durability: str) -> list[str]:
    d = tmp_path / f"count-{durability}"
    d.mkdir()
    ops = FaultOps()
    StatusWriter(d, "trainer", durability=durability, ops=ops).write(make_status())
    return ops.calls


@pytest.mark.parametrize("durability", ["none", "fsync"])
def test_every_op_failing_once_and_persistently_leaves_old_file(tmp_path, durability):
    calls = ops_per_write(tmp_path, durability)
    assert calls == (["open", "write", "close", "replace"] if durability == "none"
                     else ["open", "write", "fsync", "close", "replace", "fsync"])
    for k in range(1, len(calls) + 1):
        for persistent in (False, True):
            d = tmp_path / f"{durability}-{k}-{persistent}"
            d.mkdir()
            StatusWriter(d, "trainer").write(make_status(state=State.STARTING))
            old = (d / "trainer.status.json").read_bytes()
            ops = FaultOps(k, persistent)
            w = StatusWriter(d, "trainer", durability=durability, ops=ops)
            with pytest.raises(StatusWriteError) as e:
                w.write(make_status(state=State.RUNNING))
            assert e.value.errno == errno.EIO and isinstance(e.value, OSError)
            assert leftovers(d) == [], (k, persistent)
            dir_sync = durability == "fsync" and k == len(calls)
            if dir_sync:
                # The rename happened; only its durability is unknown. Reported, with the dir.
                assert e.value.filename == str(d)
                assert StatusReader(d).read("trainer").state is State.RUNNING
            else:
                assert e.value.filename == str(d / "trainer.status.json")
                assert str(d / "trainer.status.json") in str(e.value)
                assert (d / "trainer.status.json").read_bytes() == old, (k, persistent, ops.failed)
            if persistent:
                with pytest.raises(StatusWriteError):
                    w.write(make_status(state=State.STOPPING))
                assert leftovers(d) == []
                if not dir_sync:
                    assert (d / "trainer.status.json").read_bytes() == old
            else:
                got = w.write(make_status(state=State.STOPPED))  # the next write recovers
                assert StatusReader(d).read("trainer") == got and got.seq == (3 if dir_sync else 2)


def test_short_writes_are_completed(tmp_path):
    class Dribble(OsOps):
        def write(self, fd, data):
            return os.write(fd, bytes(data[:7]))

    got = StatusWriter(tmp_path, "trainer", ops=Dribble()).write(make_status())
    assert StatusReader(tmp_path).read("trainer") == got


def test_only_target_matches_globs_while_a_write_is_in_flight(tmp_path):
    seen: list[list[str]] = []

    class Peek(OsOps):
        def replace(self, src, dst, **kw):
            names = os.listdir(tmp_path)
            seen.append(names)
            assert src in names
            super().replace(src, dst, **kw)

    w = StatusWriter(tmp_path, "trainer", ops=Peek())
    w.write(make_status())
    w.write(make_status())
    for names in seen:
        assert fnmatch.filter(names, "*.status.json") in ([], ["trainer.status.json"])
        assert fnmatch.filter(names, "*.jsonl") == []


def test_jsonl_append_failure_names_the_path(tmp_path):
    class FailWrite(OsOps):
        def write(self, fd, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    log = tmp_path / "trainer.metrics.jsonl"
    with pytest.raises(StatusWriteError) as e:
        JsonlWriter(log, ops=FailWrite()).append({"step": 1})
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(log)


# ---------------------------------------------------------------- real limits


def _in_child_with_fsize_limit(limit: int, fn) -> int:
    """Run fn() in a forked child under RLIMIT_FSIZE=limit; returns its exit code."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
            code = fn()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_real_efbig_leaves_old_snapshot(tmp_path):
    w = StatusWriter(tmp_path, "trainer")
    w.write(make_status())
    old = (tmp_path / "trainer.status.json").read_bytes()

    def child() -> int:
        try:
            StatusWriter(tmp_path, "trainer").write(make_status(last_error="x" * 5000))
        except StatusWriteError as e:
            return 0 if e.errno == errno.EFBIG and e.filename == str(tmp_path / "trainer.status.json") else 2
        return 1

    assert _in_child_with_fsize_limit(len(old) + 100, child) == 0
    assert (tmp_path / "trainer.status.json").read_bytes() == old
    assert leftovers(tmp_path) == []


def test_real_efbig_in_log_cuts_no_record(tmp_path):
    log = tmp_path / "trainer.metrics.jsonl"
    with JsonlWriter(log) as jw:
        jw.append({"step": 0})
    size = log.stat().st_size

    def child() -> int:
        try:
            JsonlWriter(log).append({"step": 1, "blob": "y" * 5000})
        except StatusWriteError as e:
            return 0 if e.errno == errno.EFBIG and e.filename == str(log) else 2
        return 1

    assert _in_child_with_fsize_limit(size + 100, child) == 0
    assert log.stat().st_size == size  # the cut part of record 1 was trimmed off again
    with JsonlWriter(log) as jw:
        jw.append({"step": 2})
    tail = JsonlTail(log)
    assert [r["step"] for r in tail.read_new()] == [0, 2] and tail.corrupt_lines == 0


class _NoTruncate(OsOps):
    def ftruncate(self, fd, length):
        raise OSError(errno.EIO, os.strerror(errno.EIO))


class _CutThenNoTruncate(_NoTruncate):
    def write(self, fd, data):
        if len(data) > 20:  # the batch: half of it lands, then the disk is full
            n = os.write(fd, bytes(data[: len(data) // 2]))
            if n:
                return n
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _cut_by_a_full_disk(log) -> None:
    w = JsonlWriter(log, ops=_CutThenNoTruncate())
    with pytest.raises(StatusWriteError) as e:
        w.append_many([{"step": 1}, {"step": 2, "pad": "p" * 40}])
    assert e.value.errno == errno.ENOSPC and e.value.records_written == 1
    assert not log.read_bytes().endswith(b"\n")  # the cut line stayed


def test_cut_line_that_its_writer_could_not_trim_is_trimmed_by_the_next(tmp_path):
    log = tmp_path / "trainer.metrics.jsonl"
    _cut_by_a_full_disk(log)
    with JsonlWriter(log) as jw:
        jw.append({"step": 3})
    tail = JsonlTail(log)
    assert [r["step"] for r in tail.read_new()] == [1, 3] and tail.corrupt_lines == 0
    assert log.read_bytes() == encode_record({"step": 1}) + encode_record({"step": 3})


def test_cut_line_that_no_writer_can_trim_is_ended_unparseable(tmp_path):
    log = tmp_path / "trainer.metrics.jsonl"
    _cut_by_a_full_disk(log)
    with JsonlWriter(log, ops=_NoTruncate()) as jw:  # ends the cut line before appending
        jw.append({"step": 3})
    tail = JsonlTail(log)
    assert [r["step"] for r in tail.read_new()] == [1, 3] and tail.corrupt_lines == 1


def test_a_line_cut_just_before_its_newline_is_not_a_record(tmp_path):
    """A writer SIGKILLed between a line's last brace and its newline leaves a whole JSON object
    without its end: the next writer, resuming from what a reader saw, writes that record again.
    Ended with a newline, the cut line would be read as a record too: a repeat (found by the
    1,000-SIGKILL torture test, "after [910] got 910")."""
    log = tmp_path / "trainer.metrics.jsonl"
    with JsonlWriter(log) as jw:
        jw.append({"i": 0})
    with open(log, "ab") as f:
        f.write(encode_record({"i": 1})[:-1])  # all but the newline
    tail = JsonlTail(log)
    assert [r["i"] for r in tail.read_new()] == [0]  # the cut line is held back
    with JsonlWriter(log) as jw:  # the resumed writer: the reader saw up to 0
        jw.append({"i": 1})
        jw.append({"i": 2})
    assert [r["i"] for r in tail.read_new()] == [1, 2] and tail.corrupt_lines == 0
    assert [r["i"] for r in JsonlTail(log).read_new()] == [0, 1, 2]


@contextmanager
def read_only_dir(path: Path):
    """A directory root cannot write to: a read-only tmpfs mount, else chattr +i; skip if neither works."""
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True).returncode == 0:
        try:
            yield path, lambda: subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True), errno.EROFS
        finally:
            subprocess.run(["umount", "-l", str(path)], check=False)
        return
    if subprocess.run(["chattr", "-i", str(path)], capture_output=True).returncode == 0:
        try:
            yield path, lambda: subprocess.run(["chattr", "+i", str(path)], check=True), errno.EPERM
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=False)
        return
    pytest.skip("cannot make a read-only dir as this user: no tmpfs mount, no chattr")


def test_read_only_run_dir_gives_a_clear_error(tmp_path):
    with read_only_dir(tmp_path / "run") as (d, make_ro, expected):
        with StatusWriter(d, "trainer") as w:  # closed: an fd open for writing blocks remount,ro
            w.write(make_status(state=State.STARTING))
        old = (d / "trainer.status.json").read_bytes()
        make_ro()
        with pytest.raises(StatusWriteError) as e:
            StatusWriter(d, "trainer").write(make_status(state=State.RUNNING))
        assert e.value.errno == expected
        assert str(d) in str(e.value) and "cannot" in str(e.value)
        assert (d / "trainer.status.json").read_bytes() == old
        assert StatusReader(d).read("trainer").state is State.STARTING  # readers still work


def test_failed_rotation_is_reported_and_the_log_stays_usable(tmp_path):
    class FailRename(OsOps):
        fail = True

        def rename(self, src, dst):
            if self.fail:
                raise OSError(errno.EACCES, os.strerror(errno.EACCES))
            super().rename(src, dst)

    log = tmp_path / "trainer.metrics.jsonl"
    ops = FailRename()
    w = JsonlWriter(log, max_bytes=60, backups=2, ops=ops)
    w.append({"i": 0, "pad": "p" * 30})
    with pytest.raises(StatusWriteError) as e:
        w.append({"i": 1, "pad": "p" * 30})
    assert e.value.errno == errno.EACCES and e.value.filename == str(log)
    ops.fail = False
    w.append({"i": 2, "pad": "p" * 30})
    # Record 1 was refused (the caller got the error); 0 was rotated out by the retry.
    rotated = [json.loads(line)["i"] for line in (tmp_path / "trainer.metrics.jsonl.1").read_bytes().splitlines()]
    assert rotated == [0] and [r["i"] for r in JsonlTail(log).read_new()] == [2]
