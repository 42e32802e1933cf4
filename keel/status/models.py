"""Status data models: the typed, versioned content of ``<name>.status.json``.

One envelope, ``ProcessStatus``, common to every process, with a payload chosen by
``kind`` (``TrainingStatus`` for "trainer", ``DashboardState`` for "dashboard",
``WatchdogStatus`` for "watchdog", a plain dict for anything else).

The JSON encoding is explicit and pure (bytes in, bytes out; no pickle):

- non-finite floats are the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``
  (JSON has no literal for them) and decode back to floats in typed float
  fields; inside a free-form dict payload they stay strings;
- datetimes are ISO 8601 in UTC (``2026-11-28T12:00:00.123456Z``); a naive
  datetime is taken to be UTC;
- ``schema_version`` is checked before anything else is trusted: see
  docs/status-protocol.md, "Versioning".

Ages are computed from ``time.monotonic()`` values (CLOCK_MONOTONIC: one
system-wide clock on Linux, so a reader on the same host may subtract a writer's
value), never from wall time, which can jump.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from enum import Enum
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

SCHEMA_VERSION = 1

# Status names become file names; ranks are "trainer.rank1". No "/" or leading dot,
# so a name can neither escape the run dir nor collide with a writer's temp files.
NAME_RE = re.compile(r"[a-z][a-z0-9_.-]{0,127}")


def check_name(name: str) -> str:
    """Return `name` if it is a valid status name ([a-z][a-z0-9_.-]*), else raise ValueError."""
    if not isinstance(name, str) or NAME_RE.fullmatch(name) is None:
        raise ValueError(f"invalid status name {name!r}: must match [a-z][a-z0-9_.-]* (at most 128 chars)")
    return name


def to_utc(value: datetime) -> datetime:
    """`value` as an aware UTC datetime; a naive one is taken to be UTC already."""
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


UtcDatetime = Annotated[datetime, AfterValidator(to_utc)]


def utc_now() -> datetime:
    """The current wall time as an aware UTC datetime (the default wall clock)."""
    return datetime.now(timezone.utc)


class State(str, Enum):
    """Lifecycle of a process as it reports it."""

    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


_CONFIG = ConfigDict(ser_json_inf_nan="strings", extra="ignore", validate_assignment=False)


class PhaseStat(BaseModel):
    """Durations of one trainer phase so far (trainer.phases): what the watchdog's ``auto`` timeout learns from."""

    model_config = _CONFIG

    count: int = 0
    p50: float | None = None
    p99: float | None = None
    max: float | None = None


class TrainingStatus(BaseModel):
    """Payload for kind "trainer" (one per rank under torchrun)."""

    model_config = _CONFIG

    run_id: str
    step: int = 0
    epoch: int = 0
    total_steps: int | None = None
    loss: float | None = None
    val_loss: float | None = None
    lr: float | None = None
    samples_per_s: float | None = None
    eta_s: float | None = None
    device: str = "cpu"
    gpu_memory_bytes: int | None = None
    checkpoint_step: int | None = None
    rank: int = 0
    world_size: int = 1
    # Phases (trainer.phases): the current one, since when (time.monotonic(), like progress_mono), per-phase
    # duration stats, and the share of step time spent waiting for data over the last steps.
    phase: str | None = None
    phase_mono: float | None = None
    phases: dict[str, PhaseStat] = {}
    data_wait_fraction: float | None = None


class DashboardState(BaseModel):
    """Payload for kind "dashboard"."""

    model_config = _CONFIG

    sessions: int = 0
    last_refresh: UtcDatetime | None = None
    read_errors: dict[str, str] = {}


class WatchedProcess(BaseModel):
    """The watchdog's judgement of one watched process in its last poll (docs/watchdog.md, "What it publishes")."""

    model_config = _CONFIG

    health: str  # ok | starting | degraded | unhealthy | failed (gave up) | stopped (on purpose): keel.watch.verdicts
    rule: str  # the verdict's stable rule id (keel.watch.health)
    reason: str
    pid: int | None = None
    restarts_total: int = 0  # restarts (and starts of a FATAL process) the watchdog did, never reset
    last_action: str | None = None  # the last event about it other than "observed": restart, gave_up, deferred, ...
    last_action_reason: str | None = None
    last_action_at: UtcDatetime | None = None
    end: str | None = None  # how its last run ended: keel.watch.endings.End value (exited, crashed, oom_killed, ...)
    end_reason: str | None = None  # the same end in words ("crashed at step 12: ValueError: boom (exit code 1)")


class WatchdogStatus(BaseModel):
    """Payload for kind "watchdog": its own progress and, per watched process, its verdict (the one truth)."""

    model_config = _CONFIG

    processes_watched: list[str] = []
    last_poll: UtcDatetime | None = None
    actions_taken: int = 0
    poll_interval: float | None = None
    processes: dict[str, WatchedProcess] = {}


PAYLOAD_MODELS: dict[str, type[BaseModel]] = {
    "trainer": TrainingStatus,
    "dashboard": DashboardState,
    "watchdog": WatchdogStatus,
}

Payload = dict | TrainingStatus | DashboardState | WatchdogStatus | None


def payload_for(kind: str, value: Any) -> Payload:
    """Validate `value` as the payload of `kind` (a dict for unknown kinds); raises ValidationError."""
    if value is None:
        return None
    model = PAYLOAD_MODELS.get(kind)
    if model is None:
        if isinstance(value, BaseModel):
            return value.model_dump(mode="json")
        if not isinstance(value, dict):
            raise TypeError(f"payload of kind {kind!r} must be a dict, not {type(value).__name__}")
        return value
    if isinstance(value, model):
        return value
    if isinstance(value, BaseModel):
        value = value.model_dump()
    return model.model_validate(value)


class ProcessStatus(BaseModel):
    """The snapshot every process publishes in ``<name>.status.json``."""

    model_config = _CONFIG

    schema_version: int = Field(default=SCHEMA_VERSION, strict=True)  # "1" is not 1
    name: str
    kind: str
    host: str
    pid: int
    pid_start_time: float  # psutil.Process(pid).create_time(): tells a reused pid apart
    state: State
    seq: int = 0
    started_at: UtcDatetime
    heartbeat_wall: UtcDatetime
    heartbeat_mono: float  # time.monotonic() of the writer: CLOCK_MONOTONIC, comparable on one host
    progress_wall: UtcDatetime | None = None
    progress_mono: float | None = None
    last_error: str | None = None
    # The status channel degrades, never kills: failed status/metrics writes since start, and the last one's error.
    write_failures: int = 0
    last_write_error: str | None = None
    metrics_dropped: int = 0  # metrics records given up on (memory budget full while writes failed)
    gpus: list[int] = []
    payload: Payload = None

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(f"unknown schema_version {v} (this reader knows {SCHEMA_VERSION})")
        return v

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        return check_name(v)

    @field_validator("payload", mode="before")
    @classmethod
    def _payload_by_kind(cls, v: Any, info: Any) -> Any:
        kind = info.data.get("kind")
        if kind is None:  # kind itself failed validation; that error is reported
            return v
        return payload_for(kind, v)

    def heartbeat_age(self, now_mono: float) -> float:
        """Seconds since the last heartbeat, by the monotonic clock (`now_mono` = time.monotonic())."""
        return now_mono - self.heartbeat_mono

    def progress_age(self, now_mono: float) -> float | None:
        """Seconds since the last progress, by the monotonic clock; None if there was none yet."""
        if self.progress_mono is None:
            return None
        return now_mono - self.progress_mono


class StatusDecodeError(ValueError):
    """Bytes that are not a valid status snapshot. `.path` is the file, when known."""

    def __init__(self, detail: str, path: str | None = None) -> None:
        self.detail = detail
        self.path = path
        super().__init__(f"{path}: {detail}" if path else detail)


class UnknownVersionError(StatusDecodeError):
    """A snapshot whose schema_version this reader does not know. `.version` is what it said."""

    def __init__(self, version: Any, path: str | None = None) -> None:
        self.version = version
        super().__init__(f"unknown schema_version {version!r} (this reader knows {SCHEMA_VERSION})", path)


def encode_status(s: ProcessStatus) -> bytes:
    """Encode a snapshot as compact UTF-8 JSON (NaN/inf as strings, datetimes ISO 8601 UTC)."""
    return s.__pydantic_serializer__.to_json(s)


def decode_status(b: bytes, path: str | None = None) -> ProcessStatus:
    """Decode snapshot bytes; raises UnknownVersionError or StatusDecodeError (both ValueError)."""
    try:
        # The fast path: pydantic parses and validates in one pass in Rust. The field
        # has a default for constructors, but a file must state its version.
        if b'"schema_version"' not in b:
            raise ValueError("schema_version missing")
        return ProcessStatus.model_validate_json(b)
    except (ValidationError, ValueError) as exc:
        # Slow path, only for bad input: say why, version first (a newer writer is
        # not a corrupt file).
        try:
            raw = json.loads(b)
        except (ValueError, RecursionError):
            raise StatusDecodeError(f"not JSON: {_first_error(exc)}", path) from None
        if not isinstance(raw, dict):
            raise StatusDecodeError(f"not a JSON object but {type(raw).__name__}", path) from None
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            raise UnknownVersionError(version, path) from None
        raise StatusDecodeError(f"invalid snapshot: {_first_error(exc)}", path) from None


def _first_error(exc: Exception) -> str:
    if not isinstance(exc, ValidationError):
        return str(exc)
    errors = exc.errors(include_url=False)
    if not errors:
        return str(exc)
    e = errors[0]
    loc = ".".join(str(p) for p in e.get("loc", ())) or "(root)"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{loc}: {e.get('msg')}{more}"
