"""The page's log panel: the last lines of each process's log file, re-read only when the file changed."""

from __future__ import annotations

import json
import os

__all__ = ["LOG_TAIL_BYTES", "LogTail"]

LOG_TAIL_BYTES = 64 << 10  # read at most this much of the file's end: enough for the lines shown, bounded


class LogTail:
    """The last lines of a log file, re-read only when its (inode, size, mtime) changed."""

    def __init__(self, path: str, lines: int) -> None:
        self.path = path
        self.lines = lines
        self._key: tuple[int, int, int] | None = None
        self._cached: list[str] = []

    def read(self) -> list[str]:
        """The last ``lines`` lines (JSON log records shown as time, level, message)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._key, self._cached = None, []
            return [f"(no log file {self.path})"]
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if key == self._key:
            return self._cached
        with open(self.path, "rb") as f:
            f.seek(max(0, st.st_size - LOG_TAIL_BYTES))
            data = f.read(LOG_TAIL_BYTES)
        lines = data.decode("utf-8", "replace").splitlines()
        if st.st_size > LOG_TAIL_BYTES and lines:
            lines = lines[1:]  # the first line is probably cut
        self._cached = [_log_line(x) for x in lines[-self.lines:]] if self.lines else []
        self._key = key
        return self._cached


def _log_line(line: str) -> str:
    """A JSON log record (keel.logs) as time, level, message; any other line as it is; at most 500 chars."""
    if line.startswith("{"):
        try:
            rec = json.loads(line)
            ts = str(rec.get("ts", ""))[11:19]
            return f"{ts} {rec.get('level', '')} {rec.get('message', '')}"[:500]
        except ValueError:
            pass
    return line[:500]
