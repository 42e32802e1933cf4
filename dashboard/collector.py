"""The one reader per server process: polls the run dir and keeps a bounded history.

Every ``refresh`` seconds (the run dir's files also on a change: dashboard.watcher)
the collector runs its blocking reads (status scan,
metrics and events tails, resource sampling, log tails, its own status write)
through ``dashboard.aio.BlockingRunner``, off the event loop and with a timeout each.
A read that fails or hangs becomes an entry in ``errors`` (shown on the page);
the loop goes on. The results are applied on the event loop thread only, so the
browser sessions (same loop) read the histories without locks.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import time
from datetime import datetime, timezone
from typing import Any, Callable

from dashboard.aio import BlockingRunner, TaskSet
from keel.status.models import DashboardState, ProcessStatus, State
from keel.host.sampling import ResourceSample
from keel.status.results import ReadError, Stale

from dashboard import curves
from dashboard.config import DashboardConfig
from dashboard.frame_cache import FrameCache
from dashboard.history import FULL_RES_POINTS, History
from dashboard.rundir import METRICS_PER_CYCLE, RunDirReader
from dashboard.present import Verdict, error_label, event_line, overall, process_rows
from dashboard.watcher import Cycle, Pacer, RunDirWatch, RunDirWatcher, kept_errors, nothing, wait_any
from keel.watch.verdicts import BY_WATCHDOG, ProcessHealth, health_from_files

log = logging.getLogger("dashboard.collector")

METRIC_COLUMNS = ("step", "t", "loss", "val_loss", "lr", "samples_per_s", "grad_norm", curves.BEGIN)
# One series for everything sampled at the same instant: host, each process, each GPU.
# A browser session then gets one stream message per refresh for all resource plots,
# not one per process and GPU (each message costs the server a pass over the document).
RESOURCE_COLUMNS = ("t", "host_cpu", "host_mem_pct")
PROC_FIELDS = ("cpu", "rss_mb")
GPU_FIELDS = ("util", "mem_pct", "temp", "power")
EVENTS_KEPT = 200
STATS_EVERY_S = 30.0  # seconds between "refresh_stats" log lines (the bench reads them)


def proc_column(field: str, name: str) -> str:
    """The resources column of one process's ``field`` (a ``PROC_FIELDS`` member)."""
    return f"{field}:{name}"


def gpu_column(field: str, index: int) -> str:
    """The resources column of one GPU's ``field`` (a ``GPU_FIELDS`` member)."""
    return f"gpu_{field}:{index}"


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class Collector:
    """Polls the run dir every ``cfg.refresh`` seconds; sessions read its public attributes."""

    def __init__(
        self,
        cfg: DashboardConfig,
        *,
        reader: RunDirReader | None = None,
        reporter_factory: Callable[[], Any] | None = None,
        mono: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = _utc_now,
        use_inotify: bool = True,
    ) -> None:
        self.cfg = cfg
        self.reader = reader or RunDirReader(cfg)
        # Made (and started) inside the blocking runner: opening the run dir can fail or hang,
        # and that must show on the page rather than stop the server from starting.
        self._reporter_factory = reporter_factory
        self.reporter: Any | None = None
        self.runner = BlockingRunner(max_workers=4, thread_name_prefix="dashboard-read")
        self.tasks = TaskSet()
        self._mono, self._wall = mono, wall
        self._stop = asyncio.Event()
        self.host_name = socket.gethostname()
        n = cfg.history_points
        self.statuses: dict[str, ProcessStatus | ReadError] = {}
        self.metrics: dict[str, History] = {}
        self.resources = History(RESOURCE_COLUMNS, n)
        self.procs: list[str] = []  # processes with columns in ``resources``, first seen first
        self.gpus: dict[int, str] = {}  # GPU index -> name, for GPUs with columns in ``resources``
        self.gpu_error: str | None = None
        self.events: collections.deque[tuple[int, str]] = collections.deque(maxlen=EVENTS_KEPT)
        self._event_serial = 0
        # (serial, record) of the watchdog's events and the trainers' own event records (checkpoint, resume...,
        # tagged with their ``stream``): the markers on the curves (dashboard.curve_events)
        self.event_records: collections.deque[tuple[int, dict]] = collections.deque(maxlen=EVENTS_KEPT)
        # The runs archive and the newest incident, read off the loop when they change (dashboard.rundir);
        # a serial bumps on each change, so a session redraws its panel only then.
        self.runs: list[Any] = []
        self.runs_serial = 0
        self.incident: dict[str, Any] | None = None
        self.incident_serial = 0
        # Each stream's drawn curves (dashboard.curves.Frame) at a History serial: made once for all sessions.
        self.frames = FrameCache(mono)
        # A metrics file read only in part (a long history: METRICS_PER_CYCLE records a cycle): the next cycle
        # follows at once, not at the next write or refresh (a finished 1,000,000-step run took 50 s to load),
        # and the curves are made again less often meanwhile (dashboard.frame_cache).
        self.catching_up = False
        # Health is the watchdog's published verdict (keel.watch.verdicts), or judged here with the same rules
        # when it is not reporting (``watchdog_why`` says why): never counted or judged by rules of our own.
        self.health: dict[str, ProcessHealth] = {}
        self.watchdog_why: str = "not read yet"
        self.sample: ResourceSample | None = None
        self._runs: dict[str, tuple[int | None, float]] = {}  # process -> (pid, when first seen): startup grace
        self.logs: dict[str, list[str]] = {}
        self.errors: dict[str, str] = {}
        self.rows: dict[str, list] = {}
        self.verdicts: list[Verdict] = []
        self.overall: Verdict = Verdict("starting", 1)
        self.last_refresh_wall: datetime | None = None
        self.last_refresh_mono: float | None = None
        self.cycle_seconds: collections.deque[float] = collections.deque(maxlen=2000)
        self.session_seconds: collections.deque[float] = collections.deque(maxlen=20_000)  # each session update
        self.cycles = 0
        self.sessions = 0
        self.generation = 0  # bumps after every cycle; sessions skip work when unchanged
        self._new_errors: dict[str, str] = {}
        self._window: list[float] = []
        self._window_started = mono()
        # Text the page derives from one cycle (same for every session): computed once per
        # generation by the first session that needs it, not once per session.
        self.derived: dict[str, Any] = {}
        self._listeners: list[Callable[[], None]] = []
        self.watcher = RunDirWatcher(cfg.run_dir, cfg.name)  # the stat poll, where inotify cannot see
        self.use_inotify = use_inotify
        self.watch: RunDirWatch | None = None  # how the run dir's changes reach us (dashboard.watcher)

    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener`` (on the loop) after every cycle; returns the unsubscribe function."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def _notify(self) -> None:
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:  # noqa: BLE001 - one broken session must not stop the others
                log.exception("notifying a session failed")

    # ------------------------------------------------------------------ loop

    def start(self) -> None:
        """Start the polling task on the running loop (call once, from the server-loaded hook)."""
        self.tasks.spawn(self._run(), name="dashboard-collector")

    async def _run(self) -> None:
        # A change in the run dir wakes us (inotify, or a stat poll): the run dir is read then, everything every
        # refresh.
        pacer, wake = Pacer(self.cfg.refresh), asyncio.Event()
        self.watch = watch = RunDirWatch(self.watcher, asyncio.get_running_loop(), wake.set, self.use_inotify)
        log.info("watching the run dir %s by %s", self.cfg.run_dir, watch.how, extra={"event": "run_dir_watch"})
        try:
            while not self._stop.is_set():
                kind = pacer.due(now := self._mono(), wake.is_set())
                if kind is not None:
                    wake.clear()
                    pacer.ran(kind, now)
                    try:
                        await self.cycle(kind)
                    except Exception as exc:  # noqa: BLE001 - the loop never stops; the page shows why
                        log.exception("refresh cycle failed")
                        self.errors["collector"] = f"{type(exc).__name__}: {exc}"
                    if self.catching_up:
                        wake.set()
                await wait_any(wake, self._stop, pacer.until_full(self._mono()))
        finally:
            watch.stop()

    async def stop(self) -> None:
        """Stop polling, write state=stopped, release the reader."""
        self._stop.set()
        await self.tasks.close()
        if self.reporter is not None:
            await self._guard("own status", self.reporter.close)
        self.runner.close()
        try:
            self.reader.close()
        except Exception:  # noqa: BLE001
            log.exception("closing the reader failed")

    def _start_reporter(self) -> None:
        reporter = self._reporter_factory()
        reporter.start(DashboardState())
        reporter.set_state(State.RUNNING)
        self.reporter = reporter

    async def _guard(self, what: str, fn: Callable[..., Any], *args: Any, late: bool = False) -> Any:
        """Run a blocking call; on any failure record it under ``what`` and return None. ``late``: a
        call that timed out gives its result to the next one (BlockingRunner.run)."""
        try:
            result = await self.runner.run(fn, *args, timeout=self.cfg.read_timeout, what=what, late=late)
        except Exception as exc:  # noqa: BLE001 - BlockingTimeout, StillRunning, OSError, ...
            self._new_errors[what] = str(exc) if str(exc).startswith(what) else f"{what}: {exc}"
            return None
        return result

    async def cycle(self, kind: Cycle = Cycle.FULL) -> None:
        """One refresh: read everything, apply it, publish our own status (FILES: the run dir's files only)."""
        t0, full = time.perf_counter(), kind is not Cycle.FILES
        self._new_errors: dict[str, str] = kept_errors(self.errors, kind)
        was_catching_up, self.catching_up = self.catching_up, False  # set again below by a read with more to give
        statuses = await self._guard("status scan", self.reader.scan)
        if statuses is not None:
            self.statuses = statuses
        names = self._metric_names()
        pids = sorted({s.pid for s in self._live_statuses() if s.host == self.host_name})
        metrics, events, sample, logs, runs, incident = await asyncio.gather(
            # tails: a read that timed out has read past its records, so they come with the next cycle
            self._guard("metrics", self.reader.metrics, names, late=True),
            self._guard("events", self.reader.events, late=True),
            self._guard("resources", self.reader.sample, pids) if kind is Cycle.FULL else nothing(),
            self._guard("logs", self.reader.logs) if full else nothing(),
            self._guard("runs", self.reader.runs) if full else nothing(),
            self._guard("incidents", self.reader.incident),
        )
        now_mono, now_wall = self._mono(), self._wall()
        if metrics is not None:
            records, errs = metrics
            self._new_errors.update(errs)
            self._apply_metrics(records)
            self.catching_up = any(len(r) >= METRICS_PER_CYCLE for r in records.values())
            if was_catching_up and not self.catching_up:
                log.info("read the metrics history in: %s", ", ".join(
                    f"{n} {len(h):,} records" for n, h in sorted(self.metrics.items())), extra={"event": "caught_up"})
        if events is not None:
            self._apply_events(events)
        if sample is not None:
            self._apply_sample(sample, now_wall)
        if logs is not None:
            self.logs = logs
        if runs is not None:
            self.runs, self.runs_serial = runs[1], self.runs_serial + 1
        if incident is not None:
            self.incident, self.incident_serial = incident[1], self.incident_serial + 1
        for name, r in self.statuses.items():
            if isinstance(r, ReadError) and not isinstance(r, Stale):
                self._new_errors[f"status {name or 'run dir'}"] = f"{error_label(r)}: {r.detail}"
        self.errors = self._new_errors
        self._judge(now_mono)
        self.rows, self.verdicts = process_rows(self.cfg.processes, self.statuses, self.health, now_mono, now_wall,
                                                host=self.host_name)
        self.overall = overall(self.verdicts, self.errors)
        self.last_refresh_wall, self.last_refresh_mono = now_wall, now_mono
        self.cycles += 1
        self.generation += 1
        self.derived = {}
        self.cycle_seconds.append(time.perf_counter() - t0)
        self._window.append(time.perf_counter() - t0)
        if now_mono - self._window_started >= STATS_EVERY_S:
            self._log_stats()
            self._window, self._window_started = [], now_mono
        # A failure lands in self.errors (the same dict) and so on the page; a
        # reporter that could not start is retried next cycle.
        if full and self.reporter is None and self._reporter_factory is not None:
            await self._guard("own status", self._start_reporter)
        if full and self.reporter is not None:
            await self._guard("own status", self._report, now_wall, dict(self.errors))
        # Sessions update now rather than at their own timer's next tick: a new value reaches
        # the page right after the cycle that read it, and session work never lands mid-cycle.
        self._notify()

    def _log_stats(self) -> None:
        """One line with every cycle time of the window: cheap, and enough for exact percentiles."""
        ms = sorted(round(x * 1000, 2) for x in self._window)
        session_ms = sorted(round(x * 1000, 2) for x in self.session_seconds)  # the sessions' updates (page.py)
        self.session_seconds.clear()
        log.info(
            "refresh p50 %.1f ms, p95 %.1f ms over %d cycles", ms[len(ms) // 2], ms[max(0, int(len(ms) * 0.95) - 1)],
            len(ms), extra={"event": "refresh_stats", "cycle_ms": ms, "session_ms": session_ms,
                            "sessions": self.sessions, "errors": len(self.errors)},
        )

    def _report(self, now_wall: datetime, errors: dict[str, str]) -> bool:
        self.reporter.progress(sessions=self.sessions, last_refresh=now_wall, read_errors=errors)
        return True

    # ------------------------------------------------------------ applying

    def _live_statuses(self) -> list[ProcessStatus]:
        out = []
        for r in self.statuses.values():
            s = r.status if isinstance(r, Stale) else r
            if isinstance(s, ProcessStatus):
                out.append(s)
        return out

    def _metric_names(self) -> list[str]:
        names = {s.name for s in self._live_statuses() if s.kind == "trainer"}
        for p in self.cfg.processes:
            if p.kind == "trainer":
                names.update(p.status_names)
        return sorted(names)

    def _apply_metrics(self, records: dict[str, list[dict]]) -> None:
        for name, recs in records.items():
            if not recs:
                continue
            h = self.metrics.get(name)
            if h is None:
                h = self.metrics[name] = History(METRIC_COLUMNS, FULL_RES_POINTS)
            h.extend(curves.tag_begins(recs))
            for rec in recs:
                if "event" in rec:  # the trainer's own events (checkpoint, new run...): markers on its curves
                    self._event_serial += 1
                    self.event_records.append((self._event_serial, {**rec, "stream": name}))

    def _apply_events(self, events: list[dict]) -> None:
        for rec in events:
            self._event_serial += 1
            self.events.append((self._event_serial, event_line(rec)))
            self.event_records.append((self._event_serial, rec))

    def _apply_sample(self, sample: ResourceSample, now_wall: datetime) -> None:
        """One row of ``resources``: a process or GPU absent from this sample gets NaN (a gap)."""
        host = sample.host
        row: dict[str, float | None] = {
            "t": now_wall.timestamp() * 1000.0,  # Bokeh datetime axes are in ms since the epoch
            "host_cpu": host.cpu_percent,
            "host_mem_pct": 100.0 * host.mem_used / host.mem_total if host.mem_total else None,
        }
        self.sample = sample
        for s in self._live_statuses():
            p = sample.processes.get(s.pid)
            if p is None or not p.alive or s.host != self.host_name:
                continue
            if s.name not in self.procs:
                self.procs.append(s.name)
                for field in PROC_FIELDS:
                    self.resources.add_column(proc_column(field, s.name))
            row[proc_column("cpu", s.name)] = p.cpu_percent
            row[proc_column("rss_mb", s.name)] = p.rss_bytes / 2**20
        self.gpu_error = sample.gpu_error
        for g in sample.gpus:
            if g.index not in self.gpus:
                for field in GPU_FIELDS:
                    self.resources.add_column(gpu_column(field, g.index))
            self.gpus[g.index] = g.name
            row[gpu_column("util", g.index)] = g.util_percent
            row[gpu_column("mem_pct", g.index)] = 100.0 * g.memory_used / g.memory_total if g.memory_total else None
            row[gpu_column("temp", g.index)] = g.temperature_c
            row[gpu_column("power", g.index)] = g.power_w
        self.resources.append(row)

    def _judge(self, now_mono: float) -> None:
        """Every keel.json process's health (keel.watch.verdicts). A status file of no process in keel.json is
        not judged: it has no health or limits to judge it by (dashboard.present shows it as unknown)."""
        if self.sample is None:
            return
        procs = {p.name: p.entry for p in self.cfg.processes}
        for name, p in procs.items():  # a new pid (or none) is a new run: its startup grace starts now
            first = next((s for s in map(self.statuses.get, p.status_names) if isinstance(s, ProcessStatus)), None)
            pid = first.pid if first is not None else None
            if self._runs.get(name, (-1, 0.0))[0] != pid:
                self._runs[name] = (pid, now_mono)
        since = {name: t if pid is not None else None for name, (pid, t) in self._runs.items()}
        self.health, why = health_from_files(procs, self.statuses, self.sample, now_mono, since)
        self.watchdog_why = "" if why == BY_WATCHDOG else why

    # -------------------------------------------------------------- queries

    def frame(self, stream: str, make: Callable[[], Any]) -> tuple[int, Any]:
        """The drawn curves of ``stream`` and the History serial they are at (dashboard.frame_cache)."""
        return self.frames.get(stream, self.metrics[stream].last_serial, make, catching_up=self.catching_up)

    @property
    def events_serial(self) -> int:
        """The serial of the newest event record (watchdog or trainer): sessions redraw markers when it moves."""
        return self._event_serial

    def events_since(self, serial: int) -> list[tuple[int, str]]:
        """Events newer than ``serial`` (the deque is short; a scan is fine)."""
        return [e for e in self.events if e[0] > serial]

    def refresh_age(self) -> float | None:
        """Seconds since the last completed cycle."""
        if self.last_refresh_mono is None:
            return None
        return self._mono() - self.last_refresh_mono

