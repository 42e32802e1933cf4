"""The trainer's view of its resolved file (`build/<env>/trainer.json`).

The file is read and checked by keel.render.contract (the one definition of its
shape, strict, no defaults); this module only flattens the trainer's part into
the names the training loop uses. Every value comes from the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from keel.render.contract import (
    Checkpoint, ContractError, ProcessFile, Report, Runs, Torchrun, load_process_file, parse_process_file,
)

OnNan = Literal["stop", "skip", "continue"]


@dataclass(frozen=True)
class TrainerSettings:
    """Everything `python -m trainer` needs, from one resolved file."""

    name: str
    run_dir: Path
    log_dir: Path
    checkpoint_dir: Path
    tmp_dir: Path
    gpus: list[int] | dict[str, int]
    gpu_memory_fraction: float | None
    gpu_memory_bytes: int | None
    heartbeat_interval: float
    stop_timeout: float
    durability: str
    log_format: str
    log_level: str
    entry: str | None
    launcher: str
    backend: str
    threads: int
    seed: int
    max_steps: int | None
    batch_size: int
    learning_rate: float
    val_every_steps: int
    num_workers: int
    checkpoint: Checkpoint
    report: Report
    torchrun: Torchrun  # multi-node rendezvous, node name, shared checkpoints
    runs: Runs  # the runs archive's retention
    on_nan: OnNan
    params: dict[str, Any]

    @property
    def auto_gpus(self) -> int | None:
        """N for `gpus: {"auto": N}`, else None."""
        if isinstance(self.gpus, dict):
            return int(self.gpus["auto"])
        return None


def from_process_file(pf: ProcessFile, where: str) -> TrainerSettings:
    """The trainer's view of a checked resolved file; ContractError unless it is a trainer's."""
    t = pf.trainer
    if pf.kind != "trainer" or t is None:
        raise ContractError(where, "kind", f"expected a trainer's resolved file, got kind {pf.kind!r}")
    return TrainerSettings(
        name=pf.name,
        run_dir=Path(pf.paths.run_dir),
        log_dir=Path(pf.paths.log_dir),
        checkpoint_dir=Path(pf.paths.checkpoint_dir),
        tmp_dir=Path(pf.paths.tmp_dir),
        gpus=list(pf.gpus) if isinstance(pf.gpus, list) else {"auto": pf.gpus.auto},
        gpu_memory_fraction=pf.limits.gpu_memory_fraction,
        gpu_memory_bytes=pf.limits.gpu_memory_bytes,
        heartbeat_interval=pf.heartbeat_interval,
        stop_timeout=pf.stop_timeout,
        durability=pf.durability,
        log_format=pf.log.format,
        log_level=pf.log.level,
        entry=t.entry,
        launcher=t.launcher,
        backend=t.torchrun.backend,
        threads=t.threads,
        seed=t.seed,
        max_steps=t.max_steps,
        batch_size=t.batch_size,
        learning_rate=t.learning_rate,
        val_every_steps=t.val_every_steps,
        num_workers=t.num_workers,
        checkpoint=t.checkpoint,
        report=t.report,
        torchrun=t.torchrun,
        runs=t.runs,
        on_nan=t.on_nan,
        params=dict(t.params),
    )


def parse_settings(doc: Any, where: str = "trainer.json") -> TrainerSettings:
    """An already-parsed resolved trainer file -> `TrainerSettings`; ContractError naming `where` and the key."""
    return from_process_file(parse_process_file(doc, where), where)


def load_settings(path: str | os.PathLike[str]) -> TrainerSettings:
    """Read and check the resolved file at `path`."""
    return from_process_file(load_process_file(path), str(path))


# AF_UNIX socket paths are limited to 107 bytes on Linux. multiprocessing (used by
# DataLoader workers to pass tensors) creates `<TMPDIR>/pymp-XXXXXXXX/listener-XXXXXXXX`,
# about 36 bytes more, so a deep TMPDIR makes every worker fail. Python 3.11 has no fallback.
MAX_TMPDIR_LEN = 64


def choose_tmpdir(configured: Path, name: str, uid: int) -> tuple[Path, bool]:
    """The TMPDIR to use: the configured one, or `/tmp/keel-<uid>-<name>` when that is too long
    for the unix sockets multiprocessing puts there. Returns (path, fell_back)."""
    if len(os.fsencode(str(configured))) <= MAX_TMPDIR_LEN:
        return configured, False
    return Path(f"/tmp/keel-{uid}-{name}"), True
