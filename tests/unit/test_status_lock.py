"""The status writer's lock: timeouts that name the lock file, a SIGKILLed holder, stray opens, threads."""

from __future__ import annotations

import fcntl
import os
import signal
import threading
import time

import pytest

from keel.status.reader import StatusReader
from keel.status.results import StatusLockTimeout
from keel.status.snapshot import StatusWriter
from keel.fs.lock import LockTimeout
from tests.support import is_alive, wait_until
from tests.unit.test_statusfile import make_status


# ---------------------------------------------------------------- lock semantics


def _fork_lock_holder(tmp_path) -> tuple[int, int]:
    """A child that takes the writer lock, says so on a pipe, and sleeps."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no pytest code from here on
        try:
            os.close(r)
            StatusWriter(tmp_path, "trainer")._lock.acquire()
            os.write(w, b"x")
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"x"
    os.close(r)
    return pid, w


def test_lock_wait_times_out_naming_the_lock_file(tmp_path):
    pid, _ = _fork_lock_holder(tmp_path)
    try:
        w = StatusWriter(tmp_path, "trainer", lock_timeout=0.2)
        t = time.monotonic()
        with pytest.raises(StatusLockTimeout) as e:
            w.write(make_status())
        assert time.monotonic() - t >= 0.2  # it waited its timeout out (a lower bound: no machine-speed limit)
        assert isinstance(e.value, TimeoutError) and isinstance(e.value, LockTimeout) and e.value.timeout == 0.2
        assert e.value.path == str(tmp_path / "trainer.lock")
        assert str(tmp_path / "trainer.lock") in str(e.value)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_lock_of_sigkilled_holder_is_free_at_once(tmp_path):
    pid, _ = _fork_lock_holder(tmp_path)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert not is_alive(pid)
    # lock_timeout=0: one non-blocking try, so this succeeds only if the lock is already free.
    StatusWriter(tmp_path, "trainer", lock_timeout=0).write(make_status())
    assert (tmp_path / "trainer.lock").exists()  # never deleted


def test_stray_open_close_of_lock_file_keeps_the_lock(tmp_path):
    w = StatusWriter(tmp_path, "trainer")
    w._lock.acquire()
    try:
        os.close(os.open(tmp_path / "trainer.lock", os.O_RDWR))  # drops a POSIX lock; must not drop ours
        with open(tmp_path / "trainer.lock", "rb"):
            pass
        pid = os.fork()
        if pid == 0:
            try:
                fd = os.open(tmp_path / "trainer.lock", os.O_RDWR)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os._exit(1)  # got it: the lock was dropped
            except BlockingIOError:
                os._exit(0)
            except BaseException:
                os._exit(2)
        _, code = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(code) == 0
    finally:
        w._lock.release()


def test_threads_of_one_process_serialize(tmp_path):
    w = StatusWriter(tmp_path, "trainer")
    w.write(make_status(payload={"run_id": "r", "step": 0}))

    def bump():
        for _ in range(50):
            with w._lock:
                cur = StatusReader(tmp_path).read("trainer")
                w._commit(cur.model_copy(update={"payload": cur.payload.model_copy(update={"step": cur.payload.step + 1})}))

    ts = [threading.Thread(target=bump) for _ in range(4)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    got = StatusReader(tmp_path).read("trainer")
    assert got.payload.step == 200 and got.seq == 201


def test_scan_of_unlistable_run_dir_says_why(tmp_path):
    r = StatusReader(tmp_path / "nope")
    assert r.scan() == {} and "nope" in r.scan_error
    (tmp_path / "nope").mkdir()
    assert r.scan() == {} and r.scan_error is None


def test_lock_of_sigkilled_holder_is_free_even_if_its_forked_workers_live_on(tmp_path):
    """A trainer killed mid-write must not leave the lock held by its DataLoader workers."""
    r, w = os.pipe()
    holder = os.fork()
    if holder == 0:
        try:
            os.close(r)
            sw = StatusWriter(tmp_path, "trainer")
            sw._lock.acquire()
            worker = os.fork()
            if worker == 0:
                time.sleep(60)
                os._exit(0)
            os.write(w, f"{worker}\n".encode())
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(w)
    worker = int(os.read(r, 64).decode())
    os.close(r)
    try:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
        assert is_alive(worker)
        StatusWriter(tmp_path, "trainer", lock_timeout=0.1).write(make_status())
    finally:
        os.kill(worker, signal.SIGKILL)
        wait_until(lambda: not is_alive(worker), 10, what="worker gone")
