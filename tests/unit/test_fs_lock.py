"""keel.fs.lock.FileLock: the one flock primitive (status snapshots, GPU allocation)."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from keel.fs.lock import FileLock, LockTimeout


def test_excludes_another_holder_and_times_out_naming_the_path(tmp_path):
    path = tmp_path / "gpus.lock"
    with FileLock(path, timeout=1.0):
        other = FileLock(path, timeout=0)  # its own open file description: flock excludes it
        with pytest.raises(LockTimeout) as e:
            other.acquire()
        assert isinstance(e.value, TimeoutError) and e.value.path == str(path) and str(path) in str(e.value)
    with FileLock(path, timeout=0):  # released: free at once (one non-blocking try)
        pass
    assert path.exists() and stat.S_IMODE(path.stat().st_mode) == 0o640  # never deleted


def test_threads_sharing_one_lock_are_serialised(tmp_path):
    lock = FileLock(tmp_path / "x.lock", timeout=30)
    inside, overlaps = [], []

    def work() -> None:
        for _ in range(200):
            with lock:
                inside.append(1)
                if len(inside) > 1:
                    overlaps.append(1)
                inside.pop()

    ts = [threading.Thread(target=work) for _ in range(4)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert overlaps == []


def test_unopenable_lock_file_raises_oserror_with_the_path(tmp_path):
    path = tmp_path / "missing-dir" / "x.lock"
    lock = FileLock(path, timeout=0)
    with pytest.raises(FileNotFoundError) as e:
        lock.acquire()
    assert e.value.filename == str(path)
    path.parent.mkdir()
    with lock:  # the failure released the thread lock: the same object works once the dir is there
        pass


def test_forked_child_does_not_keep_the_parents_lock(tmp_path):
    path = tmp_path / "x.lock"
    lock = FileLock(path, timeout=0)
    lock.acquire()
    pid = os.fork()
    if pid == 0:  # child: its inherited fd was closed at fork; it can lock only once the parent lets go
        try:
            try:
                FileLock(path, timeout=0).acquire()
                os._exit(1)
            except LockTimeout:
                os._exit(0)
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    lock.release()
    lock.close()
