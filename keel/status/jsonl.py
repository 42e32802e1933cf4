"""JSON lines: one record per line, appended with one write(), rotated by size.

encode_record turns a dict into its line (NaN/inf as strings, datetimes ISO 8601
UTC); JsonlWriter appends lines to ``<name>.metrics.jsonl`` or
``watchdog.events.jsonl``; keel.status.jsonl_tail follows them.
"""

from __future__ import annotations

import json
import math
import os
import threading
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

from keel.fs.osops import OS, OsOps, write_all
from keel.status.paths import FILE_MODE
from keel.status.results import StatusWriteError

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


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


# Ends a cut line that could not be trimmed away: after a JSON object, or inside one, no line parses
# with it, so a reader counts the line as corrupt rather than taking it for a record.
CUT_LINE_END = b"#\n"


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
            size = self._drop_cut_line(fd, os.fstat(fd).st_size)
        except OSError as exc:
            os.close(fd)
            raise StatusWriteError(exc, self.path, "open log") from exc
        self._fd, self._pid, self._size = fd, os.getpid(), size
        return fd

    def _drop_cut_line(self, fd: int, size: int) -> int:
        """The file's size once a cut last line is gone: a writer killed mid-write (SIGKILL, EFBIG,
        ENOSPC) leaves a line without its newline, and a line is a record only with it. Ending it
        with a newline instead made a line cut just before its newline a whole record, which the
        next writer (resuming from what readers had seen) wrote again: a repeat. No reader is past
        the cut line (JsonlTail holds a line back until its newline), so trimming it moves none.
        A file that cannot be trimmed gets the line ended with ``#``, which no JSON line parses with."""
        if not size:
            return size
        keep, end = size, size
        with open(self.path, "rb") as f:
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return size  # the common case: one byte read, at every open
            while end > 0:
                start = max(0, end - (64 << 10))
                f.seek(start)
                nl = f.read(end - start).rfind(b"\n")
                if nl >= 0:
                    keep = start + nl + 1
                    break
                end, keep = start, 0
        if keep == size:
            return size
        try:
            self._ops.ftruncate(fd, keep)
            return keep
        except OSError:
            return size + write_all(self._ops, fd, CUT_LINE_END)

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
        done = 0  # records of `chunks` whole on disk
        with self._lock:
            try:
                fd = self._open()
                batch: list[bytes] = []
                size = self._size
                for line in chunks:
                    if size and size + len(line) > self.max_bytes:
                        if batch:
                            self._write(fd, batch)
                            done += len(batch)
                            batch = []
                        self._rotate()
                        fd = self._open()
                        size = self._size
                    batch.append(line)
                    size += len(line)
                if batch:
                    self._write(fd, batch)
                    done += len(batch)
            except StatusWriteError as exc:
                exc.records_written += done
                raise

    def _write(self, fd: int, batch: list[bytes]) -> None:
        data = b"".join(batch)
        try:
            self._size += write_all(self._ops, fd, data)
        except OSError as exc:
            written = getattr(exc, "written", 0)
            whole = self._keep_whole_lines(fd, data, written)
            raise StatusWriteError(exc, self.path, "append to log", records_written=whole) from exc

    def _keep_whole_lines(self, fd: int, data: bytes, written: int) -> int:
        """After a write cut at `written` bytes (ENOSPC, EFBIG): keep the whole lines, drop the
        cut one, so the record can be written again whole. Returns the whole lines kept."""
        keep = data.rfind(b"\n", 0, written) + 1
        if written > keep:
            try:
                # A reader never consumes a line without its newline, so no reader is
                # past `keep`: shrinking the file here cannot make one lose its place.
                self._ops.ftruncate(fd, os.fstat(fd).st_size - (written - keep))
                written = keep
            except OSError:
                # The cut line stays; reopening trims it, or ends it unparseable (_drop_cut_line).
                self._close_fd()
        self._size += written
        return data.count(b"\n", 0, keep)

    def append(self, record: dict) -> None:
        """Append one record as one line (one write()). Raises StatusWriteError (errno, path)."""
        self._append_bytes([encode_record(record)])

    def append_many(self, records: list[dict]) -> None:
        """Append records; lines that fit before the next rotation go in one write().

        On failure raises StatusWriteError whose `.records_written` says how many of
        `records` (a prefix) are on disk, whole; no cut line is left behind.
        """
        if records:
            self._append_bytes([encode_record(r) for r in records])

    def append_lines(self, lines: list[bytes]) -> None:
        """append_many for records already encoded with encode_record (same contract)."""
        if lines:
            self._append_bytes(lines)

    def _close_fd(self) -> None:
        # Without the lock: the caller holds it.
        if self._fd is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass
        self._fd = None

    def close(self) -> None:
        """Close the fd (reopened on the next append)."""
        with self._lock:
            self._close_fd()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

