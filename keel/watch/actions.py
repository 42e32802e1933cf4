"""What the watchdog does to a process: restart it (SIGCONT first if frozen), or give up on it.

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
from keel.watch.end_evidence import end_run, give_up_if_same_crash
from keel.watch.health import HealthVerdict, Identity, identity
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
    error = None
    try:
        wd._control(lambda: wd.backend.stop(w.name))
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
