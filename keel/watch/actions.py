"""What the watchdog does to a process: restart it (SIGCONT first if frozen), give up on it, and record
how each run ended (``end_run``: classified by keel.watch.endings from keel.watch.end_evidence).

The decisions are made in ``keel.watch.watchdog``; these functions carry them out through the
backend, record them (events, the budget, the run's end) and never raise for a backend failure.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

from keel.control.base import ControlError, ProcessInfo
from keel.host.sampling import ResourceSample
from keel.status.models import ProcessStatus, State
from keel.status.snapshot import StatusWriter
from keel.watch.end_evidence import evidence
from keel.watch.endings import EndState, classify
from keel.watch.health import HealthVerdict, Identity, Level, identity
from keel.watch.state import Watched

if TYPE_CHECKING:
    from keel.watch.watchdog import Watchdog


def restart(wd: "Watchdog", w: Watched, v: HealthVerdict, info: ProcessInfo | None, sample: ResourceSample,
            attempt: int, now: float) -> None:
    fatal = info is not None and info.state == "FATAL"
    action = "start" if fatal else "restart"
    if v.rule == "heartbeat_stale" and info is not None and info.pid:
        continue_first(wd, w, info.pid, sample)
    error = None
    try:
        wd._control(lambda: (wd.backend.start if fatal else wd.backend.restart)(w.name))
    except ControlError as exc:
        error = str(exc)
    delay = w.budget.record_restart(now)  # a failed attempt counts too: never hammer a broken backend
    w.own_restart = True
    wd.actions_taken += 1
    if w.incarnation is not None:
        end_run(wd, w, info, action="restart", rule=v.rule, reason=v.reason)
    w.incarnation = w.running_since = None
    w.rss_over = w.gpu_over = 0
    w.deferred_attempt = None
    w.last_key = None  # report the next verdict, whatever it is
    wd.emit(process=w.name, action=action if error is None else f"{action}_failed",
            reason=v.reason if error is None else f"{v.reason}; control error: {error}",
            verdict=v, attempt=attempt, next_allowed_in=delay, pid=info.pid if info else None,
            **wd.recorder.event_fields(w.name))
    give_up_if_same_crash(wd, w, info, now)  # keel.watch.crashes: a crash it restarted may be the same again


def continue_first(wd: "Watchdog", w: Watched, pid: int, sample: ResourceSample) -> None:
    """A SIGSTOPped process cannot handle SIGTERM: SIGCONT it first so it can stop cleanly.

    Only when the backend's pid is the pid that wrote the status, with the same
    start time, so a reused pid is never signalled.
    """
    own = [s for s in w.statuses if isinstance(s, ProcessStatus) and s.pid == pid]
    if not own or identity(own[0], sample) is not Identity.CURRENT:
        return
    try:
        wd._control(lambda: wd.backend.signal(w.name, signal.SIGCONT))
        wd.emit(process=w.name, action="signal", reason="SIGCONT before restart (frozen process)", pid=pid)
    except ControlError as exc:
        wd.emit(process=w.name, action="signal_failed", reason=str(exc), pid=pid)


def give_up(wd: "Watchdog", w: Watched, v: HealthVerdict, info: ProcessInfo | None, restarts: int, now: float,
            why: str | None = None) -> None:
    """Stop it for good, mark it failed, publish and alert.

    The stop is asked for, not waited for: a trainer that ignores SIGTERM (a torchrun agent) takes its
    whole stop timeout before the backend's SIGKILL, and a watchdog waiting that out would neither
    judge the other processes nor obey its own SIGTERM (a `bin/launch down` would SIGKILL it, and the
    event and alert with it). The polls that follow see it STOPPING, then STOPPED, and leave it alone."""
    error = None
    try:
        wd._control(lambda: wd.backend.stop(w.name, wait=False))
    except ControlError as exc:
        error = str(exc)
    w.budget.record_give_up()
    w.gave_up_pid = info.pid if info is not None else None
    wd.actions_taken += 1
    mark_failed(wd, w, v)
    reason = (f"{restarts} restarts within {w.budget.settings.window:g}s (max {w.budget.settings.max_restarts}): "
              f"stopped and marked failed; last verdict: {v.reason}") if why is None else f"{why}: stopped and marked failed"
    end_run(wd, w, info, action="gave_up", rule=v.rule, reason=reason)
    w.incarnation = w.running_since = None  # its end is "gave up", not the operator stop the backend shows next
    if error:
        reason += f"; stop failed: {error}"
    event = wd.emit(process=w.name, action="gave_up", reason=reason, verdict=v, attempt=restarts + 1,
                    next_allowed_in=None, alert=True, **wd.recorder.event_fields(w.name))
    wd.alerts.send(event)


def mark_failed(wd: "Watchdog", w: Watched, v: HealthVerdict) -> None:
    """Best effort: the process's own status says failed (the dashboard shows it). Missing status: nothing to mark."""
    for name in w.config.status_names:
        writer = StatusWriter(wd.settings.run_dir, name, lock_timeout=1.0)
        try:
            writer.update(state=State.FAILED, last_error=f"watchdog gave up: {v.reason}")
        except (OSError, ValueError):
            pass
        finally:
            writer.close()


def end_run(wd: "Watchdog", w: Watched, info: ProcessInfo | None, *, action: str | None = None, rule: str | None = None,
            reason: str | None = None) -> EndState:
    """Classify the end of ``w``'s tracked run (``w.incarnation``), publish it (event ``ended``) and remember it."""
    ev = evidence(name=w.name, pid=w.incarnation, info=info, backend=wd.backend, run_dir=wd.settings.run_dir,
                  status_names=w.config.status_names, statuses=w.statuses, run=w.run,
                  memory_limit=w.config.limits.memory_bytes, watchdog_action=action, watchdog_rule=rule,
                  watchdog_reason=reason)
    end = classify(ev)
    w.end = end
    w.crashes.record(end, wd.settings.same_crash)
    wd.emit(process=w.name, action="ended", reason=end.summary, end=end.reason, pid=end.pid,
            exit_code=end.exit_code, signal=end.signal, exception=end.exception, step=end.step)
    return end


def run_ended(wd: "Watchdog", w: Watched, info: ProcessInfo | None, now: float) -> bool:
    """The tracked run is gone (not by the watchdog's hand): classify it; True when that made the watchdog
    give up (the same crash after ``same_crash.resumes`` resumes: keel.watch.crashes)."""
    end_run(wd, w, info)
    return give_up_if_same_crash(wd, w, info, now)


def give_up_if_same_crash(wd: "Watchdog", w: Watched, info: ProcessInfo | None, now: float) -> bool:
    """Give up (stop, mark failed, alert) when the last runs crashed the same way; True if it did.

    Also called after the watchdog's own restart of a run that reported state=failed before the
    backend noticed its exit: the crash is the same, whoever restarted it."""
    why = w.crashes.same_crash(wd.settings.same_crash)
    if why is None or w.budget.gave_up or w.config.restart.policy == "never":
        return False
    verdict = HealthVerdict(Level.UNHEALTHY, why, "same_crash")
    w.verdict = verdict
    give_up(wd, w, verdict, info, len(w.budget.restarts), now, why)
    return True
