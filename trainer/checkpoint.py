"""Atomic, step-named checkpoints in one directory: save, keep the last K, load the newest valid one.

A checkpoint is written to a temp file in the same directory, fsynced,
renamed over its final name with os.replace and the directory fsynced, so a
crash at any instant leaves either the old set of files or the new one, never a
half-written `ckpt-*.pt`. A temp file left by a crash is removed at start-up.
A checkpoint belongs to one run (trainer/runs.py): another run's checkpoints are moved
aside to `superseded/<run_id>/` by `set_aside`, kept, and never loaded again.
Limits: the directory must be on a local filesystem (rename is atomic there;
NFS makes weaker promises).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from keel.fs.atomic import atomic_write
from keel.status.runs import safe_run_id

PREFIX = "ckpt-"
SUFFIX = ".pt"
TEMP_PREFIX = ".tmp-ckpt-"
CORRUPT_SUFFIX = ".corrupt"
SUPERSEDED_DIR = "superseded"
_NAME = re.compile(r"^ckpt-(\d{9,})\.pt$")

log = logging.getLogger("keel.trainer.checkpoint")


def checkpoint_name(step: int) -> str:
    """`ckpt-000001234.pt`: zero-padded so names sort like steps."""
    return f"{PREFIX}{step:09d}{SUFFIX}"


def parse_step(name: str) -> int | None:
    """The step in a checkpoint file name, or None for any other file."""
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Loaded:
    """A checkpoint that loaded: its step, path and contents."""

    step: int
    path: Path
    state: dict[str, Any]


class CheckpointStore:
    """The checkpoints of one run in `directory`.

    `on_corrupt(path, error)` is called for every unreadable checkpoint that
    `load_latest` skips, so the caller can report it as an event.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        keep: int = 3,
        *,
        on_corrupt: Callable[[Path, BaseException], None] | None = None,
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, not {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self._on_corrupt = on_corrupt

    def steps(self) -> list[tuple[int, Path]]:
        """Every finished checkpoint as (step, path), oldest first."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        found = [(s, self.directory / n) for n in names if (s := parse_step(n)) is not None]
        return sorted(found)

    def remove_stale_temps(self) -> list[Path]:
        """Delete temp files a killed writer left behind; call once at start, before any save."""
        removed = []
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return removed
        for n in names:
            if n.startswith(TEMP_PREFIX):
                p = self.directory / n
                try:
                    p.unlink()
                    removed.append(p)
                except FileNotFoundError:
                    pass
        return removed

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write `state` as the checkpoint for `step` atomically, then prune to the last `keep`."""
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / checkpoint_name(step)
        # temp + fsync + os.replace + dir fsync: a SIGKILL at any point leaves the old checkpoints intact
        atomic_write(final, lambda f: torch.save(state, f), mode=0o640, temp_prefix=TEMP_PREFIX, sync_dir=True)
        self._prune()
        return final

    def _prune(self) -> None:
        for _, path in self.steps()[: -self.keep]:
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def set_aside(self, run_id: str) -> Path:
        """Move every finished checkpoint to `superseded/<run_id>/` (kept, never loaded again); returns that dir.

        A new run must not find them: the newest step would win `load_latest` over its own
        checkpoints, and `keep` would prune them. One rename per file, so a crash half-way
        leaves the rest for the next start to move; call it on rank 0 only."""
        target = self.directory / SUPERSEDED_DIR / safe_run_id(run_id)
        target.mkdir(parents=True, exist_ok=True)
        for _, path in self.steps():
            try:
                os.replace(path, target / path.name)
            except FileNotFoundError:
                pass
        return target

    def _quarantine(self, path: Path) -> None:
        # Renamed aside (kept for a post-mortem) so it neither shadows newer saves nor takes a `keep` slot.
        try:
            os.replace(path, path.with_name(path.name + CORRUPT_SUFFIX))
        except OSError:
            pass  # another rank moved it first, or a read-only dir: skipping it is enough

    def load_latest(self, map_location: Any = "cpu") -> Loaded | None:
        """The newest checkpoint that loads; unreadable newer ones are skipped, reported and renamed to
        `<name>.corrupt`, never raised."""
        for step, path in reversed(self.steps()):
            try:
                # weights_only=False: the state holds RNG states and optimizer state written by us.
                state = torch.load(path, map_location=map_location, weights_only=False)
                if not isinstance(state, dict):
                    raise ValueError(f"checkpoint holds {type(state).__name__}, not a dict")
            except FileNotFoundError:
                continue  # pruned by a concurrent writer between listdir and open
            except Exception as e:  # noqa: BLE001 - any unreadable file is skipped, whatever broke it
                log.warning(
                    "skipping unreadable checkpoint %s: %s",
                    path,
                    e,
                    extra={"event": "checkpoint_corrupt", "path": str(path)},
                )
                self._quarantine(path)
                if self._on_corrupt is not None:
                    self._on_corrupt(path, e)
                continue
            return Loaded(step=step, path=path, state=state)
        return None
