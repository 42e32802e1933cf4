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
   state goes to ``watchdog.state.json`` (so a killed watchdog resumes with it),
   the metrics to ``keel.prom``, and the watchdog's own heartbeat to its status.

What it leaves alone: processes the backend is (re)starting itself (STARTING,
BACKOFF), processes stopped on purpose, processes of other projects (the backend
only knows keel.json's names), itself, and any pid whose start time differs from
the one in the status (a reused pid is never signalled).

Time is the injected monotonic ``clock``; wall time only labels events.
"""

from __future__ import annotations

import json
import logging
import random
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from keel.watch.alerts import AlertHook, AlertResult
from keel.fs.atomic import atomic_write_text
from keel.watch.budget import BudgetSettings, Decision, RestartBudget
from keel.control.backends import ControlBackend, ControlError, ProcessInfo, retrying
from keel.watch.health import Context, HealthVerdict, Identity, Level, evaluate, identity, worst
from keel.status.models import ProcessStatus, State
from keel.watch.prom import GpuRow, ProcessRow, write_textfile
from keel.host.resources import ResourceSample, ResourceSampler
from keel.status.files import JsonlWriter, ReadError, StatusReader, StatusWriter
from keel.watch.settings import WatchdogSettings

__all__ = ["Watchdog", "WatchdogSettings"]

log = logging.getLogger("keel.watchdog")

EVENTS_FILE = "watchdog.events.jsonl"
STATE_FILE = "watchdog.state.json"
STATE_FORMAT = 1


@dataclass
class Watched:
    """What the watchdog remembers about one process between polls."""

    name: str
    config: dict
    budget: RestartBudget
    incarnation: int | None = None  # the pid whose run `running_since` dates
    pid: int | None = None  # the pid judged in the last poll (kept after a restart, for metrics)
    running_since: float | None = None
    rss_over: int = 0
    gpu_over: int = 0
    gave_up_pid: int | None = None
    backend_pid: int | None = None  # the last pid seen RUNNING under the backend
    backend_restarts: list[float] = field(default_factory=list)  # when the backend restarted it by itself
    own_restart: bool = False  # the next new pid is ours, not the backend's autorestart
    last_key: tuple[str, str] | None = None
    deferred_attempt: int | None = None
    verdict: HealthVerdict | None = None
    statuses: list[ProcessStatus | ReadError] = field(default_factory=list)


def boot_id() -> str:
    """This boot's id: monotonic times saved under another boot are meaningless."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def atomic_write_json(path: Path, data: dict) -> None:
    """Replace `path` atomically (keel.render.writer: temp file in the same dir, fsync, os.replace)."""
    atomic_write_text(path, json.dumps(data, sort_keys=True), 0o640)


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Watchdog:
    """The poll loop's logic. Every dependency is injected: tests pass a fake clock, backend and sampler."""

    def __init__(
        self,
        stack: dict,
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
        self._saved: dict | None = None
        self.last_sample: ResourceSample | None = None
        self._prom_at: float | None = None
        self._prom_actions = 0
        self.watched: dict[str, Watched] = {}
        self.set_stack(stack)
        self._load_state()

    def set_stack(self, stack: dict, backend: ControlBackend | None = None) -> None:
        """Take a (re-rendered) keel.json: new processes are watched, removed ones dropped, the rest keep their budget."""
        self.stack = stack
        if backend is not None:
            self.backend = backend
        watched: dict[str, Watched] = {}
        for name, cfg in stack.get("processes", {}).items():
            if cfg.get("kind") == "watchdog":
                continue  # it cannot restart itself; supervisord/systemd does that
            budget_settings = BudgetSettings.from_config(cfg.get("restart", {}), self.settings.stable_after,
                                                         self.settings.jitter)  # type: ignore[arg-type]
            old = self.watched.get(name)
            if old is not None:
                old.config = cfg
                old.budget.settings = budget_settings
                watched[name] = old
            else:
                watched[name] = Watched(name, cfg, RestartBudget(budget_settings, self.rng))
        self.watched = watched

    # -- persistence

    def _load_state(self) -> None:
        try:
            data = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            self.emit(process=None, action="state_unreadable", reason=f"{self.state_path}: {exc}; starting afresh")
            return
        if data.get("format_version") != STATE_FORMAT:
            return
        same_boot = data.get("boot_id") == boot_id()
        for name, saved in data.get("processes", {}).items():
            w = self.watched.get(name)
            if w is None:
                continue
            w.budget = RestartBudget.from_dict(saved.get("budget", {}), w.budget.settings, self.rng, times_valid=same_boot)
            w.gave_up_pid = saved.get("gave_up_pid")
            if same_boot:
                w.incarnation = saved.get("incarnation")
                w.running_since = saved.get("running_since")
        self.emit(process=None, action="state_resumed",
                  reason=f"budget state restored from {self.state_path}" + ("" if same_boot else " (new boot: times dropped)"))

    def _save_state(self) -> None:
        data = {
            "format_version": STATE_FORMAT,
            "boot_id": boot_id(),
            "processes": {
                name: {
                    "budget": w.budget.to_dict(),
                    "gave_up_pid": w.gave_up_pid,
                    "incarnation": w.incarnation,
                    "running_since": w.running_since,
                }
                for name, w in self.watched.items()
            },
        }
        if data == self._saved:
            return
        try:
            atomic_write_json(self.state_path, data)
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
            w.statuses = [self.reader.read(s) for s in w.config.get("status_names") or [w.name]]
        pids: list[int] = []
        for name, w in self.watched.items():
            info = (infos or {}).get(name)
            if info is not None and info.pid:
                pids.append(info.pid)
            pids.extend(s.pid for s in w.statuses if isinstance(s, ProcessStatus))
        sample = self.sampler.sample(pids)
        self.last_sample = sample
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
        if current != w.incarnation:  # a new run (or none): fresh grace, fresh counters
            w.incarnation, w.running_since = current, (now if current is not None else None)
            w.rss_over = w.gpu_over = 0

        ctx = Context(backend_state, backend_pid, w.running_since, w.rss_over, w.gpu_over,
                      self.settings.rss_consecutive_polls, len(w.backend_restarts), w.budget.settings.max_restarts)
        verdicts: list[HealthVerdict] = []
        for status in w.statuses:
            verdicts.extend(evaluate(status, sample, w.config, now, ctx))
        v = worst(verdicts)
        w.verdict = v
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
        if w.config.get("restart", {}).get("policy") == "never":
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
        if d.decision is Decision.GIVE_UP:
            self._give_up(w, v, info, d.restarts_in_window, now)
            return
        self._restart(w, v, info, sample, d.attempt, now)

    def _restart(self, w: Watched, v: HealthVerdict, info: ProcessInfo | None, sample: ResourceSample,
                 attempt: int, now: float) -> None:
        fatal = info is not None and info.state == "FATAL"
        action = "start" if fatal else "restart"
        if v.rule == "heartbeat_stale" and info is not None and info.pid:
            self._continue_first(w, info.pid, sample)
        error = None
        try:
            self._control(lambda: (self.backend.start if fatal else self.backend.restart)(w.name))
        except ControlError as exc:
            error = str(exc)
        delay = w.budget.record_restart(now)  # a failed attempt counts too: never hammer a broken backend
        w.own_restart = True
        self.actions_taken += 1
        w.incarnation = w.running_since = None
        w.rss_over = w.gpu_over = 0
        w.deferred_attempt = None
        w.last_key = None  # report the next verdict, whatever it is
        self.emit(process=w.name, action=action if error is None else f"{action}_failed",
                  reason=v.reason if error is None else f"{v.reason}; control error: {error}",
                  verdict=v, attempt=attempt, next_allowed_in=delay, pid=info.pid if info else None)

    def _continue_first(self, w: Watched, pid: int, sample: ResourceSample) -> None:
        """A SIGSTOPped process cannot handle SIGTERM: SIGCONT it first so it can stop cleanly.

        Only when the backend's pid is the pid that wrote the status, with the same
        start time, so a reused pid is never signalled.
        """
        own = [s for s in w.statuses if isinstance(s, ProcessStatus) and s.pid == pid]
        if not own or identity(own[0], sample) is not Identity.CURRENT:
            return
        try:
            self._control(lambda: self.backend.signal(w.name, signal.SIGCONT))
            self.emit(process=w.name, action="signal", reason="SIGCONT before restart (frozen process)", pid=pid)
        except ControlError as exc:
            self.emit(process=w.name, action="signal_failed", reason=str(exc), pid=pid)

    def _give_up(self, w: Watched, v: HealthVerdict, info: ProcessInfo | None, restarts: int, now: float) -> None:
        error = None
        try:
            self._control(lambda: self.backend.stop(w.name))
        except ControlError as exc:
            error = str(exc)
        w.budget.record_give_up()
        w.gave_up_pid = info.pid if info is not None else None
        self.actions_taken += 1
        self._mark_failed(w, v)
        reason = (f"{restarts} restarts within {w.budget.settings.window:g}s (max {w.budget.settings.max_restarts}): "
                  f"stopped and marked failed; last verdict: {v.reason}")
        if error:
            reason += f"; stop failed: {error}"
        event = self.emit(process=w.name, action="gave_up", reason=reason, verdict=v, attempt=restarts + 1,
                          next_allowed_in=None, alert=True)
        self.alerts.send(event)

    def _mark_failed(self, w: Watched, v: HealthVerdict) -> None:
        """Best effort: the process's own status says failed (the dashboard shows it). Missing status: nothing to mark."""
        for name in w.config.get("status_names") or [w.name]:
            writer = StatusWriter(self.settings.run_dir, name, lock_timeout=1.0)
            try:
                writer.update(state=State.FAILED, last_error=f"watchdog gave up: {v.reason}")
            except (OSError, ValueError):
                pass
            finally:
                writer.close()

    # -- reporting

    def prom_rows(self) -> list[ProcessRow]:
        """One metrics row per watched process, from the last poll."""
        now = self.clock()
        sample = self.last_sample
        rows = []
        for name, w in self.watched.items():
            status = next((s for s in w.statuses if isinstance(s, ProcessStatus)), None)
            tree = sample.processes.get(w.pid) if sample and w.pid else None
            health = "failed" if w.budget.gave_up else (w.verdict.level.value if w.verdict else "starting")
            payload = status.payload if status else None
            get = (payload.get if isinstance(payload, dict) else (lambda k: getattr(payload, k, None)))
            rows.append(ProcessRow(
                process=name,
                kind=str(w.config.get("kind", "command")),
                up=bool(tree and tree.alive),
                state=status.state.value if status else "unknown",
                health=health,
                heartbeat_age=status.heartbeat_age(now) if status else None,
                progress_age=status.progress_age(now) if status else None,
                restarts_total=w.budget.restarts_total,
                rss_bytes=tree.rss_bytes if tree else None,
                cpu_percent=tree.cpu_percent if tree else None,
                gpu_memory_bytes=tree.gpu_memory_bytes if tree else None,
                step=_num(get("step")) if payload is not None else None,
                loss=_num(get("loss")) if payload is not None else None,
            ))
        return rows

    def write_prom(self, *, force: bool = False) -> None:
        """Rewrite keel.prom, at most every ``prometheus_interval`` unless an action was just taken (or ``force``)."""
        if self.settings.prometheus_textfile is None:
            return
        now = self.clock()
        if not force and self.actions_taken == self._prom_actions and \
                self._prom_at is not None and now - self._prom_at < self.settings.prometheus_interval:
            return
        self._prom_at, self._prom_actions = now, self.actions_taken
        sample = self.last_sample
        gpus = [GpuRow(g.index, g.name, g.memory_used, g.memory_total, g.util_percent, g.temperature_c)
                for g in (sample.gpus if sample else [])]
        try:
            write_textfile(self.settings.prometheus_textfile, self.prom_rows(), gpus, last_poll=self.wall(),
                           gpu_metrics=bool(sample and sample.gpu_error is None))
        except OSError as exc:
            log.error("cannot write %s", self.settings.prometheus_textfile, extra={"event": "prom_write_failed",
                                                                                   "error": str(exc)})

    def close(self) -> None:
        self.alerts.close(timeout=1.0)
        self.events.close()


def _num(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        return {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}.get(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None

