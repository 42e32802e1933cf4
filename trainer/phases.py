"""What the trainer is doing now, and how long each kind of thing usually takes: the phase timer.

A *phase* is a named stretch of the training loop: ``startup`` (until the first
reported step), ``train`` (the loop between reports when no other phase is
open), ``data`` (waiting for the next batch), ``validation``, ``checkpoint``,
and whatever a plug-in names with ``with run.phase("name"):``. Phases nest; the
innermost open one is the current phase.

Per phase the timer keeps a bounded duration histogram (``DurationHistogram``:
log-spaced buckets, counts halved when they grow large, so it forgets slowly
and never grows). The watchdog derives each phase's hang threshold from its p99
(keel.watch.phases); the histograms go into the checkpoint so a resumed run keeps
what it learned.

Per step it also splits time into waiting for data (time inside ``data``) and
the rest, and keeps the wait fraction over a moving window of steps: the
watchdog's ``data_starved`` rule reads it.

Pure: every method takes ``now`` (monotonic seconds); no clock, no I/O, no torch.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

__all__ = ["DATA", "STARTUP", "TRAIN", "DurationHistogram", "PhaseTimer"]

STARTUP = "startup"
TRAIN = "train"
DATA = "data"

# Buckets: 4 per doubling (~19 % wide) from 1 ms; bucket i holds durations in [B·r^i, B·r^(i+1)).
_BASE = 1e-3
_PER_DOUBLING = 4
_MAX_BUCKET = 4 * 40  # 2^40 ms: beyond any phase
# Past this many samples all counts halve: recent behaviour outweighs old, and the counts stay small.
_HALVE_AT = 2048
# Steps in the moving window of the data-wait fraction.
WAIT_WINDOW = 32
# A phase whose p99 is at least this (or that has few samples) is published the moment it begins and
# ends; shorter ones ride along with the next status write (a write per 20 ms phase would cost more
# than the step). The watchdog's ``auto`` floor must exceed report.status_interval for that reason.
PUBLISH_AT = 0.5
_PUBLISH_MIN_SAMPLES = 5


def _bucket(seconds: float) -> int:
    if seconds <= _BASE:
        return 0
    return min(_MAX_BUCKET, int(math.log2(seconds / _BASE) * _PER_DOUBLING))


def _upper(bucket: int) -> float:
    return _BASE * 2 ** ((bucket + 1) / _PER_DOUBLING)


class DurationHistogram:
    """Durations of one phase: sparse log buckets (counts), the sample count and the largest duration seen."""

    def __init__(self) -> None:
        self.buckets: dict[int, float] = {}
        self.count = 0  # samples ever recorded (not halved): "has it a history"
        self.max = 0.0

    def add(self, seconds: float) -> None:
        seconds = max(0.0, float(seconds))
        b = _bucket(seconds)
        self.buckets[b] = self.buckets.get(b, 0.0) + 1.0
        self.count += 1
        self.max = max(self.max, seconds)
        if sum(self.buckets.values()) >= _HALVE_AT:
            self.buckets = {k: v / 2 for k, v in self.buckets.items() if v / 2 >= 0.5}

    def quantile(self, q: float) -> float | None:
        """The upper edge of the bucket holding the q-quantile (never below the truth by more than a bucket)."""
        total = sum(self.buckets.values())
        if total <= 0:
            return None
        need, seen = q * total, 0.0
        for b in sorted(self.buckets):
            seen += self.buckets[b]
            if seen >= need:
                return min(_upper(b), self.max) if self.max > 0 else _upper(b)
        return self.max

    def summary(self) -> dict[str, Any]:
        """What the status payload carries: count, p50, p99, max (seconds)."""
        return {"count": self.count, "p50": self.quantile(0.5), "p99": self.quantile(0.99), "max": self.max}

    def to_dict(self) -> dict[str, Any]:
        return {"buckets": {str(k): v for k, v in self.buckets.items()}, "count": self.count, "max": self.max}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DurationHistogram:
        h = cls()
        h.buckets = {int(k): float(v) for k, v in dict(data.get("buckets", {})).items() if float(v) > 0}
        h.count = int(data.get("count", 0))
        h.max = float(data.get("max", 0.0))
        return h


class PhaseTimer:
    """The open phases, their histograms, and the data-wait fraction. Not thread-safe: the training thread's."""

    def __init__(self, now: float) -> None:
        self._open: list[tuple[str, float]] = []  # (name, since), innermost last
        self._base = STARTUP
        self._base_since = now
        self._created = now
        self.stats: dict[str, DurationHistogram] = {}
        self._step_start: float | None = None  # end of the previous step (None before the first)
        self._step_wait = 0.0
        self._window: deque[tuple[float, float]] = deque(maxlen=WAIT_WINDOW)  # (wait, total) per step

    # -- phases

    @property
    def current(self) -> tuple[str, float]:
        """The current phase and the monotonic time it began."""
        if self._open:
            return self._open[-1]
        return self._base, self._base_since

    def enter(self, name: str, now: float) -> None:
        self._open.append((name, now))

    def exit(self, now: float) -> tuple[str, float]:
        """Close the innermost phase; returns it and its duration."""
        name, since = self._open.pop()
        duration = max(0.0, now - since)
        self._record(name, duration)
        if name == DATA and not any(n == DATA for n, _ in self._open):
            self._step_wait += duration
        if not self._open:
            self._base_since = now  # back in the base phase from here
        return name, duration

    def step_done(self, now: float) -> None:
        """A step was reported: close the base interval (startup, or train) and the step's wait split."""
        if self._base == STARTUP:
            self._record(STARTUP, max(0.0, now - self._created))  # all of start-up, phases inside it too
        elif not self._open:
            self._record(TRAIN, max(0.0, now - self._base_since))
        if not self._open:
            self._base_since = now
        self._base = TRAIN
        if self._step_start is not None:
            total = now - self._step_start
            if total > 0:
                self._window.append((min(self._step_wait, total), total))
        self._step_start = now
        self._step_wait = 0.0

    def _record(self, name: str, duration: float) -> None:
        h = self.stats.get(name)
        if h is None:
            h = self.stats[name] = DurationHistogram()
        h.add(duration)

    def publish_now(self, name: str) -> bool:
        """Whether entering or leaving ``name`` is worth a status write at once (long, or not known yet)."""
        h = self.stats.get(name)
        if h is None or h.count < _PUBLISH_MIN_SAMPLES:
            return True
        p99 = h.quantile(0.99)
        return p99 is None or p99 >= PUBLISH_AT

    # -- data wait

    @property
    def wait_fraction(self) -> float | None:
        """Share of step time spent waiting for data over the last WAIT_WINDOW steps; None before two steps."""
        total = sum(t for _, t in self._window)
        if not self._window or total <= 0:
            return None
        return sum(w for w, _ in self._window) / total

    # -- the payload and the checkpoint

    def payload(self) -> dict[str, Any]:
        """The status payload fields: phase, phase_mono, phases (per-phase summary), data_wait_fraction."""
        name, since = self.current
        return {"phase": name, "phase_mono": since,
                "phases": {n: h.summary() for n, h in self.stats.items()},
                "data_wait_fraction": self.wait_fraction}

    def to_dict(self) -> dict[str, Any]:
        return {"format": 1, "phases": {n: h.to_dict() for n, h in self.stats.items()}}

    def load(self, data: Any) -> None:
        """Adopt the histograms saved with a checkpoint (anything unreadable is ignored: start afresh)."""
        if not isinstance(data, dict) or data.get("format") != 1:
            return
        try:
            loaded = {str(n): DurationHistogram.from_dict(h) for n, h in dict(data.get("phases", {})).items()}
        except (TypeError, ValueError, AttributeError):
            return
        for name, h in self.stats.items():  # this run's own samples so far (its startup) are kept
            if name not in loaded:
                loaded[name] = h
        self.stats = loaded
