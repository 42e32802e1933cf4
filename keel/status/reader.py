"""StatusReader: reads status snapshots without locking, and never raises.

Each read returns a ProcessStatus or a ReadError (keel.status.results) saying why
not: Missing, Corrupt, TooLarge, UnknownVersion, Unreadable or Stale.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import time
from datetime import datetime
from pathlib import Path
from typing import Callable

from keel.status.models import ProcessStatus, StatusDecodeError, UnknownVersionError, check_name, decode_status, utc_now
from keel.status.paths import STATUS_SUFFIX, is_status_name
from keel.status.results import Corrupt, Missing, Result, Stale, TooLarge, Unreadable, UnknownVersion

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# A filesystem timestamp lags the real clock by up to one tick (jiffy, ~4 ms).
_RACY_NS = 50_000_000


class StatusReader:
    """Reads snapshots without locking; returns a ProcessStatus or a ReadError, never raises.

    `mono` and `wall` are the clocks used for `stale_after`: the monotonic one for
    snapshots written on this host, the wall one (UTC datetimes) for other hosts,
    whose monotonic values mean nothing here.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        max_bytes: int = 1 << 20,
        stale_after: float | None = None,
        mono: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = utc_now,
        host: str | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.max_bytes = max_bytes
        self.stale_after = stale_after
        self.scan_error: str | None = None  # why the last scan() could not list the run dir
        self._mono = mono
        self._wall = wall
        self._host = host if host is not None else socket.gethostname()
        self._run_dir_s = str(self.run_dir)
        # name -> ((ino, size, mtime_ns), result, trusted)
        self._cache: dict[str, tuple[tuple[int, int, int], Result, bool]] = {}

    def _path(self, name: str) -> str:
        return f"{self._run_dir_s}/{name}{STATUS_SUFFIX}"

    def _load(self, name: str) -> tuple[Result, tuple[int, int, int] | None]:
        path = self._path(name)
        try:
            fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return Missing(path, "no such file"), None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return Unreadable(path, "is a symlink; refusing to follow it"), None
            return Unreadable(path, exc.strerror or str(exc)), None
        try:
            st = os.fstat(fd)
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
            if not stat.S_ISREG(st.st_mode):
                return Unreadable(path, "not a regular file"), key
            if st.st_size > self.max_bytes:
                return TooLarge(path, f"{st.st_size} bytes > cap {self.max_bytes}", st.st_size), key
            # Ask for one byte more than fstat said: a snapshot is replaced, never
            # grown in place, but a foreign file might be; then read on up to the cap.
            # (Not max_bytes + 1 at once: a 1 MiB buffer per read costs more than the read.)
            data = os.read(fd, st.st_size + 1)
            if len(data) > st.st_size:
                data += os.read(fd, self.max_bytes + 1 - len(data))
        except OSError as exc:
            return Unreadable(path, exc.strerror or str(exc)), None
        finally:
            os.close(fd)
        if len(data) > self.max_bytes:
            return TooLarge(path, f"more than cap {self.max_bytes} bytes", len(data)), key
        if not data:
            return Corrupt(path, "empty file"), key
        try:
            status = decode_status(data, path)
        except UnknownVersionError as exc:
            return UnknownVersion(path, exc.detail, exc.version), key
        except StatusDecodeError as exc:
            return Corrupt(path, exc.detail), key
        except Exception as exc:  # noqa: BLE001 - a reader must never raise into a UI loop
            return Corrupt(path, f"{type(exc).__name__}: {exc}"), key
        if status.name != name:  # a copied or misplaced file must not speak for another process
            return Corrupt(path, f"snapshot names {status.name!r}, file is for {name!r}"), key
        return status, key

    def _judge(self, result: Result) -> Result:
        if self.stale_after is None or not isinstance(result, ProcessStatus):
            return result
        if result.host == self._host:
            age = result.heartbeat_age(self._mono())
        else:
            age = (self._wall() - result.heartbeat_wall).total_seconds()
        if age > self.stale_after:
            return Stale(self._path(result.name), f"heartbeat {age:.1f}s old > {self.stale_after:g}s", age, result)
        return result

    def read(self, name: str) -> Result:
        """Read the snapshot of `name`: a ProcessStatus, or Missing/Corrupt/TooLarge/UnknownVersion/Unreadable/Stale."""
        try:
            check_name(name)
        except ValueError as exc:
            return Unreadable(self._path(str(name)), str(exc))
        return self._judge(self._load(name)[0])

    def scan(self) -> dict[str, Result]:
        """Read every ``*.status.json`` in the run dir; re-reads only files whose (inode, size, mtime) changed.

        An unchanged file is trusted only once its mtime is safely in the past when we
        read it ("racy git" rule): a rewrite within one filesystem timestamp tick could
        otherwise keep inode (reused), size and mtime.
        """
        out: dict[str, Result] = {}
        seen: dict[str, tuple[tuple[int, int, int], Result, bool]] = {}
        try:
            entries = os.scandir(self.run_dir)
        except OSError as exc:
            self._cache = {}
            self.scan_error = f"cannot list {self._run_dir_s}: {exc.strerror or exc}"
            return {}
        self.scan_error = None
        with entries:
            for entry in entries:
                fname = entry.name
                if not fname.endswith(STATUS_SUFFIX) or fname.startswith("."):
                    continue
                name = fname[: -len(STATUS_SUFFIX)]
                try:
                    st = entry.stat(follow_symlinks=False)
                    key = (st.st_ino, st.st_size, st.st_mtime_ns)
                except OSError:
                    key = None
                cached = self._cache.get(name)
                if cached is not None and cached[2] and cached[0] == key:
                    seen[name] = cached
                    out[name] = self._judge(cached[1])
                    continue
                read_ns = time.time_ns()
                if is_status_name(name):
                    result, rkey = self._load(name)
                else:
                    result, rkey = Unreadable(self._path(name), "invalid status name"), key
                trusted = rkey is not None and rkey[2] < read_ns - _RACY_NS
                if rkey is not None:
                    seen[name] = (rkey, result, trusted)
                out[name] = self._judge(result)
        self._cache = seen
        return out
