"""The one exclusive file lock of keel: flock on a lock file, plus a thread lock.

    with FileLock(run_dir / "trainer.lock", timeout=5.0):
        ...   # no other thread or process holding a FileLock on that path is in here

Used by status snapshot writers (keel.status.snapshot) and GPU allocation (keel.host).
Limits: flock works between processes of one host on a local filesystem; over NFS it
may be emulated with POSIX locks or not work at all (see docs/status-protocol.md).
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
import weakref
from pathlib import Path

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class LockTimeout(TimeoutError):
    """The lock was not acquired within `timeout` seconds. `.path` is the lock file."""

    def __init__(self, path: str | os.PathLike, timeout: float) -> None:
        self.path = str(path)
        self.timeout = timeout
        super().__init__(f"could not lock {self.path} within {timeout:g}s (another holder has it)")


class FileLock:
    """An exclusive lock: a threading.Lock (threads) + flock on `path` (processes).

    flock, not fcntl/lockf: POSIX record locks drop when the process closes *any*
    fd of the file, and flock locks go with the open file description, so a stray
    open/close elsewhere cannot release ours, and the kernel frees it the moment the
    holder dies (https://man7.org/linux/man-pages/man2/flock.2.html). flock does not
    exclude threads sharing one description, hence the threading.Lock.
    The lock file is created on first acquire and never unlinked or truncated: a
    process blocked on the old inode would then lock a file nobody else sees (same
    reason as filelock's _unix.py). A forked child drops the parent's lock fd.

    `acquire` raises LockTimeout after `timeout` seconds, or OSError (with the path)
    if the lock file cannot be opened. Not reentrant.
    """

    def __init__(self, path: str | os.PathLike, *, timeout: float, mode: int = 0o640) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.mode = mode
        self._thread_lock = threading.Lock()
        self._fd: int | None = None
        self._pid = os.getpid()
        _track_for_fork(self)

    def _after_fork_in_child(self) -> None:
        # A forked child (a DataLoader worker, say) must not keep our lock's open file
        # description: if it outlived a SIGKILLed parent that held the lock, the lock
        # would stay taken. Also a thread of the parent may have held the thread lock.
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
        self._fd = None
        self._thread_lock = threading.Lock()

    def _lock_fd(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            # After fork the inherited fd shares the parent's lock; a child gets its own.
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _O_CLOEXEC | _O_NOFOLLOW, self.mode)
            self._pid = os.getpid()
        return self._fd

    def acquire(self) -> None:
        """Take the lock, polling flock with backoff until `timeout`."""
        deadline = time.monotonic() + self.timeout
        if not self._thread_lock.acquire(timeout=max(self.timeout, 0.0)):
            raise LockTimeout(self.path, self.timeout)
        try:
            fd = self._lock_fd()
            delay = 0.0002
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return
                except BlockingIOError:
                    pass
                now = time.monotonic()
                if now >= deadline:
                    raise LockTimeout(self.path, self.timeout)
                time.sleep(min(delay, deadline - now))
                delay = min(delay * 2, 0.005)
        except BaseException:
            self._thread_lock.release()
            raise

    def release(self) -> None:
        """Release the lock (the fd stays open for the next acquire)."""
        try:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def close(self) -> None:
        """Close the lock fd (reopened on the next acquire). The lock file stays."""
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None


_FORK_TRACKED: "weakref.WeakSet[FileLock]" = weakref.WeakSet()
_fork_hook_registered = False


def _track_for_fork(lock: FileLock) -> None:
    global _fork_hook_registered
    _FORK_TRACKED.add(lock)
    if not _fork_hook_registered:  # registered on first use, not at import
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _fork_hook_registered = True


def _after_fork_in_child() -> None:
    for lock in list(_FORK_TRACKED):
        lock._after_fork_in_child()
