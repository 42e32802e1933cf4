"""keel.prom: the watchdog's view as Prometheus metrics, for node_exporter's textfile collector.

Written each poll with prometheus_client's ``write_to_textfile`` (temp file in
the same directory, then rename: a scraper never reads half a file). A fresh
registry per write, fed by one collector over plain rows, so a process removed
from the stack disappears from the file instead of lingering as a stale series.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from prometheus_client import CollectorRegistry, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["GpuRow", "HEALTH_CODES", "ProcessRow", "STATES", "write_textfile"]

# keel_process_health's value: also in docs/watchdog.md.
HEALTH_CODES = {"ok": 0, "starting": 1, "degraded": 2, "unhealthy": 3, "failed": 4, "stopped": 5}
STATES = ("starting", "running", "stopping", "stopped", "failed", "unknown")


@dataclass(frozen=True)
class ProcessRow:
    """One process as the watchdog saw it in the last poll. None: not known (the series is left out)."""

    process: str
    kind: str
    up: bool
    state: str  # the status's state, or "unknown"
    health: str  # a key of HEALTH_CODES
    heartbeat_age: float | None = None
    progress_age: float | None = None
    restarts_total: int = 0
    rss_bytes: int | None = None
    cpu_percent: float | None = None
    gpu_memory_bytes: int | None = None
    step: int | None = None
    loss: float | None = None


@dataclass(frozen=True)
class GpuRow:
    index: int
    name: str
    memory_used: int
    memory_total: int
    util_percent: float | None = None
    temperature_c: float | None = None


@dataclass(eq=False)  # hashable by identity: the registry keys collectors by themselves
class _Snapshot(Collector):
    rows: list[ProcessRow]
    gpus: list[GpuRow] = field(default_factory=list)
    last_poll: float | None = None  # wall-clock epoch seconds (Prometheus convention for *_timestamp_seconds)
    gpu_metrics: bool = False

    def collect(self) -> Iterator[Metric]:
        labels = ["process", "kind"]

        def gauge(name: str, doc: str, attr: str) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            for r in self.rows:
                value = getattr(r, attr)
                if value is not None and not (isinstance(value, float) and math.isnan(value) and attr != "loss"):
                    g.add_metric([r.process, r.kind], float(value))
            return g

        up = GaugeMetricFamily("keel_process_up", "1 if the process runs (its pid is alive and its own).", labels=labels)
        health = GaugeMetricFamily(
            "keel_process_health", "Watchdog verdict: 0 ok, 1 starting, 2 degraded, 3 unhealthy, 4 failed (gave up), 5 stopped (on purpose).",
            labels=labels,
        )
        state = GaugeMetricFamily("keel_process_state", "1 for the state the process reports.", labels=labels + ["state"])
        restarts = CounterMetricFamily("keel_process_restarts", "Restarts done by the watchdog.", labels=labels)
        for r in self.rows:
            up.add_metric([r.process, r.kind], 1.0 if r.up else 0.0)
            health.add_metric([r.process, r.kind], float(HEALTH_CODES.get(r.health, 3)))
            for s in STATES:
                state.add_metric([r.process, r.kind, s], 1.0 if r.state == s else 0.0)
            restarts.add_metric([r.process, r.kind], float(r.restarts_total))
        yield from (up, health, state, restarts)
        yield gauge("keel_process_heartbeat_age_seconds", "Seconds since the last heartbeat.", "heartbeat_age")
        yield gauge("keel_process_progress_age_seconds", "Seconds since the last progress (a finished step).", "progress_age")
        yield gauge("keel_process_rss_bytes", "Resident memory of the process tree.", "rss_bytes")
        yield gauge("keel_process_cpu_percent", "CPU of the process tree, percent of one core.", "cpu_percent")
        yield gauge("keel_process_gpu_memory_bytes", "GPU memory of the process tree (NVML).", "gpu_memory_bytes")
        yield gauge("keel_training_step", "Training step the process reports.", "step")
        yield gauge("keel_training_loss", "Training loss the process reports (NaN when it is NaN).", "loss")

        gm = GaugeMetricFamily("keel_gpu_metrics_available", "1 if NVML gave GPU metrics in the last poll.")
        gm.add_metric([], 1.0 if self.gpu_metrics else 0.0)
        yield gm
        used = GaugeMetricFamily("keel_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu", "name"])
        total = GaugeMetricFamily("keel_gpu_memory_total_bytes", "GPU memory.", labels=["gpu", "name"])
        util = GaugeMetricFamily("keel_gpu_utilization_percent", "GPU utilisation.", labels=["gpu", "name"])
        temp = GaugeMetricFamily("keel_gpu_temperature_celsius", "GPU temperature.", labels=["gpu", "name"])
        for g in self.gpus:
            key = [str(g.index), g.name]
            used.add_metric(key, float(g.memory_used))
            total.add_metric(key, float(g.memory_total))
            if g.util_percent is not None:
                util.add_metric(key, g.util_percent)
            if g.temperature_c is not None:
                temp.add_metric(key, g.temperature_c)
        yield from (used, total, util, temp)
        if self.last_poll is not None:
            lp = GaugeMetricFamily("keel_watchdog_last_poll_timestamp_seconds", "When the watchdog last polled.")
            lp.add_metric([], self.last_poll)
            yield lp


def write_textfile(
    path: str | os.PathLike[str],
    rows: Iterable[ProcessRow],
    gpus: Iterable[GpuRow] = (),
    *,
    last_poll: float | None = None,
    gpu_metrics: bool = False,
) -> None:
    """Replace ``path`` atomically with the metrics for ``rows`` and ``gpus``. Raises OSError on failure."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(list(rows), list(gpus), last_poll, gpu_metrics))
    write_to_textfile(str(path), registry)
