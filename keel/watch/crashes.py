"""Deterministic crashes: the same exception at (about) the same step, run after run.

A trainer that resumes from its checkpoint and dies again with the same exception
at the same step will do so every time: restarting it spends the whole restart
budget (and, with backoff, hours) before anyone is told. ``CrashStreak`` keeps the
crashes that ended the last consecutive runs of one process; once ``resumes``
resumed runs in a row (so ``resumes + 1`` runs) died with the same ``Type: message``
within ``steps`` steps of each other, ``same_crash`` returns the give-up reason.

Only a run that reports a step and an exception qualifies (the trainer's exit
record): a plain command's non-zero exit has neither, and stays the crash-loop
rule's business. Any other end (clean, killed, hung, stopped) breaks the streak.
Pure; persisted in the watchdog's state file (``to_list``/``from_list``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from keel.render.contract import SameCrash
from keel.watch.endings import End, EndState

__all__ = ["Crash", "CrashStreak"]


@dataclass(frozen=True)
class Crash:
    step: int
    exception: str  # "Type: message"


@dataclass
class CrashStreak:
    """The crashes that ended the most recent consecutive runs, oldest first."""

    crashes: list[Crash] = field(default_factory=list)

    def record(self, end: EndState, settings: SameCrash) -> None:
        """Take one run's end into account."""
        if end.reason != End.CRASHED.value or end.step is None or not end.exception:
            self.crashes.clear()  # not a reproducible crash: the streak is broken
            return
        self.crashes.append(Crash(end.step, end.exception))
        del self.crashes[:-(settings.resumes + 1)]

    def same_crash(self, settings: SameCrash) -> str | None:
        """The give-up reason once the last ``resumes + 1`` runs crashed the same way, else None."""
        if not settings.enabled:
            return None
        last = self.crashes[-(settings.resumes + 1):]
        if len(last) < settings.resumes + 1:
            return None
        if len({c.exception for c in last}) != 1:
            return None
        steps = [c.step for c in last]
        if max(steps) - min(steps) > settings.steps:
            return None
        where = f"step {steps[-1]}" if len(set(steps)) == 1 else f"steps {min(steps)}-{max(steps)}"
        return f"crashes at {where} each time: {last[-1].exception} ({len(last)} runs in a row)"

    def clear(self) -> None:
        self.crashes.clear()

    def to_list(self) -> list[dict]:
        return [{"step": c.step, "exception": c.exception} for c in self.crashes]

    @classmethod
    def from_list(cls, data: list) -> CrashStreak:
        return cls([Crash(int(d["step"]), str(d["exception"])) for d in data or []
                    if isinstance(d, dict) and "step" in d and "exception" in d])
