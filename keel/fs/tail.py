"""The last lines of a text file, read from its end in blocks (a 1 GB log costs a few reads)."""

from __future__ import annotations

import os

__all__ = ["last_lines"]


def last_lines(path: str | os.PathLike, count: int, block: int = 65536) -> list[str]:
    """The last ``count`` lines of the file at ``path``. Raises OSError (missing, unreadable)."""
    if count <= 0:
        return []
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        data = b""
        while size > 0 and data.count(b"\n") <= count:
            step = min(block, size)
            size -= step
            handle.seek(size)
            data = handle.read(step) + data
    return data.decode("utf-8", "replace").splitlines()[-count:]
