"""One process's health as every reader shows it: the watchdog's published verdict, or an honest local one.

The watchdog judges each watched process with ``keel.watch.health`` and publishes
the verdict, its restart count and its last action in its own status payload
(``WatchdogStatus.processes``). ``bin/status``, the dashboard and ``keel.prom``
show exactly that. Only when the watchdog is not reporting (no status, stopped,
frozen, its last poll too old) or does not watch the process (itself) does a
reader judge locally, with the same rules (``judge``), and say so in
``judged_by``; the restart count is then unknown (None), never guessed.

Pure: statuses, samples and payloads in, values out.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from typing import Iterable

from keel.host.sampling import ResourceSample
from keel.render.contract import StackProcess
from keel.status.results import Missing, ReadError, Stale
from keel.status.models import ProcessStatus, State, WatchdogStatus, WatchedProcess
from keel.watch.health import Context, HealthVerdict, Level, evaluate, worst

__all__ = [
    "BY_WATCHDOG", "HEALTH_WORDS", "ProcessHealth", "health_for", "health_from_files", "health_word", "judge",
    "local_health", "run_start",
    "published_health",
    "watchdog_report",
]

# Every word a reader may show, worst last but one; "stopped" is a process stopped on purpose (not watched).
HEALTH_WORDS = ("ok", "starting", "degraded", "unhealthy", "failed", "stopped")
BY_WATCHDOG = "watchdog"


def health_word(verdict: HealthVerdict, gave_up: bool = False) -> str:
    """The one word for a verdict: "failed" once the watchdog gave up, "stopped" when not running on purpose."""
    if gave_up:
        return "failed"
    if verdict.rule == "not_running":
        return "stopped"
    return verdict.level.value


def judge(
    statuses: Iterable[ProcessStatus | ReadError], sample: ResourceSample, process: StackProcess, now_mono: float,
    ctx: Context,
) -> tuple[HealthVerdict, list[HealthVerdict]]:
    """The worst verdict over all status files of one process (every torchrun rank), and all of them."""
    verdicts = [v for s in statuses for v in evaluate(s, sample, process, now_mono, ctx)]
    return worst(verdicts), verdicts


@dataclass(frozen=True)
class ProcessHealth:
    """What a reader shows for one process. ``restarts_total`` None: not known (no watchdog report)."""

    health: str  # a HEALTH_WORDS member
    rule: str
    reason: str
    judged_by: str  # "watchdog", or "local: <why the watchdog's verdict is not used>"
    restarts_total: int | None = None
    last_action: str | None = None
    last_action_reason: str | None = None
    last_action_at: datetime | None = None
    end: str | None = None  # how its last run ended (keel.watch.endings), as the watchdog published it
    end_reason: str | None = None

    @property
    def by_watchdog(self) -> bool:
        return self.judged_by == BY_WATCHDOG


def published_health(entry: WatchedProcess) -> ProcessHealth:
    return ProcessHealth(entry.health, entry.rule, entry.reason, BY_WATCHDOG, entry.restarts_total,
                         entry.last_action, entry.last_action_reason, entry.last_action_at,
                         end=entry.end, end_reason=entry.end_reason)


def local_health(verdict: HealthVerdict, why: str) -> ProcessHealth:
    """A reader's own verdict (same rules), labelled with why the watchdog's is not used."""
    return ProcessHealth(health_word(verdict), verdict.rule, verdict.reason, f"local: {why}")


def watchdog_report(
    result: ProcessStatus | ReadError | None, sample: ResourceSample, watchdog: StackProcess | None, now_mono: float
) -> tuple[WatchdogStatus | None, str]:
    """The watchdog's payload if it is reporting now, else None; and a phrase saying which.

    Reporting means: its status is its own current process's (pid and start time,
    so ``sample`` must hold its pid), state running, and ``keel.watch.health``
    finds it healthy with its own keel.json entry (heartbeat within
    heartbeat_timeout, last poll, its progress, within progress_timeout).
    """
    status = result.status if isinstance(result, Stale) and result.status is not None else result
    if status is None or watchdog is None:
        return None, "watchdog not reporting: no watchdog in this stack"
    if isinstance(status, ReadError):
        return None, f"watchdog not reporting: its status is {type(status).__name__.lower()} ({status.detail})"
    if status.state is not State.RUNNING or not isinstance(status.payload, WatchdogStatus):
        return None, f"watchdog not reporting: it is {status.state.value}"
    # Its own run, judged without startup grace: the status says when it last polled.
    verdict = worst(evaluate(status, sample, watchdog, now_mono, Context(running_since=float("-inf"))))
    if verdict.level is Level.UNHEALTHY:
        return None, f"watchdog not reporting: {verdict.reason}"
    if status.payload.last_poll is None:
        return None, "watchdog not reporting: no poll yet"
    return status.payload, BY_WATCHDOG


def health_for(
    name: str, report: WatchdogStatus | None, why: str, verdict: HealthVerdict, watched: bool = True,
    run_started: datetime | None = None,
) -> ProcessHealth:
    """The watchdog's published health for ``name`` when it reports it, else ``verdict`` labelled honestly.

    ``run_started``: when the process's current run began, as the reader sees it (its status's
    ``started_at``, or the backend's start time). A run that began after the watchdog's last poll
    has not been judged yet: its verdict is the previous run's (a restarted trainer would read "ok"
    before it resumed). It is then judged locally until the next poll; the counts stay the watchdog's.
    """
    if not watched:
        return local_health(verdict, "not watched by the watchdog")
    entry = report.processes.get(name) if report is not None else None
    if entry is None:
        return local_health(verdict, why if report is None else "watchdog not reporting: it has not judged it yet")
    if run_started is not None and report.last_poll is not None and run_started > report.last_poll:
        local = local_health(verdict, "the watchdog has not judged this run yet")
        return dataclasses.replace(local, restarts_total=entry.restarts_total, last_action=entry.last_action,
                                   last_action_reason=entry.last_action_reason, last_action_at=entry.last_action_at)
    return published_health(entry)


def run_start(statuses: Iterable[ProcessStatus | ReadError], backend_started: datetime | None = None) -> datetime | None:
    """When the current run began as a reader sees it: the latest status start (any rank) or backend start."""
    starts = [s.started_at for s in statuses if isinstance(s, ProcessStatus)]
    if backend_started is not None:
        starts.append(backend_started)
    return max(starts, default=None)


def health_from_files(
    processes: dict[str, StackProcess],
    statuses: dict[str, ProcessStatus | ReadError],
    sample: ResourceSample,
    now_mono: float,
    running_since: dict[str, float | None],
) -> tuple[dict[str, ProcessHealth], str]:
    """Per process of ``processes`` (keel.json's typed entries), its health, for a reader that sees only the
    run dir (the dashboard): the watchdog's published verdict, else a local one (no backend state;
    ``running_since`` per process: when the reader first saw its current run).

    Returns the healths and whether the watchdog reports (``BY_WATCHDOG``) or why not.
    """
    def files(p: StackProcess) -> list[ProcessStatus | ReadError]:
        found = [statuses.get(s) for s in p.status_names]  # a ReadError is falsy: compare with None
        return [Missing(s, "no status file yet") if r is None else r for s, r in zip(p.status_names, found)]

    wd = next((p for p in processes.values() if p.kind == "watchdog"), None)
    report, why = watchdog_report(files(wd)[0] if wd else None, sample, wd, now_mono)
    out = {}
    for name, p in processes.items():
        found = files(p)
        verdict, _ = judge(found, sample, p, now_mono, Context(running_since=running_since.get(name)))
        out[name] = health_for(name, report, why, verdict, watched=p.kind != "watchdog", run_started=run_start(found))
    return out, why
