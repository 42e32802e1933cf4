"""How a run of a watched process ended: one pure classifier, read everywhere.

The watchdog notices a run's end (its pid is no longer the backend's running one,
or the watchdog itself restarts or stops it), gathers what is known
(``keel.watch.end_evidence``) and calls ``classify`` once. The ``EndState`` it
returns is the one truth: the ``ended`` event, the published ``WatchedProcess``
(``end``/``end_reason``, so ``bin/status`` and the page), and keel.prom's
``keel_process_last_exit{reason=...}`` all carry its ``reason`` id and ``summary``
words. Order of evidence, strongest first:

1. what the watchdog did itself (gave up; restarted for a hung or frozen verdict; a run whose own status
   said failed, restarted by the watchdog before the backend noticed its exit, still "crashed");
2. the backend says STOPPED/STOPPING without a watchdog action: an operator;
3. the process's own exit record (``keel.status.exits``): exception and step, the
   stop signal it obeyed (SIGTERM from outside the stack: preempted), or a clean end;
4. the signal that killed it (backend): SIGKILL plus a cgroup OOM kill, or an RSS
   near ``limits.memory``, is an OOM kill; SIGTERM is a preemption;
5. the exit code; the last status's ``last_error``.

Anything else is "unknown", said so, never guessed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum

__all__ = ["END_REASONS", "End", "EndEvidence", "EndState", "RSS_NEAR_LIMIT", "classify"]

# "Near" the limit: the kernel kills at the cgroup limit; the last sample is up to a poll old.
RSS_NEAR_LIMIT = 0.9


class End(str, Enum):
    EXITED = "exited"  # exited cleanly (exit code 0, no stop signal)
    CRASHED = "crashed"  # non-zero exit or an exception
    KILLED = "killed"  # killed by a signal from outside
    OOM_KILLED = "oom_killed"
    STOPPED = "stopped"  # stopped by an operator through the backend
    PREEMPTED = "preempted"  # SIGTERM from outside the stack
    HUNG = "hung"  # killed by the watchdog: progress stale
    FROZEN = "frozen"  # killed by the watchdog: heartbeat stale
    RESTARTED = "restarted"  # killed by the watchdog for another verdict (over a limit, NaN loss, ...)
    GAVE_UP = "gave_up"  # the watchdog stopped it for good
    UNKNOWN = "unknown"


END_REASONS = tuple(e.value for e in End)  # keel_process_last_exit's reason label values
_STOP_SIGNALS = ("SIGTERM", "SIGINT")


@dataclass(frozen=True)
class EndEvidence:
    """Everything known about one run's end (all optional: a backend or process may not say)."""

    pid: int | None = None
    backend_state: str | None = None  # the backend's state when the end was noticed
    # the backend's own record says it stopped the run itself (keel.control.base.BackendExit.stopped): what
    # still tells an operator's stop once the backend runs the next run (a stack brought down and up again)
    backend_stopped: bool = False
    exit_code: int | None = None  # the backend's (or the record's) exit code; None: unknown or a signal
    signal: str | None = None  # "SIGKILL": the signal that killed it, as the backend reports it
    step: int | None = None  # from the process's exit record
    exception: str | None = None  # "Type: message" from the exit record
    traceback: str | None = None
    stop_signal: str | None = None  # the stop signal the process itself obeyed (exit record)
    has_record: bool = False  # the process wrote its own exit record
    last_error: str | None = None  # the last status's last_error (same pid)
    watchdog_action: str | None = None  # "restart" | "gave_up" when the watchdog ended it
    watchdog_rule: str | None = None
    watchdog_reason: str | None = None
    oom_kills: int | None = None  # cgroup memory.events oom_kill increase during the run; None: not exposed
    rss_bytes: int | None = None  # the run's last sampled RSS (whole tree)
    memory_limit: int | None = None  # limits.memory_bytes


@dataclass(frozen=True)
class EndState:
    """One run's end: ``reason`` (an ``End`` value: stable, a metric label) and ``summary`` (the words shown)."""

    reason: str
    summary: str
    pid: int | None = None
    exit_code: int | None = None
    signal: str | None = None
    exception: str | None = None
    step: int | None = None
    traceback: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EndState:
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in fields})


def _at(step: int | None) -> str:
    return "" if step is None else f" at step {step}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def classify(ev: EndEvidence) -> EndState:
    """The end state for ``ev``. Pure."""
    def end(reason: End, summary: str) -> EndState:
        return EndState(reason.value, summary, ev.pid, ev.exit_code, ev.signal, ev.exception, ev.step, ev.traceback)

    if ev.watchdog_action == "gave_up":
        return end(End.GAVE_UP, f"gave up: {ev.watchdog_reason or 'restart budget spent'}")
    if ev.watchdog_action == "restart" and ev.watchdog_rule == "state_failed" and (ev.exception or ev.last_error):
        # It failed by itself (its status said so before it exited); the watchdog's restart only followed.
        code = f" (exit code {ev.exit_code})" if ev.exit_code is not None else ""
        return end(End.CRASHED, f"crashed{_at(ev.step)}: {ev.exception or ev.last_error}{code}")
    if ev.watchdog_action == "restart":
        why = ev.watchdog_reason or ev.watchdog_rule or "unhealthy"
        if ev.watchdog_rule == "progress_stale":
            return end(End.HUNG, f"hung: killed by the watchdog ({why})")
        if ev.watchdog_rule == "heartbeat_stale":
            return end(End.FROZEN, f"frozen: killed by the watchdog ({why})")
        return end(End.RESTARTED, f"restarted by the watchdog ({why})")
    if ev.backend_state in ("STOPPED", "STOPPING") or ev.backend_stopped:
        return end(End.STOPPED, f"stopped by an operator{_at(ev.step)}")
    if ev.exception is not None:
        code = f" (exit code {ev.exit_code})" if ev.exit_code is not None else ""
        return end(End.CRASHED, f"crashed{_at(ev.step)}: {ev.exception}{code}")
    if ev.has_record and ev.stop_signal in _STOP_SIGNALS:
        return end(End.PREEMPTED, f"preempted: {ev.stop_signal} from outside the stack{_at(ev.step)}")
    if ev.signal is not None:
        if ev.signal == "SIGKILL" and ev.oom_kills:
            return end(End.OOM_KILLED, f"OOM-killed (cgroup memory.events oom_kill +{ev.oom_kills})")
        if ev.signal == "SIGKILL" and ev.rss_bytes is not None and ev.memory_limit \
                and ev.rss_bytes >= RSS_NEAR_LIMIT * ev.memory_limit:
            return end(End.OOM_KILLED, f"killed by SIGKILL, RSS near limit ({_mib(ev.rss_bytes)} of "
                                       f"{_mib(ev.memory_limit)})")
        if ev.signal in _STOP_SIGNALS:
            return end(End.PREEMPTED, f"preempted: {ev.signal} from outside the stack")
        return end(End.KILLED, f"killed by {ev.signal}")
    if ev.exit_code == 0:
        return end(End.EXITED, f"exited cleanly{_at(ev.step)}")
    if ev.exit_code is not None:
        detail = f": {ev.last_error}" if ev.last_error else ""
        return end(End.CRASHED, f"crashed: exit code {ev.exit_code}{detail}")
    if ev.last_error:
        return end(End.CRASHED, f"crashed: {ev.last_error}")
    return end(End.UNKNOWN, "ended: cause unknown (the backend gave no exit status)")
