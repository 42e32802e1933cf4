"""Replace a file atomically: temp file in the same directory, fsync, os.replace, optionally fsync the dir.

A reader sees the old file or the new one, never a mix; a failure leaves the old
file as it was and no temp file behind. Used for rendered configs, the watchdog's
state and trainer checkpoints (status snapshots have their own writer in
keel.status.snapshot, with locking and seq).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (the directory entry itself must reach the disk)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: Path,
    write: Callable[[BinaryIO], None],
    *,
    mode: int = 0o640,
    temp_prefix: str | None = None,
    sync_dir: bool = False,
) -> None:
    """Call `write(file)` on a temp file beside `path`, fsync it, and rename it over `path`.

    `temp_prefix` lets an owner find and remove its own stale temps (a writer killed mid-write).
    """
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix or f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if sync_dir:
        fsync_dir(directory)


def atomic_write_text(path: Path, text: str, mode: int = 0o640) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    data = text.encode("utf-8")
    atomic_write(path, lambda handle: handle.write(data), mode=mode)
