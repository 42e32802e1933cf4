"""``<name>.exit.json``: a process's own account of how its run ended, written as it dies.

The status snapshot cannot carry it: the backend's autorestart starts the next run
at once, and the new run's first snapshot replaces the old one before a watchdog
polling every few seconds has read it. This file is replaced only by the next run's
own end, and names the pid it is about, so the watchdog reads the end of the run it
saw (``keel.watch.end_evidence``) and never a later one.

The trainer writes it (``trainer.__main__``): the exception (type, message, the
last lines of its traceback) and the step it died at, or the stop signal it obeyed
(SIGTERM from outside the stack is a preemption), or neither (it finished).
"""

from __future__ import annotations

import os
import traceback

from pydantic import BaseModel, ConfigDict, ValidationError

from keel.fs.atomic import atomic_write_text
from keel.status.paths import FILE_MODE, exit_path

__all__ = ["ExitRecord", "exit_record_for", "read_exit_record", "write_exit_record"]

TRACEBACK_LINES = 12  # enough to name the failing line, small enough for an event


class ExitRecord(BaseModel):
    """How one run (``pid``) ended, in its own words."""

    model_config = ConfigDict(extra="ignore")

    pid: int
    exit_code: int
    step: int | None = None
    exception_type: str | None = None
    exception_message: str | None = None
    traceback: str | None = None  # the last TRACEBACK_LINES lines
    stop_signal: str | None = None  # "SIGTERM" when a stop signal ended it

    @property
    def exception(self) -> str | None:
        """``Type: message`` (the same words as the status's last_error)."""
        if self.exception_type is None:
            return None
        return f"{self.exception_type}: {self.exception_message}" if self.exception_message else self.exception_type


def exit_record_for(exit_code: int, step: int | None, error: BaseException | None,
                    stop_signal: str | None) -> ExitRecord:
    """The record for this process (its pid) ending now."""
    tb = None
    if error is not None:
        lines = "".join(traceback.format_exception(type(error), error, error.__traceback__)).splitlines()
        tb = "\n".join(lines[-TRACEBACK_LINES:])
    return ExitRecord(pid=os.getpid(), exit_code=exit_code, step=step,
                      exception_type=type(error).__name__ if error is not None else None,
                      exception_message=str(error) if error is not None else None, traceback=tb,
                      stop_signal=stop_signal)


def write_exit_record(run_dir: str | os.PathLike, name: str, record: ExitRecord) -> None:
    """Replace the record atomically. Raises OSError (the caller, dying, ignores it)."""
    atomic_write_text(exit_path(run_dir, name), record.model_dump_json(), FILE_MODE)


def read_exit_record(run_dir: str | os.PathLike, name: str, pid: int | None) -> ExitRecord | None:
    """The record of run ``pid``, if there is a readable one; None otherwise (and for an unknown pid:
    a record always names its run, so one without a pid to match is nobody's)."""
    if pid is None:
        return None
    try:
        record = ExitRecord.model_validate_json(exit_path(run_dir, name).read_bytes())
    except (OSError, ValidationError, ValueError):
        return None
    if record.pid != pid:
        return None  # another run's end
    return record
