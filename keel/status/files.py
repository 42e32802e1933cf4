"""The status protocol: atomic snapshots, append-only logs, and their readers.

Files in the run dir (see docs/status-protocol.md):

    <name>.status.json      snapshot, replaced atomically with os.replace
    <name>.lock             flock'ed by writers of that snapshot; never deleted
    <name>.metrics.jsonl    append-only records (+ .1, .2, ... rotations)
    watchdog.events.jsonl   same mechanism as the metrics log
    .<name>.status.json.tmp.<pid>.<rand>   a write in flight (never matches the globs)

Writers lock, readers do not: os.replace swaps the directory entry in one step, so
a reader opens either the old inode or the new one, both complete.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import secrets
import socket
import stat
import threading
import time
import weakref
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, Callable, Literal

from keel.status.models import (
    ProcessStatus,
    StatusDecodeError,
    UnknownVersionError,
    check_name,
    decode_status,
    encode_status,
    payload_for,
    utc_now,
)

Durability = Literal["none", "fsync"]

STATUS_SUFFIX = ".status.json"
LOCK_SUFFIX = ".lock"
METRICS_SUFFIX = ".metrics.jsonl"
EVENTS_FILE = "watchdog.events.jsonl"
FILE_MODE = 0o640
_WRITER_READ_MAX = 64 << 20

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


# --------------------------------------------------------------------------- errors


class StatusLockTimeout(TimeoutError):
    """The writer lock of a status file was not acquired in time. `.path` is the lock file."""

    def __init__(self, path: str | os.PathLike, timeout: float) -> None:
        self.path = str(path)
        self.timeout = timeout
        super().__init__(f"could not lock {self.path} within {timeout:g}s (another writer holds it)")


class StatusWriteError(OSError):
    """Writing a snapshot or log record failed; the old file is unchanged. Keeps errno and path."""

    def __init__(self, err: OSError, path: str | os.PathLike, what: str = "write status") -> None:
        reason = err.strerror or str(err)
        super().__init__(err.errno, f"cannot {what}: {reason}", str(path))
        self.path = str(path)


@dataclass
class ReadError:
    """Why a status could not be read. Returned by StatusReader, never raised."""

    path: str
    detail: str

    def __bool__(self) -> bool:  # `if result:` reads as "got a status"
        return False


@dataclass
class Missing(ReadError):
    """No snapshot file (the process has not started, or never will)."""


@dataclass
class Corrupt(ReadError):
    """The file exists but is not a valid snapshot (bad JSON, wrong types, empty)."""


@dataclass
class TooLarge(ReadError):
    """The file is larger than the reader's size cap; it was not parsed."""

    size: int = 0


@dataclass
class UnknownVersion(ReadError):
    """The snapshot's schema_version is not one this reader knows (a newer writer?)."""

    version: Any = None


@dataclass
class Unreadable(ReadError):
    """The path could not be opened as a regular file: a symlink, a directory, no permission."""


@dataclass
class Stale(ReadError):
    """A valid snapshot whose heartbeat is older than the reader's `stale_after`."""

    age: float = 0.0
    status: ProcessStatus | None = None


# --------------------------------------------------------------------------- OS seam


class OsOps:
    """The OS calls a writer makes, behind one seam so tests can make the k-th one fail.

    Production code uses the module-level `OS`; tests pass a subclass to the writer.
    """

    def open(self, path: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        return os.open(path, flags, mode, dir_fd=dir_fd)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def replace(self, src: str, dst: str, *, src_dir_fd: int | None = None, dst_dir_fd: int | None = None) -> None:
        os.replace(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def close(self, fd: int) -> None:
        os.close(fd)

    def unlink(self, path: str, *, dir_fd: int | None = None) -> None:
        os.unlink(path, dir_fd=dir_fd)


OS = OsOps()


def _write_all(ops: OsOps, fd: int, data: bytes) -> None:
    # A regular-file write is short only at a limit (EFBIG, ENOSPC); loop so that the
    # limit surfaces as an error from the next call instead of a silently cut file.
    view = memoryview(data)
    while view:
        n = ops.write(fd, view)
        if n <= 0:
            raise OSError(errno.EIO, "write returned 0")
        view = view[n:]


# --------------------------------------------------------------------------- locking


class _FileLock:
    """An exclusive lock: a threading.Lock (threads) + flock on `path` (processes).

    flock, not fcntl/lockf: POSIX record locks drop when the process closes *any*
    fd of the file, and flock locks go with the open file description, so a stray
    open/close elsewhere cannot release ours, and the kernel frees it the moment the
    holder dies (https://man7.org/linux/man-pages/man2/flock.2.html). flock does not
    exclude threads sharing one description, hence the threading.Lock.
    The lock file is never unlinked or truncated: a process blocked on the old
    inode would then lock a file nobody else sees (same reason as filelock's _unix.py).
    """

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
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
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _O_CLOEXEC | _O_NOFOLLOW, FILE_MODE)
            self._pid = os.getpid()
        return self._fd

    def acquire(self) -> None:
        deadline = time.monotonic() + self.timeout
        if not self._thread_lock.acquire(timeout=max(self.timeout, 0.0)):
            raise StatusLockTimeout(self.path, self.timeout)
        try:
            try:
                fd = self._lock_fd()
            except OSError as exc:
                raise StatusWriteError(exc, self.path, "open lock file") from exc
            delay = 0.0002
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return
                except BlockingIOError:
                    pass
                now = time.monotonic()
                if now >= deadline:
                    raise StatusLockTimeout(self.path, self.timeout)
                time.sleep(min(delay, deadline - now))
                delay = min(delay * 2, 0.005)
        except BaseException:
            self._thread_lock.release()
            raise

    def release(self) -> None:
        try:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    def __enter__(self) -> "_FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None


_FORK_TRACKED: "weakref.WeakSet[_FileLock]" = weakref.WeakSet()
_fork_hook_registered = False


def _track_for_fork(lock: _FileLock) -> None:
    global _fork_hook_registered
    _FORK_TRACKED.add(lock)
    if not _fork_hook_registered:  # registered on first use, not at import
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _fork_hook_registered = True


def _after_fork_in_child() -> None:
    for lock in list(_FORK_TRACKED):
        lock._after_fork_in_child()


# --------------------------------------------------------------------------- snapshots


def status_path(run_dir: str | os.PathLike, name: str) -> Path:
    """Path of the snapshot of `name` in `run_dir`."""
    return Path(run_dir) / f"{check_name(name)}{STATUS_SUFFIX}"


def _temp_prefix(name: str) -> str:
    # Leading dot and a suffix after ".json": no reader glob (*.status.json) matches.
    return f".{name}{STATUS_SUFFIX}.tmp."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(run_dir: str | os.PathLike, name: str) -> list[str]:
    """Remove temp files of `name` left by writers that died mid-write; returns what was removed.

    Only temps whose pid is dead are touched: a live process may be writing one now.
    """
    prefix = _temp_prefix(check_name(name))
    removed = []
    try:
        entries = list(os.scandir(run_dir))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        pid_part = entry.name[len(prefix) :].split(".", 1)[0]
        if not pid_part.isdigit() or _pid_alive(int(pid_part)):
            continue
        try:
            os.unlink(entry.path)
            removed.append(entry.path)
        except OSError:  # best effort: gone already, or a read-only dir the write will report
            pass
    return removed


class StatusWriter:
    """The one writer of ``<run_dir>/<name>.status.json``; thread-safe, fork-aware.

    `write` and `update` hold the lock on ``<name>.lock`` while they assign the next
    seq and replace the file, so several threads or processes may write the same
    status without losing updates. seq only grows: the last one on disk is the
    floor, also after a restart.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        name: str,
        *,
        durability: Durability = "none",
        lock_timeout: float = 5.0,
        ops: OsOps = OS,
    ) -> None:
        if durability not in ("none", "fsync"):
            raise ValueError(f"durability must be 'none' or 'fsync', not {durability!r}")
        self.run_dir = Path(run_dir)
        self.name = check_name(name)
        self.path = self.run_dir / f"{name}{STATUS_SUFFIX}"
        self._fname = f"{name}{STATUS_SUFFIX}"
        self._tmp_prefix = _temp_prefix(name)
        self.lock_path = self.run_dir / f"{name}{LOCK_SUFFIX}"
        self.durability = durability
        self._ops = ops
        self._lock = _FileLock(self.lock_path, lock_timeout)
        self._seq = 0
        self._written: tuple[int, int, int] | None = None  # (ino, size, mtime_ns) of our last write
        self._dir_fd: int | None = None
        self._dir_pid = os.getpid()
        remove_stale_temps(self.run_dir, name)

    # -- internals

    def _dirfd(self) -> int:
        if self._dir_fd is None or self._dir_pid != os.getpid():
            try:
                self._dir_fd = os.open(self.run_dir, os.O_RDONLY | os.O_DIRECTORY | _O_CLOEXEC)
            except OSError as exc:
                raise StatusWriteError(exc, self.run_dir, "open run dir") from exc
            self._dir_pid = os.getpid()
        return self._dir_fd

    def _read_current(self) -> ProcessStatus | None:
        """The snapshot on disk (under our lock), or None if missing or unreadable."""
        try:
            fd = os.open(self._fname, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | os.O_NONBLOCK, dir_fd=self._dirfd())
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            # No reader cap here: the seq floor must come from any snapshot we can parse.
            if not stat.S_ISREG(st.st_mode) or st.st_size > _WRITER_READ_MAX:
                return None
            data = b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
        finally:
            os.close(fd)
        try:
            return decode_status(data, str(self.path))
        except StatusDecodeError:
            return None

    def _disk_seq(self) -> int:
        """seq floor from disk, re-read only when someone else replaced the file."""
        try:
            st = os.stat(self._fname, dir_fd=self._dirfd(), follow_symlinks=False)
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            return self._seq
        if key == self._written:
            return self._seq
        current = self._read_current()
        return max(self._seq, current.seq if current is not None else 0)

    def _replace(self, data: bytes) -> tuple[int, int, int]:
        """temp (O_EXCL|O_NOFOLLOW, 0640) -> write -> [fsync] -> os.replace -> [fsync dir]."""
        ops = self._ops
        dir_fd = self._dirfd()
        tmp = f"{self._tmp_prefix}{os.getpid()}.{secrets.token_hex(4)}"
        fd = -1
        created = False
        try:
            # O_EXCL: never reuse an existing name (a planted file or symlink makes this
            # fail instead of writing through it); O_NOFOLLOW for good measure.
            fd = ops.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, FILE_MODE, dir_fd=dir_fd)
            created = True
            _write_all(ops, fd, data)
            if self.durability == "fsync":
                ops.fsync(fd)
            # rename keeps inode, size and mtime: this is the key of the file we publish.
            st = os.fstat(fd)
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
            fd, _fd = -1, fd
            ops.close(_fd)
            ops.replace(tmp, self._fname, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError as exc:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
            if created:  # only our own temp: a name we did not create is not ours to remove
                try:
                    os.unlink(tmp, dir_fd=dir_fd)
                except OSError:
                    pass
            raise StatusWriteError(exc, self.path) from exc
        if self.durability == "fsync":
            # The rename is durable only once the directory is synced. The new
            # snapshot is already visible, so a failure here is reported but the
            # file is not rolled back.
            try:
                ops.fsync(dir_fd)
            except OSError as exc:
                raise StatusWriteError(exc, self.run_dir, "fsync run dir") from exc
        return key

    def _commit(self, status: ProcessStatus) -> ProcessStatus:
        seq = self._disk_seq() + 1
        status = status.model_copy(update={"seq": seq})
        self._written = self._replace(encode_status(status))
        self._seq = seq
        return status

    # -- public API

    def write(self, status: ProcessStatus) -> ProcessStatus:
        """Publish `status` atomically with the next seq; returns what was written.

        Raises StatusLockTimeout, StatusWriteError (an OSError naming the path) or
        ValueError if `status.name` is not this writer's name.
        """
        if status.name != self.name:
            raise ValueError(f"status name {status.name!r} does not match writer {self.name!r}")
        with self._lock:
            return self._commit(status)

    def update(self, **fields: Any) -> ProcessStatus:
        """Read-modify-write under the lock; `payload=dict` merges into the current payload.

        A callable value is applied to the current value of that field, under the lock
        (``update(payload=lambda p: {"count": p["count"] + 1})`` loses no increment).
        Raises FileNotFoundError (naming the path) if there is no valid snapshot to update.
        """
        unknown = set(fields) - set(ProcessStatus.model_fields) | ({"seq", "name"} & set(fields))
        if unknown:
            raise TypeError(f"update() cannot set {sorted(unknown)} of {self.path}")
        with self._lock:
            current = self._read_current()
            if current is None:
                raise FileNotFoundError(errno.ENOENT, "no valid status snapshot to update", str(self.path))
            for key, value in fields.items():
                if callable(value):
                    fields[key] = value(getattr(current, key))
            if "payload" in fields and isinstance(fields["payload"], dict) and current.payload is not None:
                base = current.payload if isinstance(current.payload, dict) else current.payload.model_dump()
                fields["payload"] = {**base, **fields["payload"]}
            kind = fields.get("kind", current.kind)
            if "payload" in fields:
                fields["payload"] = payload_for(kind, fields["payload"])
            merged = ProcessStatus.model_validate({**current.__dict__, **fields})
            self._seq = max(self._seq, current.seq)
            return self._commit(merged)

    @property
    def seq(self) -> int:
        """The seq of this writer's last write (0 before the first)."""
        return self._seq

    def close(self) -> None:
        """Release the lock fd and dir fd. The lock file stays (it is never deleted)."""
        self._lock.close()
        if self._dir_fd is not None and self._dir_pid == os.getpid():
            os.close(self._dir_fd)
        self._dir_fd = None

    def __enter__(self) -> "StatusWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Result = ProcessStatus | ReadError


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
                if check_name_ok(name):
                    result, rkey = self._load(name)
                else:
                    result, rkey = Unreadable(self._path(name), "invalid status name"), key
                trusted = rkey is not None and rkey[2] < read_ns - _RACY_NS
                if rkey is not None:
                    seen[name] = (rkey, result, trusted)
                out[name] = self._judge(result)
        self._cache = seen
        return out


# A filesystem timestamp lags the real clock by up to one tick (jiffy, ~4 ms).
_RACY_NS = 50_000_000


def check_name_ok(name: str) -> bool:
    """True if `name` is a valid status name."""
    try:
        check_name(name)
        return True
    except ValueError:
        return False


# --------------------------------------------------------------------------- JSONL logs


def _jsonable(value: Any) -> Any:
    """NaN/inf -> "NaN"/"Infinity"/"-Infinity", datetimes -> ISO 8601 UTC, recursively."""
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    if hasattr(value, "model_dump"):
        return _jsonable(value.model_dump(mode="json"))
    return value


def encode_record(record: dict) -> bytes:
    """One JSONL line (with the newline) for `record`; raises TypeError for unencodable values."""
    try:
        # Fast path: plain finite data needs no walk.
        line = json.dumps(record, allow_nan=False, separators=(",", ":"), ensure_ascii=False)
    except (ValueError, TypeError):
        line = json.dumps(_jsonable(record), allow_nan=False, separators=(",", ":"), ensure_ascii=False)
    return line.encode() + b"\n"


class JsonlWriter:
    """Append-only JSON lines with size rotation (path -> path.1 -> ... -> path.<backups>).

    Each record is one write() on an O_APPEND fd, so a reader sees whole lines or a
    partial last line (which JsonlTail holds back), never interleaved records.
    One writer process per file (the owner of <name>); threads may share it.
    """

    def __init__(self, path: str | os.PathLike, *, max_bytes: int = 16 << 20, backups: int = 3, ops: OsOps = OS) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self._ops = ops
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._pid = 0
        self._size = 0

    def _open(self) -> int:
        if self._fd is not None and self._pid == os.getpid():
            return self._fd
        try:
            fd = self._ops.open(str(self.path), os.O_WRONLY | os.O_APPEND | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC, FILE_MODE)
        except OSError as exc:
            raise StatusWriteError(exc, self.path, "open log") from exc
        try:
            size = os.fstat(fd).st_size
            if size:
                # A writer killed mid-write (EFBIG, ENOSPC) may have left a cut line:
                # end it, so the next record starts on its own line.
                with open(self.path, "rb") as f:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        _write_all(self._ops, fd, b"\n")
                        size += 1
        except OSError as exc:
            os.close(fd)
            raise StatusWriteError(exc, self.path, "open log") from exc
        self._fd, self._pid, self._size = fd, os.getpid(), size
        return fd

    def _rotate(self) -> None:
        ops = self._ops
        p = str(self.path)
        try:
            if self._fd is not None and self._pid == os.getpid():
                os.close(self._fd)
            self._fd = None
            if self.backups <= 0:
                ops.unlink(p)
            else:
                for i in range(self.backups - 1, 0, -1):
                    if os.path.lexists(f"{p}.{i}"):
                        ops.rename(f"{p}.{i}", f"{p}.{i + 1}")
                ops.rename(p, f"{p}.1")
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StatusWriteError(exc, self.path, "rotate log") from exc

    def _append_bytes(self, chunks: list[bytes]) -> None:
        with self._lock:
            fd = self._open()
            batch: list[bytes] = []
            size = self._size
            for line in chunks:
                if size and size + len(line) > self.max_bytes:
                    if batch:
                        self._write(fd, b"".join(batch))
                        batch = []
                    self._rotate()
                    fd = self._open()
                    size = self._size
                batch.append(line)
                size += len(line)
            if batch:
                self._write(fd, b"".join(batch))

    def _write(self, fd: int, data: bytes) -> None:
        try:
            n = self._ops.write(fd, data)
        except OSError as exc:
            raise StatusWriteError(exc, self.path, "append to log") from exc
        self._size += n
        if n != len(data):
            # Short append (a size limit): terminate the cut line so readers resync.
            raise StatusWriteError(OSError(errno.EFBIG, "short write"), self.path, "append to log")

    def append(self, record: dict) -> None:
        """Append one record as one line (one write())."""
        self._append_bytes([encode_record(record)])

    def append_many(self, records: list[dict]) -> None:
        """Append records; lines that fit before the next rotation go in one write()."""
        if records:
            self._append_bytes([encode_record(r) for r in records])

    def close(self) -> None:
        """Close the fd (reopened on the next append)."""
        with self._lock:
            if self._fd is not None and self._pid == os.getpid():
                os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class JsonlTail:
    """Follows a JsonlWriter's file from a byte offset, across rotation and truncation.

    Keeps the current file open, so after a rotation it drains the old inode (now
    path.1) to its end, then follows the chain of rotated files by inode to the live
    one: no record is lost or repeated as long as the file after ours has not been
    rotated away before we look (else `.gaps` counts it). A partial
    last line is held back until its newline arrives. Lines that are not JSON
    objects are skipped and counted in `.corrupt_lines`.
    """

    def __init__(self, path: str | os.PathLike, *, offset: int = 0, backups_max: int = 16) -> None:
        self.path = Path(path)
        self.offset = offset
        self.corrupt_lines = 0
        self.rotations = 0
        self.gaps = 0  # rotations where records may have been dropped before we read them
        self._backups_max = backups_max
        self._fd: int | None = None
        self._ino: int | None = None

    def _open_current(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return False
        self._fd, self._ino = fd, os.fstat(fd).st_ino
        return True

    def _drain(self, fd: int, offset: int, out: list[dict], limit: int | None) -> int:
        """Parse complete lines of `fd` from `offset`; returns the offset after the last one used."""
        while limit is None or len(out) < limit:
            chunk = os.pread(fd, 1 << 20, offset)
            if not chunk:
                return offset
            end = chunk.rfind(b"\n")
            if end < 0:
                if len(chunk) < (1 << 20):
                    return offset  # partial last line: hold back
                # A line longer than the chunk: read it whole.
                chunk = self._long_line(fd, offset)
                if chunk is None:
                    return offset
                end = len(chunk) - 1
            pos = 0
            for line in chunk[: end + 1].split(b"\n")[:-1]:
                pos += len(line) + 1
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        rec = None
                    if isinstance(rec, dict):
                        out.append(rec)
                    else:
                        self.corrupt_lines += 1
                if limit is not None and len(out) >= limit:
                    return offset + pos
            offset += pos
        return offset

    @staticmethod
    def _long_line(fd: int, offset: int) -> bytes | None:
        buf = bytearray()
        while True:
            chunk = os.pread(fd, 1 << 20, offset + len(buf))
            if not chunk:
                return None
            i = chunk.find(b"\n")
            if i >= 0:
                buf += chunk[: i + 1]
                return bytes(buf)
            buf += chunk

    def _chain(self) -> list[tuple[str, int]]:
        """(path, inode) of the log and its rotations, newest first: path, path.1, path.2, ..."""
        chain = []
        for i in range(self._backups_max + 1):
            p = str(self.path) if i == 0 else f"{self.path}.{i}"
            try:
                chain.append((p, os.stat(p, follow_symlinks=False).st_ino))
            except FileNotFoundError:
                if i > 0:
                    break
            except OSError:
                break
        return chain

    def _successor(self, ino: int) -> tuple[str, int] | None:
        """The file written after the one with inode `ino`, or None if there is none yet.

        The writer may rotate while we look, so the chain is listed until two listings agree.
        """
        for _ in range(100):
            chain = self._chain()
            if chain == self._chain():
                break
        inodes = [i for _, i in chain]
        if ino in inodes:
            j = inodes.index(ino)
            return chain[j - 1] if j > 0 else None
        # Our file fell off the end of the rotation: the oldest one left follows it, and
        # whatever was rotated away in between is lost (counted in .gaps).
        if len(chain) > 1 or (chain and chain[0][0] != str(self.path)):
            self.gaps += 1
        return chain[-1] if chain else None

    def read_new(self, max_records: int | None = None) -> list[dict]:
        """Records appended since the last call (at most `max_records`); never raises for a missing file."""
        out: list[dict] = []
        if self._fd is None and not self._open_current():
            return out
        assert self._fd is not None and self._ino is not None
        if os.fstat(self._fd).st_size < self.offset:  # truncated in place: start over
            self.offset = 0
        while True:
            self.offset = self._drain(self._fd, self.offset, out, max_records)
            if max_records is not None and len(out) >= max_records:
                return out
            try:
                if os.stat(self.path, follow_symlinks=False).st_ino == self._ino:
                    return out  # still the live file
            except FileNotFoundError:
                return out  # mid-rotation: the new file is not there yet
            # Rotated away. The writer closed it before renaming, so it is final: drain
            # it to the end, then move to the file written after it.
            self.offset = self._drain(self._fd, self.offset, out, max_records)
            if max_records is not None and len(out) >= max_records:
                return out
            nxt = self._successor(self._ino)
            if nxt is None:
                return out
            if os.fstat(self._fd).st_size > self.offset:
                self.corrupt_lines += 1  # a cut last line that will never be finished
            try:
                fd = os.open(nxt[0], os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | os.O_NONBLOCK)
            except OSError:
                return out  # moved while we looked: next call retries
            if os.fstat(fd).st_ino != nxt[1]:
                os.close(fd)
                return out
            os.close(self._fd)
            self._fd, self._ino, self.offset = fd, nxt[1], 0
            self.rotations += 1

    def close(self) -> None:
        """Close the followed file."""
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None


# --------------------------------------------------------------------------- heartbeat


class Heartbeat:
    """Calls `beat()` every `interval` seconds from a daemon thread until stop().

    Only proves the process is scheduled; it must not move the progress clock, so
    it gets a function that touches heartbeat fields only. An exception in `beat`
    is kept in `.last_error` and the thread keeps beating.
    """

    def __init__(self, interval: float, beat: Callable[[], object], *, name: str = "keel-heartbeat") -> None:
        if interval <= 0:
            raise ValueError(f"heartbeat interval must be > 0, not {interval}")
        self.interval = interval
        self._beat = beat
        self._name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.beats = 0
        self.last_error: BaseException | None = None

    def start(self) -> None:
        """Start the thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
                self.beats += 1
            except Exception as exc:  # noqa: BLE001 - keep beating; the caller sees .last_error
                self.last_error = exc

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop and join the thread; a beat in progress finishes first."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._thread = None

    @property
    def running(self) -> bool:
        """True while the thread is alive."""
        return self._thread is not None and self._thread.is_alive()
