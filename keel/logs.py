"""One logging set-up for every keel process and tool.

JSON lines (one object per record: ts, level, process, pid, host, event, message
and any extras) when the output is a file or pipe, which is what supervisord and
journald capture; readable text on a TTY or with ``fmt="text"``.

Usage::

    log = setup_logging("trainer", fmt=args.log_format)
    log.info("checkpoint saved", extra={"event": "checkpoint", "step": 120})
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import socket
import sys
from typing import IO, Literal

from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["json", "text", "auto"]

# Attributes every LogRecord has; anything else on a record is a caller's extra.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class KeelJsonFormatter(JsonFormatter):
    """JSON formatter with keel's fixed field names; extras pass through."""

    def __init__(self, process_name: str) -> None:
        super().__init__(json_ensure_ascii=False)
        self._process_name = process_name
        self._host = socket.gethostname()

    def add_fields(self, log_data: dict, record: logging.LogRecord, message_dict: dict) -> None:
        log_data["ts"] = _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).isoformat(
            timespec="milliseconds"
        )
        log_data["level"] = record.levelname.lower()
        log_data["process"] = self._process_name
        log_data["pid"] = record.process
        log_data["host"] = self._host
        log_data["event"] = getattr(record, "event", None) or record.name
        log_data["message"] = record.getMessage()
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and key != "event" and not key.startswith("_"):
                log_data[key] = value
        if record.exc_info:
            log_data["exc_info"] = self.formatException(record.exc_info)


class KeelTextFormatter(logging.Formatter):
    """`12:00:01 INFO  trainer  message  key=value ...` for people at a terminal."""

    def __init__(self, process_name: str) -> None:
        super().__init__()
        self._process_name = process_name

    def format(self, record: logging.LogRecord) -> str:
        ts = _dt.datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        extras = " ".join(
            f"{k}={v}"
            for k, v in record.__dict__.items()
            if k not in _RECORD_ATTRS and k != "event" and not k.startswith("_")
        )
        line = f"{ts} {record.levelname:<7} {self._process_name}  {record.getMessage()}"
        if extras:
            line += f"  {extras}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def resolve_format(fmt: LogFormat, stream: IO[str]) -> Literal["json", "text"]:
    """`auto` means text on a TTY, JSON otherwise."""
    if fmt != "auto":
        return fmt
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


def setup_logging(
    process_name: str,
    fmt: LogFormat = "auto",
    level: str | int = "INFO",
    stream: IO[str] | None = None,
) -> logging.Logger:
    """Configure the root logger once for this process and return the `keel` logger.

    Replaces any handlers already on the root logger, so calling it twice is
    harmless. Level may come from ``KEEL_LOG_LEVEL``.
    """
    stream = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(stream)
    if resolve_format(fmt, stream) == "json":
        handler.setFormatter(KeelJsonFormatter(process_name))
    else:
        handler.setFormatter(KeelTextFormatter(process_name))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(os.environ.get("KEEL_LOG_LEVEL", level))
    logging.captureWarnings(True)
    return logging.getLogger("keel")
