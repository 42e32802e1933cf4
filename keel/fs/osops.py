"""The OS calls a file writer makes, behind one seam so a test can make one chosen call fail.

Production code passes the module-level `OS`; a test passes a subclass whose
`write` raises ENOSPC on the third call, say. Only the calls whose failure a
writer must survive go through the seam (open, write, fsync, replace, rename,
close, unlink, ftruncate); reads and stats do not.
"""

from __future__ import annotations

import errno
import os


class OsOps:
    """os.open/write/fsync/replace/rename/close/unlink/ftruncate, overridable one at a time."""

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

    def ftruncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)


OS = OsOps()


def write_all(ops: OsOps, fd: int, data: bytes | memoryview) -> int:
    """Write all of `data`; returns the bytes written. An OSError keeps `.written` (bytes before it)."""
    # A regular-file write is short only at a limit (EFBIG, ENOSPC); loop so that the
    # limit surfaces as an error from the next call instead of a silently cut file.
    view = memoryview(data)
    done = 0
    while done < len(view):
        try:
            n = ops.write(fd, view[done:])
            if n <= 0:
                raise OSError(errno.EIO, "write returned 0")
        except OSError as exc:
            exc.written = done  # type: ignore[attr-defined]
            raise
        done += n
    return done
