"""The hang threshold of a trainer's current phase under ``progress_timeout: auto``: pure maths.

The trainer publishes its current phase, when it began and per-phase duration
stats (``TrainingStatus.phase``, ``phase_mono``, ``phases``: trainer.phases). For
the current phase the threshold is::

    min(ceiling, max(floor, k x p99))   with at least ``min_samples`` durations
    ceiling                             otherwise (no history yet)

where ``ceiling`` is ``health.auto.ceilings[phase]`` or ``health.auto.ceiling``.
The stats are learned per run and resumed with its checkpoint (the trainer saves
them there), so a restarted run keeps its history; a new run starts afresh.

Nothing here reads a clock or a file: ``keel.watch.health.progress_rule`` calls
``stuck_phase`` with the status and ``now_mono``.
"""

from __future__ import annotations

from dataclasses import dataclass

from keel.render.contract import AutoTimeout
from keel.status.models import PhaseStat, TrainingStatus

__all__ = ["PhaseThreshold", "StuckPhase", "phase_threshold", "stuck_phase"]


@dataclass(frozen=True)
class PhaseThreshold:
    """The threshold for one phase and how it was derived (for the verdict's reason)."""

    phase: str
    seconds: float
    p99: float | None  # None: no (trusted) history, the ceiling applies
    samples: int

    def explain(self) -> str:
        if self.p99 is None:
            return f"no history ({self.samples} samples): ceiling {self.seconds:g}s"
        return f"p99 {_fmt(self.p99)}, threshold {_fmt(self.seconds)}"


@dataclass(frozen=True)
class StuckPhase:
    """A trainer in one phase longer than that phase's threshold."""

    age: float
    threshold: PhaseThreshold

    @property
    def reason(self) -> str:
        t = self.threshold
        return f"stuck {_fmt(self.age)} in phase {t.phase}, {t.explain()}: hung"


def _fmt(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.2g} s" if seconds < 1 else f"{seconds:.1f} s"


def phase_threshold(phase: str, stat: PhaseStat | None, auto: AutoTimeout) -> PhaseThreshold:
    """max(floor, k x p99) capped at the phase's ceiling; the ceiling when the phase has too little history."""
    ceiling = auto.ceilings.get(phase, auto.ceiling)
    samples = stat.count if stat is not None else 0
    if stat is None or stat.p99 is None or samples < auto.min_samples:
        return PhaseThreshold(phase, ceiling, None, samples)
    return PhaseThreshold(phase, min(ceiling, max(auto.floor, auto.k * stat.p99)), stat.p99, samples)


def stuck_phase(payload: TrainingStatus, auto: AutoTimeout, now_mono: float) -> StuckPhase | None:
    """The current phase, if the trainer has been in it longer than its threshold; None if fine or unknown."""
    if payload.phase is None or payload.phase_mono is None:
        return None
    threshold = phase_threshold(payload.phase, payload.phases.get(payload.phase), auto)
    age = now_mono - payload.phase_mono
    return StuckPhase(age, threshold) if age > threshold.seconds else None
