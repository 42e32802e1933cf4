"""JsonlTail: follows a JSONL log written by JsonlWriter, across rotation and truncation."""

from __future__ import annotations

import json
import os
from pathlib import Path

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


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
