"""What reading or writing a status file can come to: read results (returned) and write errors (raised).

A reader never raises into a UI loop: StatusReader returns a ProcessStatus or one of
the ReadError kinds below, each falsy, each naming the path and saying why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from keel.fs.lock import LockTimeout
from keel.status.models import ProcessStatus


class StatusLockTimeout(LockTimeout):
    """The writer lock of a status file was not acquired in time. `.path` is the lock file."""


class StatusWriteError(OSError):
    """Writing a snapshot or log record failed; the old file is unchanged. Keeps errno and path.

    `.records_written` is, for a log append, how many of the records passed were
    written whole before the failure (those are on disk; the rest are not).
    """

    def __init__(self, err: OSError, path: str | os.PathLike, what: str = "write status", records_written: int = 0) -> None:
        reason = err.strerror or str(err)
        super().__init__(err.errno, f"cannot {what}: {reason}", str(path))
        self.path = str(path)
        self.records_written = records_written


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


Result = ProcessStatus | ReadError
