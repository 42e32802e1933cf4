"""Show a process log: JSON lines from keel.logs pretty-printed, other lines as they are."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import IO

from keel.fs.tail import last_lines

_LEVEL_COLOURS = {"error": "\033[31m", "critical": "\033[31m", "warning": "\033[33m", "debug": "\033[2m"}
_FIXED = ("ts", "level", "process", "pid", "host", "event", "message")


def pretty(line: str, colour: bool = False) -> str:
    """`{"ts": ..., "level": "info", "message": "x", "step": 3}` -> `12:00:01 info  trainer  x  step=3`."""
    try:
        record = json.loads(line)
    except ValueError:
        return line.rstrip("\n")
    if not isinstance(record, dict) or "message" not in record:
        return line.rstrip("\n")
    ts = str(record.get("ts", ""))[11:19]
    level = str(record.get("level", ""))
    extras = " ".join(f"{k}={v}" for k, v in record.items() if k not in _FIXED and k != "exc_info")
    text = f"{ts} {level:<7} {record.get('process', '')}  {record.get('message', '')}" + (f"  {extras}" if extras else "")
    if record.get("exc_info"):
        text += "\n" + str(record["exc_info"])
    if colour and level in _LEVEL_COLOURS:
        text = f"{_LEVEL_COLOURS[level]}{text}\033[0m"
    return text


def follow_log(path: Path, *, lines: int = 40, follow: bool = False, raw: bool = False, out: IO[str] = sys.stdout) -> int:
    """Print the last lines, then (with follow) new ones as they come, across rotation. Ctrl-C ends it."""
    colour = out.isatty() and not raw
    show = (lambda text: text.rstrip("\n")) if raw else (lambda text: pretty(text, colour))
    if not path.exists() and not follow:
        print(f"{path}: no log yet", file=sys.stderr)
        return 1
    if path.exists():
        for line in last_lines(path, lines):
            print(show(line), file=out, flush=True)
    if not follow:
        return 0
    handle = open(path, "r", encoding="utf-8", errors="replace") if path.exists() else None
    if handle:
        handle.seek(0, os.SEEK_END)
    try:
        while True:
            line = handle.readline() if handle else ""
            if line:
                print(show(line), file=out, flush=True)
                continue
            time.sleep(0.25)
            try:  # rotated or truncated: reopen from the start of the new file
                st = path.stat()
                if handle is None or st.st_ino != os.fstat(handle.fileno()).st_ino or st.st_size < handle.tell():
                    if handle:
                        handle.close()
                    handle = open(path, "r", encoding="utf-8", errors="replace")
            except FileNotFoundError:
                pass
    except KeyboardInterrupt:
        return 0
    finally:
        if handle:
            handle.close()
