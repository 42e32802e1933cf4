"""The run archive: one directory per training run, kept after the run ends, pruned by count and bytes.

    <run_dir>/runs/<trainer>/<run_id>/run.json       RunSummary, replaced atomically (keel.fs.atomic)
    <run_dir>/runs/<trainer>/<run_id>/metrics.jsonl  the run's metrics records, appended one write() at a time

The trainer writes it (trainer/runs.py); the page and `bin/status --runs` read it.
Pure I/O: no torch, no bokeh. A reader never trusts a file to be whole: an
unreadable run.json is skipped, a torn last metrics line is ignored.

`{"event": "resume", "step": S}` in metrics.jsonl marks a resume from the checkpoint at
step S: records after S written before it are the dead incarnation's lost work, and
`read_metrics` leaves them out, so a run's curve never folds back in x.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from keel.fs.atomic import atomic_write_text
from keel.fs.osops import OS, write_all
from keel.status.jsonl import encode_record
from keel.status.paths import FILE_MODE, RUNS_DIR

# The trainer's records of where a run began, in its metrics stream and so its archive (trainer/runs.py
# writes them; read_metrics here and dashboard.curves read them).
RESUME_EVENT = "resume"  # {"event": "resume", "run_id", "step": S}: the checkpoint of step S was loaded
NEW_RUN_EVENT = "new_run"  # {"event": "new_run", "run_id", "step": 0, "reason", ...}: a run began afresh

SUMMARY_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FORMAT = 1
# run ids become directory names: nothing that could climb out of the archive or hide as a dotfile
_RUN_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")

# How a run ended: running; completed (the entry returned, max_steps reached); stopped (a stop signal:
# a later start resumes it); failed; interrupted (killed without a word: a later new run closed it).
End = Literal["running", "completed", "stopped", "failed", "interrupted"]


def safe_run_id(text: str | None) -> str:
    """``text`` made safe as a run's directory name (another keel's or a missing id: "unknown")."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", text or "unknown").lstrip(".")[:64] or "unknown"
    return check_run_id(safe if _RUN_ID.match(safe) else "unknown")


def check_run_id(run_id: str) -> str:
    """`run_id` if it is safe as a directory name, else ValueError."""
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise ValueError(f"invalid run id {run_id!r}")
    return run_id


def runs_root(run_dir: str | os.PathLike, trainer: str) -> Path:
    """The archive of trainer `trainer`: `<run_dir>/runs/<trainer>`."""
    return Path(run_dir) / RUNS_DIR / trainer


class RunSummary(BaseModel):
    """One run's `run.json`. Unknown keys are ignored so an older reader reads a newer writer's file."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    format: int = SUMMARY_FORMAT
    id: str
    trainer: str
    started: float  # unix seconds
    updated: float
    ended: float | None = None
    end: End = "running"
    error: str | None = None
    steps: int = 0
    resumes: int = 0
    last_loss: float | None = None
    best_loss: float | None = None
    last_val_loss: float | None = None
    best_val_loss: float | None = None
    config_digest: str
    config: dict[str, Any] = {}
    metrics_bytes: int = 0
    metrics_truncated: bool = False  # the run outgrew the byte budget; later records were not kept


@dataclass
class Tally:
    """last/best loss and val loss and the last step over a run's records (the one place they are computed)."""

    steps: int = 0
    last_loss: float | None = None
    best_loss: float | None = None
    last_val_loss: float | None = None
    best_val_loss: float | None = None

    def add(self, records: Iterable[dict]) -> "Tally":
        for r in records:
            if "event" in r:
                continue
            step = r.get("step")
            if isinstance(step, int) and not isinstance(step, bool):
                self.steps = step
            loss, val = _finite(r.get("loss")), _finite(r.get("val_loss"))
            if loss is not None:
                self.last_loss = loss
                self.best_loss = loss if self.best_loss is None else min(self.best_loss, loss)
            if val is not None:
                self.last_val_loss = val
                self.best_val_loss = val if self.best_val_loss is None else min(self.best_val_loss, val)
        return self

    def fields(self) -> dict[str, Any]:
        return {
            "steps": self.steps, "last_loss": self.last_loss, "best_loss": self.best_loss,
            "last_val_loss": self.last_val_loss, "best_val_loss": self.best_val_loss,
        }


def _finite(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def write_summary(root: Path, summary: RunSummary) -> Path:
    """Replace `<root>/<id>/run.json` atomically (a reader sees the old summary or the new one)."""
    directory = root / check_run_id(summary.id)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / SUMMARY_FILE
    atomic_write_text(path, summary.model_dump_json() + "\n", mode=FILE_MODE)
    return path


def read_summary(path: Path) -> RunSummary | None:
    """The summary at `path`, or None when it is missing or unreadable."""
    try:
        return RunSummary.model_validate_json(path.read_bytes())
    except (OSError, ValidationError, ValueError):
        return None


def list_runs(root: Path) -> list[RunSummary]:
    """Every readable run under `root`, newest first (by start time)."""
    try:
        names = os.listdir(root)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for name in names:
        if _RUN_ID.match(name) and (s := read_summary(root / name / SUMMARY_FILE)) is not None and s.id == name:
            found.append(s)
    return sorted(found, key=lambda s: (s.started, s.id), reverse=True)


def list_runs_of(run_dir: str | os.PathLike, trainers: Iterable[str]) -> list[RunSummary]:
    """Every listed trainer's runs together, newest first (bin/status --runs, the page's table)."""
    return sorted((s for t in trainers for s in list_runs(runs_root(run_dir, t))),
                  key=lambda s: (s.started, s.id), reverse=True)


def append_metrics(root: Path, run_id: str, records: list[dict]) -> int:
    """Append `records` to the run's metrics.jsonl in one write(); returns the bytes written."""
    if not records:
        return 0
    data = b"".join(encode_record(r) for r in records)
    path = root / check_run_id(run_id) / METRICS_FILE
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), FILE_MODE)
    try:
        write_all(OS, fd, data)  # a short write on a nearly full disk: finish the line, or raise (never spin)
    finally:
        os.close(fd)
    return len(data)


def read_metrics(root: Path, run_id: str) -> list[dict]:
    """The run's records without the lost work of resumed incarnations (see the module doc)."""
    try:
        raw = (root / check_run_id(run_id) / METRICS_FILE).read_bytes()
    except FileNotFoundError:
        return []
    out: list[dict] = []
    for line in raw.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn last line (killed mid-write)
        if not isinstance(record, dict):
            continue
        if record.get("event") == RESUME_EVENT and isinstance(record.get("step"), int):
            resumed_at = record["step"]
            out = [r for r in out if not (isinstance(r.get("step"), int) and r["step"] > resumed_at)]
        out.append(record)
    return out


def run_bytes(directory: Path) -> int:
    """Bytes the files of one run directory take."""
    total = 0
    try:
        with os.scandir(directory) as entries:
            for e in entries:
                try:
                    if e.is_file(follow_symlinks=False):
                        total += e.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    pass
    except FileNotFoundError:
        return 0
    return total


@dataclass(frozen=True)
class Pruned:
    """What `prune` deleted, oldest first."""

    removed: list[str] = field(default_factory=list)
    freed_bytes: int = 0


def prune(root: Path, *, keep: int, max_bytes: int, live: str | None = None) -> Pruned:
    """Delete the oldest runs until at most `keep` remain and they take at most `max_bytes`.

    The live run is never deleted (it may alone exceed the bytes; its writer stops appending).
    Directories without a readable run.json count too (as the oldest), so debris cannot pile up.
    """
    try:
        names = [n for n in os.listdir(root) if _RUN_ID.match(n) and (root / n).is_dir()]
    except FileNotFoundError:
        return Pruned()
    started: dict[str, float] = {}
    for n in names:
        s = read_summary(root / n / SUMMARY_FILE)
        started[n] = s.started if s is not None else float("-inf")
    sizes = {n: run_bytes(root / n) for n in names}
    order = sorted(names, key=lambda n: (started[n], n))  # oldest first
    count, total = len(order), sum(sizes.values())
    removed, freed = [], 0
    for n in order:
        if count <= keep and total <= max_bytes:
            break
        if n == live:
            continue
        shutil.rmtree(root / n, ignore_errors=True)
        removed.append(n)
        freed += sizes[n]
        count -= 1
        total -= sizes[n]
    return Pruned(removed, freed)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


RUN_COLUMNS = ("RUN", "TRAINER", "STARTED", "STEPS", "LOSS", "BEST", "VAL", "BEST VAL", "DIGEST", "END")


def run_row(s: RunSummary) -> tuple[str, ...]:
    """One run as the cells of RUN_COLUMNS (bin/status --runs and the page's table)."""
    end = s.end + (f": {s.error}" if s.error else "")
    return (s.id, s.trainer, _when(s.started), str(s.steps), _fmt(s.last_loss), _fmt(s.best_loss),
            _fmt(s.last_val_loss), _fmt(s.best_val_loss), s.config_digest, end)


def runs_table(summaries: list[RunSummary]) -> str:
    """A plain-text table of runs, newest first."""
    rows = [RUN_COLUMNS] + [run_row(s) for s in summaries]
    widths = [max(len(r[i]) for r in rows) for i in range(len(RUN_COLUMNS) - 1)]
    return "\n".join(
        "  ".join([c.ljust(widths[i]) for i, c in enumerate(r[:-1])] + [r[-1]]).rstrip() for r in rows
    )
