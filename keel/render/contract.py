"""The files between processes, typed once: `build/<env>/<process>.json` and `build/<env>/keel.json`.

`keel.render.resolve` builds these models and the writer puts their JSON on disk;
every consumer (trainer, dashboard, watchdog, launch, status, doctor) reads them
back through `load_process_file` / `load_stack`. The models are strict (no type
coercion), frozen, forbid unknown keys and give no field a default, so a key
that resolve stopped writing, or one a consumer expects that was never written,
fails at load with a `ContractError` naming the file and the key, instead of
being papered over by a consumer's own default.

Imports only pydantic and the standard library: the trainer loads its file
before it imports torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# 2: `user` per process, watchdog `prometheus_interval`/`jitter`, kind blocks only for their kind.
FORMAT_VERSION = 3  # 3: incidents, same_crash, phases, runs, multi-node torchrun

Kind = Literal["trainer", "dashboard", "watchdog", "command"]
KIND_BLOCKS = ("trainer", "dashboard", "watchdog", "command")  # one per kind, named like it


class ContractError(ValueError):
    """A resolved file is unreadable or does not match the contract; names the file and the key."""

    def __init__(self, path: str, key: str, reason: str) -> None:
        super().__init__(f"{path}: {key}: {reason}" if key else f"{path}: {reason}")
        self.path = path
        self.key = key
        self.reason = reason


class Frozen(BaseModel):
    """Strict: a JSON value of the wrong type is an error, an unknown key is an error, nothing defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# -- shared blocks ---------------------------------------------------------------------------


class GpuAuto(Frozen):
    """`gpus: auto:N`: the process picks N GPUs at start (keel.host.gpu_allocation.allocate_gpus)."""

    auto: int = Field(ge=1)


Gpus = list[int] | GpuAuto


class Limits(Frozen):
    memory_bytes: int | None
    gpu_memory_bytes: int | None
    gpu_memory_fraction: float | None


class LogBlock(Frozen):
    format: Literal["json", "text"]
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"]


# -- the per-process file --------------------------------------------------------------------


class ProcessPaths(Frozen):
    root: str
    run_dir: str
    log_dir: str
    checkpoint_dir: str
    tmp_dir: str


class Torchrun(Frozen):
    nproc_per_node: int
    nnodes: int | str  # N, or an elastic range "min:max"
    backend: Literal["auto", "gloo", "nccl"]
    multi_node: bool
    rdzv_backend: Literal["c10d"]
    rdzv_endpoint: str | None
    rdzv_id: str | None  # resolved: None on one node
    node: str | None  # resolved: None on one node; names the ranks' status files
    max_restarts: int
    join_timeout: float
    last_call_timeout: float
    close_timeout: float
    shared_checkpoints: bool


class Checkpoint(Frozen):
    every_seconds: float | None
    every_steps: int | None
    keep: int


class Report(Frozen):
    status_interval: float
    metrics_interval: float


class Runs(Frozen):
    keep: int
    max_bytes: int


class TrainerBlock(Frozen):
    entry: str | None
    launcher: Literal["python", "torchrun"]
    threads: int
    seed: int
    max_steps: int | None
    batch_size: int
    learning_rate: float
    val_every_steps: int
    num_workers: int
    on_nan: Literal["stop", "skip", "continue"]
    params: dict[str, Any]
    torchrun: Torchrun
    checkpoint: Checkpoint
    report: Report
    runs: Runs


class Auth(Frozen):
    required: bool
    username: str
    password_hash: str | None
    password_file: str | None


class DashboardBlock(Frozen):
    address: str
    port: int
    allow_websocket_origin: list[str]
    refresh: float
    history_points: int
    log_tail_lines: int
    keep_alive: float
    unused_session_lifetime: float
    auth: Auth
    stack: str  # keel.json


class Alert(Frozen):
    command: list[str] | None
    timeout: float


class Incidents(Frozen):
    enabled: bool
    capture_timeout: float
    keep: int
    log_lines: int
    metrics_records: int
    py_spy: str


class SameCrash(Frozen):
    enabled: bool
    resumes: int
    steps: int


class WatchdogBlock(Frozen):
    poll_interval: float
    rss_consecutive_polls: int
    stable_after: float
    alert: Alert
    prometheus_textfile: str | None  # absolute, or None when disabled
    prometheus_interval: float
    jitter: Literal["full", "none"]
    stack: str  # keel.json
    incidents: Incidents
    same_crash: SameCrash


class CommandBlock(Frozen):
    port: int | None


class ProcessFile(Frozen):
    """`build/<env>/<name>.json`: what one process reads, nothing of its siblings.

    Exactly one kind block is present, the one named by `kind`; the others are absent
    from the file (and None here).
    """

    generated: str
    format_version: Literal[3]
    project: str
    environment: str
    name: str
    kind: Kind
    user: str | None
    durability: Literal["none", "fsync"]
    paths: ProcessPaths
    gpus: Gpus
    limits: Limits
    heartbeat_interval: float
    stop_timeout: float
    log: LogBlock
    trainer: TrainerBlock | None = None
    dashboard: DashboardBlock | None = None
    watchdog: WatchdogBlock | None = None
    command: CommandBlock | None = None

    @model_validator(mode="after")
    def _one_kind_block(self) -> ProcessFile:
        for kind in KIND_BLOCKS:
            if kind == self.kind and getattr(self, kind) is None:
                raise ValueError(f"the {kind} block is missing (kind is {kind})")
            if kind != self.kind and kind in self.model_fields_set:  # even as null: resolve never writes it
                raise ValueError(f"a {kind} block in a {self.kind} file")
        return self

    def to_json(self) -> dict[str, Any]:
        """The JSON document (kind blocks of other kinds left out), as the writer puts it on disk."""
        return self.model_dump(mode="json", exclude={k for k in KIND_BLOCKS if k != self.kind})


# -- the stack file --------------------------------------------------------------------------


class StackPaths(Frozen):
    root: str
    run_dir: str
    log_dir: str
    checkpoint_dir: str
    build_dir: str


class Control(Frozen):
    backend: Literal["supervisord", "systemd"]
    mode: Literal["standalone", "include"]
    socket: str
    config: str  # supervisord.conf (standalone) or the installed conf.d fragment (include)
    pidfile: str
    unit_dir: str
    target: str  # <project>.target


class AutoTimeout(Frozen):
    k: float
    floor: float
    ceiling: float
    ceilings: dict[str, float]
    min_samples: int


class DataStarved(Frozen):
    fraction: float
    polls: int


class GpuIdle(Frozen):
    util_percent: float
    polls: int


class Health(Frozen):
    heartbeat_interval: float
    heartbeat_timeout: float
    progress_timeout: float | Literal["auto"]  # "auto": per phase, from health.auto (keel.watch.phases)
    startup_grace: float
    auto: AutoTimeout
    data_starved: DataStarved
    gpu_idle: GpuIdle


class Restart(Frozen):
    policy: Literal["always", "on-failure", "never"]
    backoff_initial: float
    backoff_max: float
    max_restarts: int
    window: float


class Stop(Frozen):
    signal: Literal["TERM", "INT", "QUIT", "HUP", "USR1", "USR2"]
    timeout: float


class StackProcess(Frozen):
    kind: Kind
    program: str  # the supervisord program name, computed once in resolve
    unit: str  # the systemd unit name, computed once in resolve
    user: str | None
    command: list[str]
    config_file: str
    status_names: list[str]  # one, or one per torchrun rank
    log_file: str
    gpus: Gpus
    limits: Limits
    health: Health
    restart: Restart
    stop: Stop
    port: int | None
    priority: int
    autostart: bool


class StackFile(Frozen):
    """`build/<env>/keel.json`: the whole stack, for the watchdog, the page and the bin tools."""

    generated: str
    format_version: Literal[3]
    project: str
    environment: str
    backend: Literal["supervisord", "systemd"]
    durability: Literal["none", "fsync"]
    paths: StackPaths
    control: Control
    dashboard_url: str | None
    processes: dict[str, StackProcess]

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# -- loading ---------------------------------------------------------------------------------

M = TypeVar("M", bound=Frozen)


def _key(loc: tuple[Any, ...]) -> str:
    # pydantic puts union member names (`list[int]`, `GpuAuto`) in the location; a user wants keys
    parts = [str(p) for p in loc if not (isinstance(p, str) and (p[:1].isupper() or "[" in p))]
    return ".".join(parts)


def parse(model: type[M], doc: Any, where: str) -> M:
    """Validate an already-parsed JSON document; `where` names it in the error."""
    if not isinstance(doc, dict):
        raise ContractError(where, "", "expected a JSON object")
    if "format_version" not in doc:
        raise ContractError(where, "format_version", "missing (not a keel resolved file?)")
    version = doc["format_version"]
    if version != FORMAT_VERSION:
        raise ContractError(
            where, "format_version", f"unknown format_version {version!r}; this keel reads {FORMAT_VERSION} (run bin/render-config again)"
        )
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        reason = "missing" if first["type"] == "missing" else first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            reason = "unknown key"
        elif first["type"] not in ("missing", "value_error") and "input" in first:
            reason = f"{first['msg']}, got {first['input']!r}"
        raise ContractError(where, _key(first["loc"]), reason) from None


def _read(path: str | os.PathLike[str]) -> Any:
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ContractError(str(p), "", f"cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ContractError(str(p), "", f"not JSON: {exc}") from None


def parse_process_file(doc: Any, where: str = "<process file>") -> ProcessFile:
    return parse(ProcessFile, doc, where)


def parse_stack(doc: Any, where: str = "keel.json") -> StackFile:
    return parse(StackFile, doc, where)


def load_process_file(path: str | os.PathLike[str]) -> ProcessFile:
    """Read `build/<env>/<name>.json`; ContractError naming the file and key if it does not match."""
    return parse(ProcessFile, _read(path), str(path))


def load_stack(path: str | os.PathLike[str]) -> StackFile:
    """Read `build/<env>/keel.json`; ContractError naming the file and key if it does not match."""
    return parse(StackFile, _read(path), str(path))
