"""Replace a small file atomically: temp file in the same directory, fsync, os.replace.

A reader sees the old file or the new one, never a mix; a failure leaves the old
file as it was and no temp file behind. Used for rendered configs and the
watchdog's state (status snapshots have their own writer in keel.statusfile,
with locking and seq).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_text(path: Path, text: str, mode: int = 0o640) -> None:
    """Write `text` to `path` through a temp file in the same directory and os.replace."""
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
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
