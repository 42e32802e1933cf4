"""The dashboard's blocking reads of the run dir, one object per server (the collector's ``reader``).

Every method runs in the collector's ``BlockingRunner`` (a worker thread, with a timeout), never
on the event loop, and each is called from one worker at a time. Besides statuses, metrics,
events, resources and logs, it lists the runs archive and the newest incident, each re-read
only when a stat says it changed, so an idle page costs a few stats a refresh.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from keel.host.sampling import ResourceSample, ResourceSampler
from keel.status.jsonl_tail import JsonlTail
from keel.status.models import ProcessStatus
from keel.status.reader import StatusReader
from keel.status.results import ReadError
from keel.status.runs import SUMMARY_FILE, RunSummary, list_runs_of, read_metrics, runs_root
from keel.watch.incidents import newest_bundle, newest_incident

from dashboard.config import DashboardConfig
from dashboard.logtail import LogTail

METRICS_PER_CYCLE = 20_000  # catch up on a long file over several cycles, not in one hung read


class RunDirReader:
    """The blocking side. Each method is called from one worker thread at a time."""

    def __init__(self, cfg: DashboardConfig, sampler: ResourceSampler | None = None) -> None:
        self.cfg = cfg
        self.status_reader = StatusReader(cfg.run_dir)
        self.metric_tails: dict[str, JsonlTail] = {}
        self.events_tail = JsonlTail(Path(cfg.run_dir) / "watchdog.events.jsonl")
        self.sampler = sampler or ResourceSampler()
        self.log_tails = {
            p.name: LogTail(p.log_file, cfg.log_tail_lines) for p in cfg.processes if p.log_file
        }
        self._runs_signature: tuple | None = None
        self._incident_seen: str | None | bool = False  # False: not looked yet (None: looked, there is none)

    def scan(self) -> dict[str, ProcessStatus | ReadError]:
        return self.status_reader.scan()

    def metrics(self, names: list[str]) -> tuple[dict[str, list[dict]], dict[str, str]]:
        """New records per stream, and an error per stream that failed (others go on)."""
        out: dict[str, list[dict]] = {}
        errors: dict[str, str] = {}
        for name in names:
            tail = self.metric_tails.get(name)
            if tail is None:
                tail = self.metric_tails[name] = JsonlTail(Path(self.cfg.run_dir) / f"{name}.metrics.jsonl")
            try:
                out[name] = tail.read_new(max_records=METRICS_PER_CYCLE)
            except Exception as exc:  # noqa: BLE001 - one bad stream must not hide the others
                errors[f"metrics {name}"] = f"{type(exc).__name__}: {exc}"
        return out, errors

    def events(self) -> list[dict]:
        return self.events_tail.read_new(max_records=10_000)

    def sample(self, pids: list[int]) -> ResourceSample:
        return self.sampler.sample(pids)

    def logs(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, tail in self.log_tails.items():
            try:
                out[name] = tail.read()
            except OSError as exc:
                out[name] = [f"(cannot read {tail.path}: {exc.strerror or exc})"]
        return out

    def close(self) -> None:
        for t in self.metric_tails.values():
            t.close()
        self.events_tail.close()
        self.sampler.close()

    # -- the runs archive and the incidents: read when they changed

    def runs(self) -> tuple[tuple, list[RunSummary]] | None:
        """(signature, every trainer's runs, newest first) when the archive changed since the last call, else
        None. The signature is the mtime of each trainer's archive dir and of every run.json (~20 stats)."""
        trainers = [p.name for p in self.cfg.processes if p.kind == "trainer"]
        roots = [runs_root(self.cfg.run_dir, t) for t in trainers]
        sig = tuple(_archive_stamps(roots))
        if sig == self._runs_signature:
            return None
        self._runs_signature = sig
        return sig, list_runs_of(self.cfg.run_dir, trainers)

    def run_records(self, trainer: str, run_id: str) -> list[dict[str, Any]]:
        """One archived run's metrics records (for an overlay)."""
        return read_metrics(runs_root(self.cfg.run_dir, trainer), run_id)

    def incident(self) -> tuple[str | None, dict[str, Any] | None] | None:
        """(id, summary) of the newest incident when it changed since the last call, else None."""
        newest = newest_bundle(self.cfg.run_dir)
        if newest == self._incident_seen:
            return None
        self._incident_seen = newest
        return newest, newest_incident(self.cfg.run_dir) if newest is not None else None


def _archive_stamps(roots: list[Path]):
    for root in roots:
        try:
            yield str(root), os.stat(root).st_mtime_ns
            for name in sorted(os.listdir(root)):
                try:
                    yield name, os.stat(root / name / SUMMARY_FILE).st_mtime_ns
                except OSError:
                    pass
        except OSError:
            yield str(root), None
