"""keel.prom: the watchdog's view as Prometheus metrics, for node_exporter's textfile collector.

Written each poll with prometheus_client's ``write_to_textfile`` (temp file in
the same directory, then rename: a scraper never reads half a file). A fresh
registry per write, fed by one collector over plain rows, so a process removed
from the stack disappears from the file instead of lingering as a stale series.

Names follow Prometheus conventions: base units in the name (``_seconds``,
``_bytes``, ``_ratio``, ``_celsius``), ``_total`` only on counters. Labels are
few and bounded (no run ids, no pids): ``host`` on every series (this machine's
name, so alerts name it whatever the scrape config does), and on every
per-process series ``process``, ``kind`` and ``rank``. ``rank`` is the global
torchrun rank of a distributed trainer (world size > 1) on the per-rank series
(state, ages, step, loss); it is "" (Prometheus: absent) on the per-process series
(the program's whole tree on this host: up, health, verdict, restarts, resources)
and for any process that is not distributed. The table of every metric is in
docs/deployment.md, "Monitoring"; monitoring/keel.rules.yml and
monitoring/board.py read these names.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from prometheus_client import CollectorRegistry, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["GpuRow", "HEALTH_CODES", "PROCESS_LABELS", "ProcessRow", "RankRow", "STATES", "write_textfile"]

# keel_process_health's value: also in docs/deployment.md ("Monitoring") and monitoring/keel.rules.yml.
HEALTH_CODES = {"ok": 0, "starting": 1, "degraded": 2, "unhealthy": 3, "failed": 4, "stopped": 5}
STATES = ("starting", "running", "stopping", "stopped", "failed", "unknown")
PROCESS_LABELS = ["host", "process", "kind", "rank"]


@dataclass(frozen=True)
class RankRow:
    """What one status file of a process says (one per torchrun rank). None: not known (the series is left out)."""

    rank: str = ""  # the global rank when distributed, else ""
    state: str = "unknown"  # the status's state, or "unknown"
    heartbeat_age: float | None = None
    progress_age: float | None = None
    step: int | None = None
    loss: float | None = None


@dataclass(frozen=True)
class ProcessRow:
    """One process as the watchdog saw it in the last poll. None: not known (the series is left out)."""

    process: str
    kind: str
    up: bool
    health: str  # a key of HEALTH_CODES
    rule: str = "not_polled"  # the rule of the published verdict (keel.watch.health; "not_polled" before the first)
    restarts_total: int = 0
    rss_bytes: int | None = None
    cpu_percent: float | None = None  # psutil's: percent of one core; exported as a ratio
    gpu_memory_bytes: int | None = None
    ranks: tuple[RankRow, ...] = (RankRow(),)
    last_exit: str | None = None  # how its last run ended (keel.watch.endings.End); None: no end seen yet


@dataclass(frozen=True)
class GpuRow:
    index: int
    name: str
    memory_used: int
    memory_total: int
    util_percent: float | None = None
    temperature_c: float | None = None


def _known(value: float | None, *, nan_ok: bool = False) -> bool:
    return value is not None and (nan_ok or not (isinstance(value, float) and math.isnan(value)))


@dataclass(eq=False)  # hashable by identity: the registry keys collectors by themselves
class _Snapshot(Collector):
    rows: list[ProcessRow]
    gpus: list[GpuRow] = field(default_factory=list)
    last_poll: float | None = None  # wall-clock epoch seconds (Prometheus convention for *_timestamp_seconds)
    gpu_metrics: bool = False
    host: str = ""

    def collect(self) -> Iterator[Metric]:
        yield from self._per_process()
        yield from self._per_rank()
        yield from self._gpus()
        if self.last_poll is not None:
            lp = GaugeMetricFamily("keel_watchdog_last_poll_timestamp_seconds",
                                   "When the watchdog last polled (Unix time).", labels=["host"])
            lp.add_metric([self.host], self.last_poll)
            yield lp

    def _key(self, r: ProcessRow, rank: str = "") -> list[str]:
        return [self.host, r.process, r.kind, rank]

    def _per_process(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("keel_process_up", "1 if the process runs (its pid is alive and its own).",
                               labels=PROCESS_LABELS)
        health = GaugeMetricFamily(
            "keel_process_health",
            "Watchdog verdict: 0 ok, 1 starting, 2 degraded, 3 unhealthy, 4 failed (gave up), 5 stopped (on purpose).",
            labels=PROCESS_LABELS)
        verdict = GaugeMetricFamily("keel_process_verdict", "1 for the rule of the watchdog's current verdict.",
                                    labels=PROCESS_LABELS + ["rule"])
        restarts = CounterMetricFamily("keel_process_restarts", "Restarts done by the watchdog.", labels=PROCESS_LABELS)
        rss = GaugeMetricFamily("keel_process_resident_memory_bytes", "Resident memory of the process tree.",
                                labels=PROCESS_LABELS)
        cpu = GaugeMetricFamily("keel_process_cpu_ratio", "CPU of the process tree: busy cores (1 = one core).",
                                labels=PROCESS_LABELS)
        gpu = GaugeMetricFamily("keel_process_gpu_memory_bytes", "GPU memory of the process tree (NVML).",
                                labels=PROCESS_LABELS)
        last_exit = GaugeMetricFamily("keel_process_last_exit", "1 for how the process's last run ended "
                                      "(keel.watch.endings: exited, crashed, killed, oom_killed, ...).",
                                      labels=PROCESS_LABELS + ["reason"])
        for r in self.rows:
            key = self._key(r)
            up.add_metric(key, 1.0 if r.up else 0.0)
            if r.last_exit is not None:
                last_exit.add_metric(key + [r.last_exit], 1.0)
            health.add_metric(key, float(HEALTH_CODES.get(r.health, 3)))
            verdict.add_metric(key + [r.rule], 1.0)
            restarts.add_metric(key, float(r.restarts_total))
            if _known(r.rss_bytes):
                rss.add_metric(key, float(r.rss_bytes))  # type: ignore[arg-type]
            if _known(r.cpu_percent):
                cpu.add_metric(key, r.cpu_percent / 100.0)  # type: ignore[operator]
            if _known(r.gpu_memory_bytes):
                gpu.add_metric(key, float(r.gpu_memory_bytes))  # type: ignore[arg-type]
        yield from (up, health, verdict, restarts, rss, cpu, gpu, last_exit)

    def _per_rank(self) -> Iterator[Metric]:
        state = GaugeMetricFamily("keel_process_state", "1 for the state the process reports.",
                                  labels=PROCESS_LABELS + ["state"])
        families = {
            "heartbeat_age": GaugeMetricFamily("keel_process_heartbeat_age_seconds", "Seconds since the last heartbeat.",
                                               labels=PROCESS_LABELS),
            "progress_age": GaugeMetricFamily("keel_process_progress_age_seconds",
                                              "Seconds since the last progress (a finished step).", labels=PROCESS_LABELS),
            "step": GaugeMetricFamily("keel_training_step", "Training step the process reports (a gauge: a resumed "
                                      "run goes back to its checkpoint's step).", labels=PROCESS_LABELS),
            "loss": GaugeMetricFamily("keel_training_loss", "Training loss the process reports (NaN when it is NaN).",
                                      labels=PROCESS_LABELS),
        }
        for r in self.rows:
            for rr in r.ranks:
                key = self._key(r, rr.rank)
                for s in STATES:
                    state.add_metric(key + [s], 1.0 if rr.state == s else 0.0)
                for attr, family in families.items():
                    value = getattr(rr, attr)
                    if _known(value, nan_ok=attr == "loss"):
                        family.add_metric(key, float(value))
        yield state
        yield from families.values()

    def _gpus(self) -> Iterator[Metric]:
        gm = GaugeMetricFamily("keel_gpu_metrics_available", "1 if NVML gave GPU metrics in the last poll.",
                               labels=["host"])
        gm.add_metric([self.host], 1.0 if self.gpu_metrics else 0.0)
        yield gm
        labels = ["host", "gpu", "name"]
        used = GaugeMetricFamily("keel_gpu_memory_used_bytes", "GPU memory in use.", labels=labels)
        total = GaugeMetricFamily("keel_gpu_memory_total_bytes", "GPU memory.", labels=labels)
        util = GaugeMetricFamily("keel_gpu_utilization_ratio", "GPU utilisation (0 to 1).", labels=labels)
        temp = GaugeMetricFamily("keel_gpu_temperature_celsius", "GPU temperature.", labels=labels)
        for g in self.gpus:
            key = [self.host, str(g.index), g.name]
            used.add_metric(key, float(g.memory_used))
            total.add_metric(key, float(g.memory_total))
            if g.util_percent is not None:
                util.add_metric(key, g.util_percent / 100.0)
            if g.temperature_c is not None:
                temp.add_metric(key, g.temperature_c)
        yield from (used, total, util, temp)


def write_textfile(
    path: str | os.PathLike[str],
    rows: Iterable[ProcessRow],
    gpus: Iterable[GpuRow] = (),
    *,
    last_poll: float | None = None,
    gpu_metrics: bool = False,
    host: str | None = None,
) -> None:
    """Replace ``path`` atomically with the metrics for ``rows`` and ``gpus``. Raises OSError on failure.

    ``host``: the ``host`` label (default: this machine's name, ``socket.gethostname()``).
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(list(rows), list(gpus), last_poll, gpu_metrics,
                                socket.gethostname() if host is None else host))
    write_to_textfile(str(path), registry)
