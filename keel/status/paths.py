"""The names of the status files in a run dir: computed here once, imported everywhere else.

    <name>.status.json      snapshot, replaced atomically with os.replace
    <name>.lock             flock'ed by writers of that snapshot; never deleted
    <name>.metrics.jsonl    append-only records (+ .1, .2, ... rotations)
    watchdog.events.jsonl   same mechanism as the metrics log
    .<name>.status.json.tmp.<pid>.<rand>   a write in flight (never matches the globs)
    <name>.exit.json        how the process's last run died (keel.status.exits)
    incidents/              incident bundles (keel.watch.incidents)
    runs/<trainer>/<run>/   the runs archive (keel.status.runs)
    stackdump/<pid>.txt     faulthandler stacks a trainer writes on its dump signal (trainer.stackdump)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from keel.status.models import check_name

STATUS_SUFFIX = ".status.json"
LOCK_SUFFIX = ".lock"
METRICS_SUFFIX = ".metrics.jsonl"
EVENTS_FILE = "watchdog.events.jsonl"
EXIT_SUFFIX = ".exit.json"
INCIDENTS_DIR = "incidents"
RUNS_DIR = "runs"
STACKDUMP_DIR = "stackdump"
# The first line of a stack dump: the trainer writes it, the watchdog reads the signal from it.
STACKDUMP_HEADER = "# keel stackdump pid={pid} signal={signal} registered={registered:.3f}\n"
STACKDUMP_HEADER_RE = re.compile(r"^# keel stackdump pid=(\d+) signal=(\d+) registered=([\d.]+)$")
# Group-readable: the dashboard and the watchdog may run as other users of the group.
FILE_MODE = 0o640


def status_path(run_dir: str | os.PathLike, name: str) -> Path:
    """Path of the snapshot of `name` in `run_dir`."""
    return Path(run_dir) / f"{check_name(name)}{STATUS_SUFFIX}"


def lock_path(run_dir: str | os.PathLike, name: str) -> Path:
    """Path of the writers' lock file of `name`'s snapshot."""
    return Path(run_dir) / f"{check_name(name)}{LOCK_SUFFIX}"


def metrics_path(run_dir: str | os.PathLike, name: str) -> Path:
    """Path of `name`'s metrics log (the live file; rotations add .1, .2, ...)."""
    return Path(run_dir) / f"{check_name(name)}{METRICS_SUFFIX}"


def exit_path(run_dir: str | os.PathLike, name: str) -> Path:
    """Path of `name`'s exit record (how its last run died)."""
    return Path(run_dir) / f"{check_name(name)}{EXIT_SUFFIX}"


def stackdump_path(run_dir: str | os.PathLike, pid: int) -> Path:
    """Where process `pid` writes its stacks when sent its dump signal."""
    return Path(run_dir) / STACKDUMP_DIR / f"{pid}.txt"


def temp_prefix(name: str) -> str:
    """Prefix of `name`'s in-flight snapshot temps: a leading dot and a suffix after
    ".json", so no reader glob (*.status.json) matches one."""
    return f".{name}{STATUS_SUFFIX}.tmp."


def is_status_name(name: str) -> bool:
    """True if `name` is a valid status name."""
    try:
        check_name(name)
        return True
    except ValueError:
        return False
