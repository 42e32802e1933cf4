"""The typed model of a keel environment: configs/base.yaml overlaid by configs/<env>.yaml.

One pydantic v2 model validates the merged YAML; unknown keys are errors. The
same model generates configs/schema.json and docs/configuration.md, so the
reference cannot drift from what is validated. Field descriptions are the
reference text: keep them to one sentence a user can act on.
"""

from __future__ import annotations

import re
import shlex
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from keel.config.quantities import format_duration, parse_size
from keel.config.types import Duration, FieldProblem, Size, Strict
from keel.config.incidents import IncidentSettings
from keel.config.phases import AutoTimeout, DataStarvedSettings, GpuIdleSettings, ProgressTimeout
from keel.config.endings import SameCrashSettings
from keel.config.torchrun import TorchrunSettings
from keel.config.runs import RunRetention

NAME_PATTERN = r"^[a-z][a-z0-9_-]*$"
KINDS = ("trainer", "dashboard", "watchdog", "command")
RESERVED_ENV_REASON = "keel sets KEEL_PROCESS, KEEL_CONFIG and KEEL_CONFIG_DIGEST itself; choose another name"


def _env_value(value: Any) -> Any:
    """YAML turns `1` into an int; an environment value is text, so numbers become text. Booleans are ambiguous."""
    if isinstance(value, bool):
        raise ValueError(f'a boolean is ambiguous in an environment value: quote it ("true", "1", ...), got {value}')
    if isinstance(value, (int, float)):
        return str(value)
    return value


def _env_text(value: str) -> str:
    if any(c in value for c in "\n\r\x00"):
        raise ValueError("an environment value cannot contain a newline, carriage return or NUL byte")
    return value


EnvValue = Annotated[str, BeforeValidator(_env_value), AfterValidator(_env_text)]
EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


def _argv(value: Any) -> Any:
    """A command is a list of arguments or one string split like a shell would (no shell runs it)."""
    if isinstance(value, str):
        try:
            argv = shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"cannot split the command into arguments: {exc}") from None
        if not argv:
            raise ValueError("the command is empty")
        return argv
    return value


Command = Annotated[list[str], BeforeValidator(_argv), Field(min_length=1)]


class Paths(Strict):
    root: str = Field(".", description="Project root; relative paths below resolve against it. A relative root resolves against the keel checkout.")
    run_dir: str = Field("var/run", description="Status files, locks, metrics, events, supervisord's socket and pidfile.")
    log_dir: str = Field("var/log", description="One log file per process (supervisord backend) and supervisord's own log.")
    checkpoint_dir: str = Field("var/checkpoints", description="Trainer checkpoints; never deleted by keel or a rollout.")


class SupervisordSettings(Strict):
    mode: Literal["standalone", "include"] = Field(
        "standalone",
        description="standalone: a complete supervisord.conf with its own socket in the run dir; include: a conf.d fragment for the host's supervisord.",
    )
    conf_dir: str = Field("/etc/supervisor/conf.d", description="include mode: where the host supervisord reads fragments from.")
    install: bool = Field(True, description="include mode: also write the fragment into conf_dir (not with --out).")
    socket: str | None = Field(
        None,
        description="The supervisord unix socket. Default: <run_dir>/supervisor.sock (standalone), /var/run/supervisor.sock (include).",
    )
    reload: bool = Field(True, description="include mode: ask a reachable host supervisord to reread and update after rendering.")


class SystemdSettings(Strict):
    unit_dir: str = Field("/etc/systemd/system", description="Where units are installed (used by bin/launch and Ansible).")


class Limits(Strict):
    memory: Size | None = Field(None, description="Memory cap: MemoryMax= under systemd, a watchdog rule under both backends.")
    gpu_memory: Size | Annotated[float, Field(gt=0, le=1)] | None = Field(
        None,
        description="GPU memory cap per GPU, as a size (20GiB) or a fraction (0.5): torch.cuda.set_per_process_memory_fraction in the trainer and a watchdog rule.",
    )

    @field_validator("gpu_memory", mode="before")
    @classmethod
    def _gpu_memory(cls, value: Any) -> Any:
        if isinstance(value, float) and 0 < value <= 1:
            return value
        if isinstance(value, str) and value.strip().endswith("%"):
            return float(value.strip()[:-1]) / 100
        if value is None:
            return None
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"expected a size like 20GiB or a fraction in (0, 1], got {value}")
        return parse_size(value)


class Health(Strict):
    heartbeat_interval: Duration = Field(2.0, description="How often the process's heartbeat thread rewrites its status.")
    heartbeat_timeout: Duration = Field(30.0, description="Heartbeat older than this: the process is frozen (SIGSTOP, swapped out, deadlocked interpreter).")
    progress_timeout: ProgressTimeout = Field(600.0, description="Progress older than this: the work loop is hung though the process still beats; `auto`: per trainer phase, from its observed durations (see `auto`).")
    startup_grace: Duration = Field(120.0, description="No verdict on progress or a missing status until the process has run this long.")
    auto: AutoTimeout = Field(default_factory=AutoTimeout, description="How `progress_timeout: auto` sets each phase's threshold: max(floor, k x p99), at most the ceiling.")
    data_starved: DataStarvedSettings = Field(default_factory=DataStarvedSettings, description="Warn (never restart) when a trainer mostly waits for data.")
    gpu_idle: GpuIdleSettings = Field(default_factory=GpuIdleSettings, description="Warn (never restart) when a running trainer's GPUs sit idle.")

    @model_validator(mode="after")
    def _interval_below_timeout(self) -> Health:
        if self.heartbeat_interval >= self.heartbeat_timeout:
            raise FieldProblem(
                "heartbeat_interval",
                f"heartbeat_interval ({format_duration(self.heartbeat_interval)}) must be shorter than heartbeat_timeout ({format_duration(self.heartbeat_timeout)})"
            )
        return self


class Restart(Strict):
    policy: Literal["always", "on-failure", "never"] = Field("always", description="When the backend restarts an exited process.")
    backoff_initial: Duration = Field(5.0, description="First delay before a watchdog restart; doubles each time, with jitter.")
    backoff_max: Duration = Field(300.0, description="Longest delay between watchdog restarts.")
    max_restarts: int = Field(5, gt=0, description="Most restarts within `window`; past it the process is stopped and marked failed.")
    window: Duration = Field(3600.0, description="The window for max_restarts (also StartLimitIntervalSec= under systemd).")

    @model_validator(mode="after")
    def _ordered(self) -> Restart:
        if self.backoff_initial > self.backoff_max:
            raise FieldProblem("backoff_initial", "backoff_initial must not exceed backoff_max")
        return self


class Stop(Strict):
    signal: Literal["TERM", "INT", "QUIT", "HUP", "USR1", "USR2"] = Field("TERM", description="The signal that asks the process to stop.")
    timeout: Duration = Field(60.0, description="Time to finish (a trainer checkpoints) before SIGKILL to the whole process group.")


class LogSettings(Strict):
    format: Literal["json", "text"] = Field("json", description="json lines (for tools) or text.")
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    max_bytes: Size = Field(50 * 1024**2, description="supervisord rotates the process log at this size.")
    backups: int = Field(5, ge=0, le=100, description="Rotated log files kept.")


def _gpus(value: Any) -> Any:
    """`[0, 1]`, `auto:N` or none; anything else gets one message instead of a union's three."""
    if value is None or value == "none":
        return []
    if isinstance(value, list):
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
            raise ValueError(f"GPU indices must be whole numbers >= 0, got {value!r}")
        return value
    if isinstance(value, str) and re.fullmatch(r"auto:\d+", value.strip()):
        if int(value.strip()[5:]) < 1:
            raise ValueError(f"auto:N needs N >= 1, got {value!r}")
        return value.strip()
    raise ValueError(f"expected a list of GPU indices like [0, 1], auto:N, or [], got {value!r}")


GpuSpec = Annotated[
    Union[list[int], str],
    BeforeValidator(_gpus),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "array", "items": {"type": "integer", "minimum": 0}, "uniqueItems": True},
                {"type": "string", "pattern": r"^auto:[1-9][0-9]*$"},
                {"type": "null"},
            ],
            "description": "GPU indices, auto:N, or none.",
        }
    ),
]


class ProcessBase(Strict):
    command: Command | None = Field(None, description="What to run (list or string). Kinds trainer, dashboard and watchdog have a default.")
    user: str | None = Field(None, description="Run as this user (requires a root supervisord or systemd).")
    working_dir: str | None = Field(None, description="Working directory. Default: the keel checkout.")
    environment: dict[EnvName, EnvValue] = Field(
        default_factory=dict,
        description="Extra environment variables. Names starting with KEEL_ are reserved for keel and refused.",
    )
    gpus: GpuSpec = Field(default_factory=list, description="GPUs: a list of indices, `auto:N` (least-used N, picked at start under a lock), or none.")
    limits: Limits = Field(default_factory=Limits)
    health: Health = Field(default_factory=Health)
    restart: Restart = Field(default_factory=Restart)
    stop: Stop = Field(default_factory=Stop)
    log: LogSettings = Field(default_factory=LogSettings)
    priority: int = Field(100, ge=0, le=999, description="Start order (lower starts first, stops last).")
    autostart: bool = Field(True, description="Start with the stack.")
    startsecs: Duration = Field(1.0, description="supervisord: running this long counts as a successful start (rounded up to whole seconds).")
    startretries: int = Field(3, ge=0, le=100, description="supervisord: quick-exit retries before FATAL (the watchdog then applies its restart budget).")

    @field_validator("environment")
    @classmethod
    def _no_keel_names(cls, environment: dict[str, str]) -> dict[str, str]:
        # keel sets KEEL_PROCESS, KEEL_CONFIG, KEEL_CONFIG_DIGEST and reads KEEL_* at start; a user
        # variable there would either be overridden or override keel, so it is refused, never dropped.
        for key in environment:
            if key.startswith("KEEL_"):
                raise FieldProblem(key, f"KEEL_* names are reserved for keel ({RESERVED_ENV_REASON})")
        return environment

    def gpu_list(self) -> list[int]:
        return list(self.gpus) if isinstance(self.gpus, list) else []

    def gpu_auto_count(self) -> int:
        return int(self.gpus.split(":", 1)[1]) if isinstance(self.gpus, str) else 0


class CheckpointSettings(Strict):
    every_seconds: Duration | None = Field(300.0, description="Checkpoint at least this often.")
    every_steps: int | None = Field(None, gt=0, description="Also checkpoint every N steps.")
    keep: int = Field(3, ge=1, description="Checkpoints kept; older ones are deleted.")


class ReportSettings(Strict):
    status_interval: Duration = Field(1.0, description="Most frequent status snapshot rewrite from the training loop.")
    metrics_interval: Duration = Field(1.0, description="Metrics are batched and appended at most this often.")


class TrainerProcess(ProcessBase):
    kind: Literal["trainer"]
    entry: str | None = Field(
        None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", description='Your training function, "package.module:function"; none runs the built-in model.'
    )
    launcher: Literal["python", "torchrun"] = Field("python", description="torchrun spans processes/GPUs (gloo on CPU, NCCL on GPU).")
    torchrun: TorchrunSettings = Field(default_factory=TorchrunSettings)
    threads: int = Field(1, ge=1, le=256, description="torch.set_num_threads for the trainer.")
    seed: int = 0
    max_steps: int | None = Field(None, gt=0, description="Stop after this many steps; none trains until stopped.")
    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(3e-3, gt=0)
    val_every_steps: int = Field(200, ge=1, description="Validation pass every N steps.")
    num_workers: int = Field(2, ge=0, le=64, description="DataLoader worker processes.")
    checkpoint: CheckpointSettings = Field(default_factory=CheckpointSettings)
    report: ReportSettings = Field(default_factory=ReportSettings)
    on_nan: Literal["stop", "skip", "continue"] = Field("stop", description="What a NaN/inf loss does.")
    params: dict[str, Any] = Field(default_factory=dict, description="Free-form settings handed to your entry as run.config.")
    runs: RunRetention = Field(default_factory=RunRetention, description="Past runs kept for the page and bin/status --runs (count and bytes).")


class AuthSettings(Strict):
    required: bool = Field(False, description="Require a login. prod sets this.")
    username: str = "keel"
    password_hash: str | None = Field(None, description="A hash from `python -m dashboard.auth hash`; keep it in Ansible vault, not in git.")
    password_file: str | None = Field(None, description="A file holding the hash (alternative to password_hash).")

    @model_validator(mode="after")
    def _has_secret(self) -> AuthSettings:
        if self.required and not (self.password_hash or self.password_file):
            raise FieldProblem("required", "auth.required needs password_hash or password_file (there is no default password)")
        return self


class DashboardProcess(ProcessBase):
    kind: Literal["dashboard"]
    address: str = Field("127.0.0.1", description="Bind address; a non-loopback address needs allow_origins.")
    port: int = Field(5006, ge=1, le=65535)
    allow_origins: list[str] | None = Field(
        None, description="Allowed websocket origins (host:port). Default: 127.0.0.1 and localhost on the port."
    )
    refresh: Duration = Field(1.0, description="How often the page updates.")
    history_points: int = Field(2000, ge=10, description="Points kept per resource series (host, processes, GPUs); older ones are thinned. Training metrics keep up to 2,000,000 rows a stream, drawn with at most 2,000 points a line.")
    log_tail_lines: int = Field(40, ge=0)
    keep_alive: Duration = Field(37.0, description="Websocket keep-alive ping interval.")
    unused_session_lifetime: Duration = Field(15.0, description="Closed browser sessions are freed after this.")
    auth: AuthSettings = Field(default_factory=AuthSettings)


class AlertSettings(Strict):
    command: Command | None = Field(None, description="Run with each alert event as JSON on stdin (mail, Slack, PagerDuty glue).")
    timeout: Duration = Field(10.0, description="The alert command is killed after this.")


class WatchdogProcess(ProcessBase):
    kind: Literal["watchdog"]
    poll_interval: Duration = Field(5.0, description="How often statuses and resources are checked.")
    rss_consecutive_polls: int = Field(3, ge=1, description="RSS over limits.memory for this many polls in a row restarts the process.")
    stable_after: Duration = Field(600.0, description="A process healthy this long gets its restart budget back.")
    alert: AlertSettings = Field(default_factory=AlertSettings)
    prometheus_textfile: str | None = Field("keel.prom", description="Prometheus textfile (relative: in the run dir); none disables it.")
    incidents: IncidentSettings = Field(default_factory=IncidentSettings, description="Incident bundles captured before a restart or give-up.")
    same_crash: SameCrashSettings = Field(default_factory=SameCrashSettings, description="Give up early on a trainer that crashes with the same exception at the same step after every resume.")


class CommandProcess(ProcessBase):
    kind: Literal["command"]
    command: Command = Field(description="What to run (list or string).")
    port: int | None = Field(None, ge=1, le=65535, description="A port it listens on (checked for conflicts).")


Process = Annotated[
    Union[TrainerProcess, DashboardProcess, WatchdogProcess, CommandProcess],
    Field(discriminator="kind"),
]


class KeelConfig(Strict):
    """One environment: configs/base.yaml with configs/<env>.yaml on top."""

    project: str = Field(pattern=NAME_PATTERN, max_length=40, description="Names the supervisord group, systemd units and target.")
    backend: Literal["supervisord", "systemd"] = Field("supervisord", description="What runs the processes.")
    durability: Literal["none", "fsync"] = Field("none", description="fsync status files and their directory on every write (slower, survives power loss).")
    python: str | None = Field(None, description="Interpreter for keel's processes. Default: the checkout's .venv/bin/python.")
    paths: Paths = Field(default_factory=Paths)
    supervisord: SupervisordSettings = Field(default_factory=SupervisordSettings)
    systemd: SystemdSettings = Field(default_factory=SystemdSettings)
    processes: dict[str, Process] = Field(description="The stack: one entry per supervised process, keyed by name.")

    @field_validator("processes")
    @classmethod
    def _nonempty(cls, processes: dict[str, Any]) -> dict[str, Any]:
        if not processes:
            raise ValueError("at least one process is needed")
        return processes
