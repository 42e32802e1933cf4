"""The trainer's view of its resolved file (`build/<env>/trainer.json`).

Pure: a dict in, frozen dataclasses out. Only the keys the trainer uses are
read; render-config has already validated the whole file, so a missing key here
is a bug in the resolved file and fails loudly with the key's path.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

OnNan = Literal["stop", "skip", "continue"]


class SettingsError(ValueError):
    """The resolved file lacks a key or has a value of the wrong kind; `.key` names it."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"{key}: {detail}")
        self.key = key


@dataclass(frozen=True)
class CheckpointSettings:
    every_seconds: float | None = 10.0
    every_steps: int | None = None
    keep: int = 3


@dataclass(frozen=True)
class ReportSettings:
    status_interval: float = 1.0
    metrics_interval: float = 1.0


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
    entry: str | None = None
    launcher: str = "python"
    backend: str = "auto"
    threads: int = 1
    seed: int = 0
    max_steps: int | None = None
    batch_size: int = 64
    learning_rate: float = 3e-3
    val_every_steps: int = 200
    num_workers: int = 2
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    report: ReportSettings = field(default_factory=ReportSettings)
    on_nan: OnNan = "stop"
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def auto_gpus(self) -> int | None:
        """N for `gpus: {"auto": N}`, else None."""
        if isinstance(self.gpus, dict):
            return int(self.gpus["auto"])
        return None


def _get(d: dict, key: str, path: str) -> Any:
    try:
        return d[key]
    except (KeyError, TypeError):
        raise SettingsError(f"{path}{key}", "missing from the resolved file") from None


def parse_settings(doc: dict) -> TrainerSettings:
    """Turn a resolved trainer file (see docs/internals.md) into `TrainerSettings`."""
    paths = _get(doc, "paths", "")
    t = doc.get("trainer") or {}
    limits = doc.get("limits") or {}
    log = doc.get("log") or {}
    ck = t.get("checkpoint") or {}
    rep = t.get("report") or {}
    on_nan = t.get("on_nan", "stop")
    if on_nan not in ("stop", "skip", "continue"):
        raise SettingsError("trainer.on_nan", f"must be stop, skip or continue, not {on_nan!r}")
    gpus = doc.get("gpus", [])
    if isinstance(gpus, dict) and "auto" not in gpus:
        raise SettingsError("gpus", "a mapping must be {'auto': N}")
    return TrainerSettings(
        name=_get(doc, "name", ""),
        run_dir=Path(_get(paths, "run_dir", "paths.")),
        log_dir=Path(_get(paths, "log_dir", "paths.")),
        checkpoint_dir=Path(_get(paths, "checkpoint_dir", "paths.")),
        tmp_dir=Path(paths.get("tmp_dir") or Path(paths["run_dir"]) / "tmp" / doc["name"]),
        gpus=gpus,
        gpu_memory_fraction=limits.get("gpu_memory_fraction"),
        gpu_memory_bytes=limits.get("gpu_memory_bytes"),
        heartbeat_interval=float(doc.get("heartbeat_interval", 2.0)),
        stop_timeout=float(doc.get("stop_timeout", 30.0)),
        durability=doc.get("durability", "none"),
        log_format=log.get("format", "auto"),
        log_level=log.get("level", "INFO"),
        entry=t.get("entry"),
        launcher=t.get("launcher", "python"),
        backend=(t.get("torchrun") or {}).get("backend", "auto"),
        threads=int(t.get("threads", 1)),
        seed=int(t.get("seed", 0)),
        max_steps=t.get("max_steps"),
        batch_size=int(t.get("batch_size", 64)),
        learning_rate=float(t.get("learning_rate", 3e-3)),
        val_every_steps=int(t.get("val_every_steps", 200)),
        num_workers=int(t.get("num_workers", 2)),
        checkpoint=CheckpointSettings(
            every_seconds=ck.get("every_seconds", 10.0),
            every_steps=ck.get("every_steps"),
            keep=int(ck.get("keep", 3)),
        ),
        report=ReportSettings(
            status_interval=float(rep.get("status_interval", 1.0)),
            metrics_interval=float(rep.get("metrics_interval", 1.0)),
        ),
        on_nan=on_nan,
        params=dict(t.get("params") or {}),
    )


def load_settings(path: str | os.PathLike) -> TrainerSettings:
    """Read and parse the resolved file at `path`."""
    with open(path, encoding="utf-8") as f:
        return parse_settings(json.load(f))


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
