"""Helpers for the trainer's tests: a resolved trainer.json in tmp_path, starting `python -m trainer`,
reading what it wrote, and small plug-in entries that misbehave on purpose."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil

from keel.status.reader import StatusReader
from tests.resolved import resolve_stack
from tests.support import PYTHON, REPO_ROOT, ProcessReaper

# val_every_steps past any test's last step: no validation pass runs (the model requires >= 1).
NO_VALIDATION = 1_000_000
# Report intervals (seconds; durations must be > 0) shorter than any training step: every step is
# due, so each gets its own metrics record -- except the first, which starts the rate clock and is
# folded into the second step's record.
EVERY_STEP = {"status_interval": 1e-9, "metrics_interval": 1e-9}


def write_config(tmp_path: Path, *, name: str = "trainer", **trainer: Any) -> Path:
    """`<tmp_path>/<name>.json` for one trainer, written by the real resolver, with short intervals for tests.

    Keyword arguments are the trainer's config keys (`max_steps=7`, `checkpoint={"every_seconds": "1s"}`;
    a nested dict replaces that section, whose other keys then take the model's defaults).
    """
    settings: dict[str, Any] = {
        "kind": "trainer",
        "val_every_steps": 100,
        "checkpoint": {"every_seconds": "1s"},
        "report": {"status_interval": "200ms", "metrics_interval": "200ms"},
        "health": {"heartbeat_interval": "300ms"},
        "stop": {"timeout": "15s"},
    }
    settings.update(trainer)
    resolve_stack(tmp_path, {name: settings})
    return tmp_path / f"{name}.json"


class TrainerProcess:
    """A started `python -m trainer` with its log file and run dir."""

    def __init__(self, proc: subprocess.Popen, config: Path, log_path: Path) -> None:
        self.proc = proc
        self.config = config
        self.log_path = log_path
        doc = json.loads(config.read_text())
        self.run_dir = Path(doc["paths"]["run_dir"])
        self.checkpoint_dir = Path(doc["paths"]["checkpoint_dir"])
        self.name = doc["name"]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def status(self, name: str | None = None):
        """The status snapshot, or a ReadError (falsy) when there is none yet."""
        return StatusReader(self.run_dir).read(name or self.name)

    def payload(self, name: str | None = None) -> dict | None:
        st = self.status(name)
        if not st or st.payload is None:
            return None
        p = st.payload
        return p if isinstance(p, dict) else p.model_dump()

    def step(self, name: str | None = None) -> int:
        p = self.payload(name)
        return int(p["step"]) if p else 0

    def metrics(self, name: str | None = None) -> list[dict]:
        path = self.run_dir / f"{name or self.name}.metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def log_records(self) -> list[dict]:
        """The JSON log lines the trainer wrote (other lines, e.g. a traceback, are skipped)."""
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)


def start_trainer(
    reaper: ProcessReaper,
    config: Path,
    *,
    env: dict[str, str] | None = None,
    log_name: str = "trainer.log",
    argv: list[str] | None = None,
) -> TrainerProcess:
    """Start `python -m trainer --config <config>` from the repo root, output to a log file in its dir."""
    log_path = config.parent / log_name
    inherited = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    full_env = {**inherited, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "ab") as log:
        proc = reaper.popen(
            argv or [PYTHON, "-m", "trainer", "--config", str(config)],
            cwd=REPO_ROOT,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return TrainerProcess(proc, config, log_path)


def gone(pids: list[int]) -> bool:
    """True when none of `pids` is a live (non-zombie) process."""
    from tests.support import is_alive

    return not any(is_alive(p) for p in pids)


# --- plug-in entries used by the tests (run inside `python -m trainer`) ---------------------------


def raising_entry(run) -> None:
    """Reports three steps, then fails the way user code does."""
    for step in range(1, 4):
        run.report(step=step, loss=1.0 / step)
    raise ValueError("boom from the plug-in")


def hanging_entry(run) -> None:
    """Reports steps for `params.hang_after` seconds, then stops making progress (but obeys SIGTERM)."""
    hang_after = float(run.config.get("hang_after", 1.5))
    start = time.monotonic()
    step = 0
    while not run.should_stop():
        if time.monotonic() - start < hang_after:
            step += 1
            run.report(step=step, loss=1.0)
        time.sleep(0.01)
