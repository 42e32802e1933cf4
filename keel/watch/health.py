"""Pure health rules: (status or read error, resource sample, process config, now) -> HealthVerdict.

Nothing here reads a file, a clock or a process: the watchdog gathers those and
passes them in, so every verdict can be replayed in a unit test with made-up
numbers. ``now_mono`` and every time in a ``ProcessStatus`` are CLOCK_MONOTONIC
seconds, so a wall-clock jump cannot change a verdict.

``evaluate`` applies the rules in order of trust:

1. what the backend says (supervisord/systemd is (re)starting it: ``starting``,
   never acted on, so the watchdog does not fight the backend's own restarts;
   FATAL: ``crash_loop``; stopped on purpose: not watched);
2. whether the status belongs to the running process (pid gone; pid reused, i.e.
   alive but with another start time; a status left by the previous run);
3. the status itself (state=failed, heartbeat stale, progress stale after
   ``startup_grace``, NaN/inf loss) and the resources (RSS over
   ``limits.memory_bytes``, GPU memory over ``limits.gpu_memory_bytes``, each
   for ``consecutive`` polls in a row).

The config is a process entry of ``keel.json`` as the contract types it
(``keel.render.contract.StackProcess``: ``health``, ``limits``); every field is read
as resolve wrote it, with no default here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping

from keel.render.contract import Health, Limits, StackProcess
from keel.status.models import ProcessStatus, State, TrainingStatus
from keel.watch.phases import stuck_phase
from keel.watch.training_rules import verdict_texts
from keel.host.sampling import ProcessSample, ResourceSample
from keel.status.results import ReadError, Stale

__all__ = [
    "Context",
    "HealthVerdict",
    "Identity",
    "Level",
    "evaluate",
    "identity",
    "worst",
]

# psutil derives create_time from boot time + clock ticks; two readings of one process agree to well under this.
START_TIME_TOLERANCE = 0.05


class Level(str, Enum):
    OK = "ok"
    STARTING = "starting"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"


_SEVERITY = {Level.OK: 0, Level.STARTING: 1, Level.DEGRADED: 2, Level.UNHEALTHY: 3}


@dataclass(frozen=True)
class HealthVerdict:
    """One rule's judgement. ``rule`` is a stable identifier (events, metrics, tests); ``reason`` is for people."""

    level: Level
    reason: str
    rule: str

    @property
    def severity(self) -> int:
        return _SEVERITY[self.level]


@dataclass(frozen=True)
class Context:
    """What the watchdog knows beyond one status and one sample.

    backend_state/backend_pid: from the control backend (supervisord vocabulary).
    running_since: monotonic time the watchdog first saw this run (this backend pid)
    as running; the reference for ``startup_grace``.
    rss_over_polls/gpu_over_polls: consecutive *previous* polls over the limit.
    consecutive: how many polls in a row over a limit make it unhealthy.
    """

    backend_state: str | None = None
    backend_pid: int | None = None
    running_since: float | None = None
    rss_over_polls: int = 0
    gpu_over_polls: int = 0
    consecutive: int = 3
    backend_restarts: int = 0  # runs the backend itself started (autorestart) within the restart window
    max_backend_restarts: int | None = None  # more than this: a crash loop the backend never gives up on
    # Why no status write can succeed now (keel.host.disk: run dir full or read-only), or None. Then a stale
    # heartbeat or progress is no evidence of a hang: the writer degrades and keeps working.
    status_channel_blocked: str | None = None
    # data_starved/gpu_idle: consecutive previous polls each held (keel.watch.training_rules.PollCounters).
    training_polls: Mapping[str, int] = field(default_factory=dict)


class Identity(str, Enum):
    CURRENT = "current"  # the status's pid runs and has the recorded start time
    GONE = "gone"  # no such process (or a zombie)
    REUSED = "reused"  # the pid runs, but it is another process: never signal it


def identity(status: ProcessStatus, sample: ResourceSample) -> Identity:
    """Whether ``status.pid`` is still the process that wrote the status (needs status.pid in the sample)."""
    ps = sample.processes.get(status.pid)
    if ps is None or not ps.alive or ps.create_time is None:
        return Identity.GONE
    if abs(ps.create_time - status.pid_start_time) > START_TIME_TOLERANCE:
        return Identity.REUSED
    return Identity.CURRENT


def worst(verdicts: list[HealthVerdict]) -> HealthVerdict:
    """The most severe verdict (the first of equals: rules are listed by priority)."""
    if not verdicts:
        return HealthVerdict(Level.OK, "healthy", "ok")
    return max(verdicts, key=lambda v: v.severity)  # max() keeps the first of equal keys


def _in_grace(ctx: Context, health: Health, now_mono: float) -> bool:
    return ctx.running_since is None or now_mono - ctx.running_since < health.startup_grace


def _is_bad_number(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    # A free-form dict payload keeps JSON's spellings of non-finite numbers as strings.
    return isinstance(value, str) and value in ("NaN", "Infinity", "-Infinity")


def _payload_loss(status: ProcessStatus) -> Any:
    payload = status.payload
    if payload is None:
        return None
    if isinstance(payload, dict):
        return payload.get("loss")
    return getattr(payload, "loss", None)


# --------------------------------------------------------------------------- rules on the backend's view


def backend_rule(ctx: Context) -> HealthVerdict | None:
    """supervisord/systemd's own state, when it settles the question."""
    state = ctx.backend_state
    if ctx.max_backend_restarts is not None and ctx.backend_restarts > ctx.max_backend_restarts:
        return HealthVerdict(
            Level.UNHEALTHY,
            f"restarted {ctx.backend_restarts} times by the backend (max {ctx.max_backend_restarts}): crash loop",
            "crash_loop",
        )
    if state in ("STARTING", "BACKOFF"):
        return HealthVerdict(Level.STARTING, f"the backend is (re)starting it ({state})", "backend_starting")
    if state == "FATAL":
        return HealthVerdict(Level.UNHEALTHY, "the backend gave up starting it (FATAL): crash loop", "crash_loop")
    if state in ("STOPPED", "EXITED", "STOPPING"):
        return HealthVerdict(Level.OK, f"not running ({state}); not watched", "not_running")
    return None


# --------------------------------------------------------------------------- rules on a missing or foreign status


def missing_rule(error: ReadError, health: Health, now_mono: float, ctx: Context) -> HealthVerdict:
    """No usable status: fine during startup_grace, unhealthy after it."""
    what = f"{type(error).__name__.lower()} status ({error.detail})"
    if _in_grace(ctx, health, now_mono):
        return HealthVerdict(Level.STARTING, f"{what}; within startup grace", "status_missing")
    return HealthVerdict(Level.UNHEALTHY, f"{what} after startup grace", "status_missing")


def foreign_status_rule(
    status: ProcessStatus, who: Identity, health: Health, now_mono: float, ctx: Context
) -> HealthVerdict:
    """The status's pid is gone or reused: the status is from a run that ended."""
    rule = "pid_reused" if who is Identity.REUSED else "pid_gone"
    detail = (
        f"pid {status.pid} now belongs to another process (start time differs)"
        if who is Identity.REUSED
        else f"pid {status.pid} is gone"
    )
    if status.state in (State.STOPPED, State.FAILED) and ctx.backend_state is None:
        return HealthVerdict(Level.OK, f"{detail}; it reported {status.state.value}", "not_running")
    if who is Identity.GONE and ctx.backend_pid == status.pid:
        # It exited and the backend has not reaped it yet (its own restart follows): do not race it.
        return HealthVerdict(Level.STARTING, f"{detail}; the backend has not noticed the exit yet", rule)
    if ctx.backend_pid is not None and ctx.backend_pid != status.pid and _in_grace(ctx, health, now_mono):
        return HealthVerdict(Level.STARTING, f"{detail}; new run (pid {ctx.backend_pid}) not reported yet", rule)
    return HealthVerdict(Level.UNHEALTHY, detail, rule)


# --------------------------------------------------------------------------- rules on a current status


def state_rule(status: ProcessStatus) -> HealthVerdict | None:
    if status.state is State.FAILED:
        return HealthVerdict(Level.UNHEALTHY, f"reported state=failed: {status.last_error or 'no error given'}", "state_failed")
    if status.state is State.STARTING:
        return HealthVerdict(Level.STARTING, "reported state=starting", "state_starting")
    return None


def heartbeat_rule(status: ProcessStatus, health: Health, now_mono: float) -> HealthVerdict | None:
    """Heartbeat older than heartbeat_timeout: the process is not scheduled (SIGSTOP, D state, GIL deadlock)."""
    timeout = health.heartbeat_timeout
    age = status.heartbeat_age(now_mono)
    if age > timeout:
        return HealthVerdict(Level.UNHEALTHY, f"heartbeat {age:.1f}s old > {timeout:g}s: frozen", "heartbeat_stale")
    return None


def progress_rule(status: ProcessStatus, health: Health, now_mono: float, ctx: Context) -> HealthVerdict | None:
    """Progress older than progress_timeout (after startup_grace): the work loop hangs while the heartbeat runs."""
    timeout = health.progress_timeout
    if _in_grace(ctx, health, now_mono):
        return None
    if status.state in (State.STOPPING, State.STOPPED):
        return None
    if timeout == "auto":  # per phase (keel.watch.phases); the longest ceiling stays the backstop on progress
        payload = status.payload
        stuck = stuck_phase(payload, health.auto, now_mono) if isinstance(payload, TrainingStatus) else None
        if stuck is not None:
            return HealthVerdict(Level.UNHEALTHY, stuck.reason, "progress_stale")
        timeout = max([health.auto.ceiling, *health.auto.ceilings.values()])
    age = status.progress_age(now_mono)
    if age is None and status.kind != "trainer":
        return None  # a dashboard or plain command that never reports progress is judged by its heartbeat only
    if age is None:
        assert ctx.running_since is not None  # _in_grace is True without it
        age = now_mono - ctx.running_since
        if age > timeout:
            return HealthVerdict(Level.UNHEALTHY, f"no progress in {age:.1f}s since start > {timeout:g}s: hung", "progress_stale")
        return None
    if age > timeout:
        return HealthVerdict(Level.UNHEALTHY, f"progress {age:.1f}s old > {timeout:g}s: hung", "progress_stale")
    return None


def nan_rule(status: ProcessStatus) -> HealthVerdict | None:
    loss = _payload_loss(status)
    if loss is not None and _is_bad_number(loss):
        return HealthVerdict(Level.UNHEALTHY, f"loss is {loss}", "nan_loss")
    return None


def _over_limit(
    value: int | None, limit: int | None, previous: int, consecutive: int, what: str, rule: str
) -> HealthVerdict | None:
    if value is None or limit is None or value <= limit:
        return None
    count = previous + 1
    text = f"{what} {value / 2**20:.0f} MiB > limit {limit / 2**20:.0f} MiB ({count}/{consecutive} polls)"
    return HealthVerdict(Level.UNHEALTHY if count >= consecutive else Level.DEGRADED, text, rule)


def rss_rule(tree: ProcessSample | None, limits: Limits, ctx: Context) -> HealthVerdict | None:
    """RSS of the whole process tree over limits.memory_bytes, ``ctx.consecutive`` polls in a row."""
    if tree is None or not tree.alive:
        return None
    return _over_limit(tree.rss_bytes, limits.memory_bytes, ctx.rss_over_polls, ctx.consecutive, "RSS", "rss_over_limit")


def gpu_memory_rule(tree: ProcessSample | None, limits: Limits, ctx: Context) -> HealthVerdict | None:
    """GPU memory of the process tree (NVML per-pid) over limits.gpu_memory_bytes; no GPU metrics: no verdict."""
    if tree is None or not tree.alive:
        return None
    return _over_limit(
        tree.gpu_memory_bytes, limits.gpu_memory_bytes, ctx.gpu_over_polls, ctx.consecutive,
        "GPU memory", "gpu_memory_over_limit",
    )


# --------------------------------------------------------------------------- all together


def evaluate(
    status: ProcessStatus | ReadError,
    sample: ResourceSample,
    process: StackProcess,
    now_mono: float,
    ctx: Context = Context(),
) -> list[HealthVerdict]:
    """Every verdict that applies, in priority order (use ``worst`` for the one to act on).

    ``process`` is the judged process's keel.json entry (its ``health`` and ``limits``).

    ``sample`` must contain the status's pid and, when known, the backend's pid
    (the root of the process tree whose RSS and GPU memory are judged).
    """
    settled = backend_rule(ctx)
    if settled is not None:
        return [settled]

    health, limits = process.health, process.limits
    if isinstance(status, Stale) and status.status is not None:
        status = status.status  # the reader's own staleness is ours to judge, with our timeout
    if isinstance(status, ReadError):
        return [missing_rule(status, health, now_mono, ctx)]

    who = identity(status, sample)
    if who is not Identity.CURRENT:
        return [foreign_status_rule(status, who, health, now_mono, ctx)]

    root = ctx.backend_pid if ctx.backend_pid in sample.processes else status.pid
    tree = sample.processes.get(root)
    verdicts = [
        v
        for v in (
            state_rule(status),
            heartbeat_rule(status, health, now_mono),
            progress_rule(status, health, now_mono, ctx),
            nan_rule(status),
            rss_rule(tree, limits, ctx),
            gpu_memory_rule(tree, limits, ctx),
        )
        if v is not None
    ]
    # Warnings only (data_starved, gpu_idle): never a restart.
    verdicts += [HealthVerdict(Level.DEGRADED, reason, rule)
                 for rule, reason in verdict_texts(status, sample, health, ctx.training_polls)]
    if ctx.status_channel_blocked:
        verdicts = [_unjudgeable(v, ctx.status_channel_blocked) for v in verdicts]
    return verdicts or [HealthVerdict(Level.OK, "healthy", "ok")]


# Rules that read the age of what the process wrote: meaningless while it cannot write.
_AGE_RULES = ("heartbeat_stale", "progress_stale")


def _unjudgeable(v: HealthVerdict, why: str) -> HealthVerdict:
    if v.rule not in _AGE_RULES:
        return v
    return HealthVerdict(Level.DEGRADED, f"{v.reason}, but {why}: status writes are failing, not the process",
                         "status_channel_blocked")
