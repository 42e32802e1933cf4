"""StatusWriter: the one writer of ``<run_dir>/<name>.status.json`` (atomic replace, locked, seq).

Writers lock, readers do not: os.replace swaps the directory entry in one step, so
a reader opens either the old inode or the new one, both complete (see
keel.status.reader and docs/status-protocol.md).
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal

from keel.fs.lock import FileLock, LockTimeout
from keel.fs.osops import OS, OsOps, write_all
from keel.status.models import ProcessStatus, StatusDecodeError, check_name, decode_status, encode_status, payload_for
from keel.status.paths import FILE_MODE, LOCK_SUFFIX, STATUS_SUFFIX, temp_prefix
from keel.status.results import StatusLockTimeout, StatusWriteError

Durability = Literal["none", "fsync"]

_WRITER_READ_MAX = 64 << 20
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


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
    prefix = temp_prefix(check_name(name))
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
        self._tmp_prefix = temp_prefix(name)
        self.lock_path = self.run_dir / f"{name}{LOCK_SUFFIX}"
        self.durability = durability
        self._ops = ops
        self._lock = FileLock(self.lock_path, timeout=lock_timeout, mode=FILE_MODE)
        self._seq = 0
        self._written: tuple[int, int, int] | None = None  # (ino, size, mtime_ns) of our last write
        self._dir_fd: int | None = None
        self._dir_pid = os.getpid()
        remove_stale_temps(self.run_dir, name)

    # -- internals

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the writer lock; its failures as the status-level errors."""
        try:
            self._lock.acquire()
        except LockTimeout as exc:
            raise StatusLockTimeout(exc.path, exc.timeout) from exc
        except OSError as exc:
            raise StatusWriteError(exc, self.lock_path, "open lock file") from exc
        try:
            yield
        finally:
            self._lock.release()

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
            write_all(ops, fd, data)
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
        with self._locked():
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
        with self._locked():
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

