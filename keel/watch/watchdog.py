"""The watchdog: each poll, read statuses, sample resources, judge, and act through the backend.

The process around it (arguments, signals, the poll grid) is ``keel.watch.main``.

One poll (``Watchdog.poll_once``):

1. the backend's view of this stack's processes (supervisord/systemd state and pid);
2. every status file of every watched process (``StatusReader``);
3. one resource sample of all those pids (``ResourceSampler``: process trees, NVML);
4. the pure rules of ``keel.watch.health`` → one verdict per process;
5. for an unhealthy process, the ``RestartBudget`` decides: restart now, wait
   (backoff), or give up (stop it, mark it failed, alert);
6. every decision and action is a line in ``watchdog.events.jsonl``; the budget
   state goes to ``watchdog.state.json`` (``keel.watch.state``: so a killed
   watchdog resumes with it), the metrics to ``keel.prom``, and per process the
   verdict, ``restarts_total`` and the last action to the watchdog's own status
   (``status_fields``; ``keel.watch.publish``), which ``bin/status`` and the page read.

What it leaves alone: processes the backend is (re)starting itself (STARTING,
BACKOFF), processes stopped on purpose, processes of other projects (the backend
only knows keel.json's names), itself, and any pid whose start time differs from
the one in the status (a reused pid is never signalled).

Time is the injected monotonic ``clock``; wall time only labels events.
"""

from __future__ import annotations

import logging
import random
import time
from datetime import datetime, timezone
from typing import Any, Callable

from keel.watch.alerts import AlertHook, AlertResult
from keel.watch.budget import BudgetSettings, Decision, RestartBudget
from keel.control.base import ControlBackend, ControlError, ProcessInfo, retrying
from keel.watch.health import Context, HealthVerdict, Level
from keel.status.models import ProcessStatus, WatchedProcess
from keel.watch.prom import ProcessRow
from keel.watch.publish import process_entry, prom_rows, write_prom_file
from keel.host.disk import status_channel_blocked
from keel.render.contract import StackFile, StackProcess
from keel.host.sampling import ResourceSample, ResourceSampler
from keel.status.jsonl import JsonlWriter
from keel.status.reader import StatusReader
from keel.watch.settings import WatchdogSettings
from keel.status.paths import EVENTS_FILE
from keel.watch.state import STATE_FILE, LastAction, Watched, load_state, state_data, write_state
from keel.watch.verdicts import judge
from keel.watch.training_rules import PollCounters
from keel.watch.end_evidence import track
from keel.watch.recorder import IncidentRecorder
from keel.watch import actions

__all__ = ["EVENTS_FILE", "STATE_FILE", "Watchdog", "WatchdogSettings"]

log = logging.getLogger("keel.watchdog")


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Watchdog:
    """The poll loop's logic. Every dependency is injected: tests pass a fake clock, backend and sampler."""

    def __init__(
        self,
        stack: StackFile,
        settings: WatchdogSettings,
        *,
        backend: ControlBackend,
        sampler: ResourceSampler | Any,
        reader: StatusReader | None = None,
        alerts: AlertHook | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        control_retries: int = 3,
        control_sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.stack = stack
        self.settings = settings
        self.backend = backend
        self.sampler = sampler
        self.reader = reader or StatusReader(settings.run_dir)
        self.clock = clock
        self.wall = wall
        self.rng = rng or random.Random()
        self.events = JsonlWriter(settings.run_dir / EVENTS_FILE)
        self.alerts = alerts or AlertHook(settings.alert_command, settings.alert_timeout, on_result=self._alert_done)
        self.state_path = settings.run_dir / STATE_FILE
        self.actions_taken = 0
        self._control_retries = control_retries
        self._control_sleep = control_sleep
        self._backend_error: str | None = None
        self._blocked: str | None = None  # keel.host.disk.status_channel_blocked, once per poll
        self._saved: dict | None = None
        self.last_sample: ResourceSample | None = None
        self._prom_at: float | None = None
        self._prom_actions = 0
        self.watched: dict[str, Watched] = {}
        self.training_polls = PollCounters()  # data_starved/gpu_idle: polls in a row (keel.watch.training_rules)
        self.set_stack(stack)
        self.recorder = IncidentRecorder.for_watchdog(self)  # incident bundles before a restart/give-up
        self._load_state()

    def set_stack(self, stack: StackFile, backend: ControlBackend | None = None) -> None:
        """Take a (re-rendered) keel.json: new processes are watched, removed ones dropped, the rest keep their budget."""
        self.stack = stack
        if backend is not None:
            self.backend = backend
        watched: dict[str, Watched] = {}
        for name, cfg in stack.processes.items():
            if cfg.kind == "watchdog":
                continue  # it cannot restart itself; supervisord/systemd does that
            budget_settings = self._budget_settings(cfg)
            old = self.watched.get(name)
            if old is not None:
                old.config = cfg
                old.budget.settings = budget_settings
                watched[name] = old
            else:
                watched[name] = Watched(name, cfg, RestartBudget(budget_settings, self.rng))
        self.watched = watched

    def _budget_settings(self, cfg: StackProcess) -> BudgetSettings:
        """The process's ``restart`` block as resolve wrote it, with the watchdog's own ``stable_after``/``jitter``."""
        r = cfg.restart
        return BudgetSettings(backoff_initial=r.backoff_initial, backoff_max=r.backoff_max, max_restarts=r.max_restarts,
                              window=r.window, stable_after=self.settings.stable_after,
                              jitter=self.settings.jitter)  # type: ignore[arg-type]

    # -- persistence

    def _load_state(self) -> None:
        try:
            resumed = load_state(self.state_path, self.watched, self.rng)
        except (OSError, ValueError, AttributeError) as exc:
            self.emit(process=None, action="state_unreadable", reason=f"{self.state_path}: {exc}; starting afresh")
            return
        if resumed is not None:
            self.emit(process=None, action="state_resumed", reason=resumed)

    def _save_state(self) -> None:
        data = state_data(self.watched)
        if data == self._saved:
            return
        try:
            write_state(self.state_path, data)
            self._saved = data
        except OSError as exc:
            log.error("cannot save watchdog state", extra={"event": "state_write_failed", "error": str(exc)})

    # -- events

    def emit(self, *, process: str | None, action: str, reason: str, verdict: HealthVerdict | None = None,
             attempt: int | None = None, next_allowed_in: float | None = None, **extra: Any) -> dict:
        """Append one decision or action to watchdog.events.jsonl (and the log). Never raises."""
        event = {
            "ts": _iso(self.wall()),
            "mono": round(self.clock(), 3),
            "process": process,
            "rule": verdict.rule if verdict else None,
            "verdict": verdict.level.value if verdict else None,
            "action": action,
            "attempt": attempt,
            "next_allowed_in": None if next_allowed_in is None else round(next_allowed_in, 3),
            "reason": reason,
            **extra,
        }
        w = self.watched.get(process) if process is not None else None
        if w is not None and action != "observed":
            w.last_action = LastAction(action, reason, self.wall())
            # persisted before announced: a watchdog SIGKILLed after this event resumes with the budget it
            # reports (else its successor counts the same restart again as attempt 1)
            self._save_state()
        try:
            self.events.append(event)
        except (OSError, TypeError) as exc:
            log.error("cannot write event", extra={"event": "event_write_failed", "error": str(exc)})
        log.info("%s %s: %s", action, process or "-", reason, extra={"event": f"watchdog_{action}", "process_name": process})
        return event

    def _alert_done(self, alert: dict, result: AlertResult) -> None:
        self.emit(process=alert.get("process"), action="alert_sent" if result["rc"] == 0 else "alert_failed",
                  reason=result["error"] or f"alert command exited {result['rc']}", rc=result["rc"],
                  timed_out=result["timed_out"])

    # -- control

    def _control(self, op: Callable[[], Any]) -> Any:
        return retrying(op, attempts=self._control_retries, sleep=self._control_sleep)

    # -- one poll

    def poll_once(self) -> None:
        """Read, sample, judge, act, record. Never raises for a process or backend failure."""
        infos: dict[str, ProcessInfo] | None
        try:
            infos = self._control(self.backend.status)
            if self._backend_error is not None:
                self.emit(process=None, action="backend_ok", reason="control backend reachable again")
            self._backend_error = None
        except ControlError as exc:
            infos = None
            if str(exc) != self._backend_error:  # once per distinct error, not every poll
                self.emit(process=None, action="backend_error", reason=str(exc))
            self._backend_error = str(exc)

        for w in self.watched.values():
            w.statuses = [self.reader.read(s) for s in w.config.status_names]
        pids: list[int] = []
        for name, w in self.watched.items():
            info = (infos or {}).get(name)
            if info is not None and info.pid:
                pids.append(info.pid)
            pids.extend(s.pid for s in w.statuses if isinstance(s, ProcessStatus))
        sample = self.sampler.sample(pids)
        self.last_sample = sample
        self._blocked = status_channel_blocked(self.settings.run_dir)
        now = self.clock()

        for name, w in self.watched.items():
            try:
                self._judge_and_act(w, (infos or {}).get(name) if infos is not None else None,
                                    infos is not None, sample, now)
            except Exception as exc:  # noqa: BLE001 - one process's surprise must not stop the others' watch
                log.exception("watchdog error for %s", name)
                self.emit(process=name, action="internal_error", reason=f"{type(exc).__name__}: {exc}")
        self._save_state()

    def _judge_and_act(self, w: Watched, info: ProcessInfo | None, backend_ok: bool,
                       sample: ResourceSample, now: float) -> None:
        backend_state = info.state if info is not None else None
        backend_pid = info.pid if info is not None and info.state == "RUNNING" else None
        current = backend_pid or next((s.pid for s in w.statuses if isinstance(s, ProcessStatus)), None)
        if backend_state not in (None, "RUNNING"):
            current = None
        w.pid = current
        window = w.budget.settings.window
        if backend_pid is not None and backend_pid != w.backend_pid:
            if w.backend_pid is not None and not w.own_restart:
                w.backend_restarts.append(now)  # supervisord's autorestart: a crash after startsecs
            w.own_restart = False
            w.backend_pid = backend_pid
        w.backend_restarts = [t for t in w.backend_restarts if now - t < window]
        if current != w.incarnation and w.incarnation is not None and actions.run_ended(self, w, info, now):
            return  # keel.watch.actions.run_ended: the run's end classified; the same crash again made it give up
        track(w.run, current, sample)
        if current != w.incarnation:  # a new run (or none): fresh grace, fresh counters
            w.incarnation, w.running_since = current, (now if current is not None else None)
            w.rss_over = w.gpu_over = 0

        ctx = Context(backend_state, backend_pid, w.running_since, w.rss_over, w.gpu_over,
                      self.settings.rss_consecutive_polls, len(w.backend_restarts), w.budget.settings.max_restarts,
                      status_channel_blocked=self._blocked, training_polls=self.training_polls.counts(w.name, current))
        v, verdicts = judge(w.statuses, sample, w.config, now, ctx)
        self.training_polls.update(w.name, current, w.statuses, sample, w.config)
        w.verdict = v
        self.recorder.settle(w.name, v.rule)
        w.rss_over = w.rss_over + 1 if any(x.rule == "rss_over_limit" for x in verdicts) else 0
        w.gpu_over = w.gpu_over + 1 if any(x.rule == "gpu_memory_over_limit" for x in verdicts) else 0

        if (v.level.value, v.rule) != w.last_key:
            w.last_key = (v.level.value, v.rule)
            self.emit(process=w.name, action="observed", reason=v.reason, verdict=v, pid=current)

        budget = w.budget
        if budget.gave_up:
            if backend_state == "RUNNING" and backend_pid is not None and backend_pid != w.gave_up_pid:
                budget.reset()
                w.gave_up_pid = None
                w.backend_restarts.clear()
                self.emit(process=w.name, action="resumed", reason="started again by an operator; budget reset",
                          verdict=v, pid=backend_pid)
            else:
                return
        if v.level is Level.OK:
            if budget.record_healthy(now):
                self.emit(process=w.name, action="budget_reset",
                          reason=f"healthy for {budget.settings.stable_after:g}s; restart budget restored", verdict=v)
            return
        budget.record_unhealthy()
        if v.level is not Level.UNHEALTHY:
            return
        if not backend_ok:
            return  # backend_error already recorded; nothing can be done
        if w.config.restart.policy == "never":
            if w.deferred_attempt != -1:
                w.deferred_attempt = -1
                self.emit(process=w.name, action="none", reason="restart policy is never", verdict=v)
            return

        if v.rule == "crash_loop" and backend_state != "FATAL":
            # The backend keeps restarting it; one more restart from us cannot help.
            self._give_up(w, v, info, len(w.backend_restarts), now)
            return
        d = budget.check(now)
        if d.decision is Decision.WAIT:
            if w.deferred_attempt != d.attempt:
                w.deferred_attempt = d.attempt
                self.emit(process=w.name, action="deferred", reason=f"backoff: {v.reason}", verdict=v,
                          attempt=d.attempt, next_allowed_in=d.next_allowed_in)
            return
        if self.recorder.hold(w, v, sample, "give_up" if d.decision is Decision.GIVE_UP else "restart"):
            return  # an incident is being captured: act on a later poll, when it is written or its deadline passed
        if d.decision is Decision.GIVE_UP:
            self._give_up(w, v, info, d.restarts_in_window, now)
            return
        self._restart(w, v, info, sample, d.attempt, now)

    def _restart(self, w: Watched, v: HealthVerdict, info: ProcessInfo | None, sample: ResourceSample,
                 attempt: int, now: float) -> None:
        actions.restart(self, w, v, info, sample, attempt, now)

    def _give_up(self, w: Watched, v: HealthVerdict, info: ProcessInfo | None, restarts: int, now: float,
                 why: str | None = None) -> None:
        actions.give_up(self, w, v, info, restarts, now, why)

    # -- reporting

    def prom_rows(self) -> list[ProcessRow]:
        """One metrics row per watched process, from the last poll."""
        return prom_rows(self.watched, self.last_sample, self.clock())

    def published(self) -> dict[str, WatchedProcess]:
        """Per watched process: the verdict, restarts_total and the last action (keel.watch.publish)."""
        return {name: process_entry(w) for name, w in self.watched.items()}

    def status_fields(self) -> dict[str, Any]:
        """The WatchdogStatus fields to publish after each poll (``keel.watch.main`` passes them to its reporter)."""
        return {"actions_taken": self.actions_taken, "poll_interval": self.settings.poll_interval,
                "processes_watched": sorted(self.watched), "processes": self.published()}

    def write_prom(self, *, force: bool = False) -> None:
        """Rewrite keel.prom, at most every ``prometheus_interval`` unless an action was just taken (or ``force``)."""
        if self.settings.prometheus_textfile is None:
            return
        now = self.clock()
        if not force and self.actions_taken == self._prom_actions and \
                self._prom_at is not None and now - self._prom_at < self.settings.prometheus_interval:
            return
        self._prom_at, self._prom_actions = now, self.actions_taken
        write_prom_file(self.settings.prometheus_textfile, self.prom_rows(), self.last_sample, self.wall())

    def close(self) -> None:
        self.alerts.close(timeout=1.0)
        self.events.close()

