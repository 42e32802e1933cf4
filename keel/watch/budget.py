"""RestartBudget: when the watchdog may restart a process again, and when it must give up.

Pure logic over monotonic times passed in by the caller (no clock is read here):

- the first restart after a healthy period is allowed at once; after the n-th
  consecutive restart the next one waits ``min(backoff_max, backoff_initial * 2**(n-1))``
  with jitter ("full": uniform in [0, d]; "equal": d/2 + uniform in [0, d/2];
  "none": d), so a fleet of watchdogs does not restart in lockstep;
- at most ``max_restarts`` restarts within ``window``: one more needed means give up;
- ``stable_after`` seconds healthy in a row give the whole budget back.

State round-trips through ``to_dict``/``from_dict`` (the watchdog persists it in
``watchdog.state.json``), so a watchdog that is killed and restarted resumes with
the budget it had. Times are CLOCK_MONOTONIC seconds: valid across a process
restart, not across a reboot (the watchdog drops them when the boot id changes).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

__all__ = ["BudgetDecision", "BudgetSettings", "Decision", "RestartBudget"]

Jitter = Literal["full", "equal", "none"]


@dataclass(frozen=True)
class BudgetSettings:
    backoff_initial: float = 5.0
    backoff_max: float = 300.0
    max_restarts: int = 5
    window: float = 3600.0
    stable_after: float = 600.0
    jitter: Jitter = "full"

    @classmethod
    def from_config(cls, restart: dict, stable_after: float, jitter: Jitter = "full") -> BudgetSettings:
        """From a keel.json process's ``restart`` block and the watchdog's ``stable_after``."""
        return cls(
            backoff_initial=float(restart.get("backoff_initial", cls.backoff_initial)),
            backoff_max=float(restart.get("backoff_max", cls.backoff_max)),
            max_restarts=int(restart.get("max_restarts", cls.max_restarts)),
            window=float(restart.get("window", cls.window)),
            stable_after=float(stable_after),
            jitter=jitter,
        )


class Decision(str, Enum):
    RESTART = "restart"  # go ahead, then call record_restart()
    WAIT = "wait"  # backoff not over: ask again at next_allowed
    GIVE_UP = "give_up"  # budget spent: stop the process, mark it failed, alert


@dataclass(frozen=True)
class BudgetDecision:
    decision: Decision
    attempt: int  # the attempt this would be (1 = first restart since healthy)
    next_allowed_in: float  # seconds until a restart is allowed (0 when allowed)
    restarts_in_window: int


def backoff_delay(attempt: int, settings: BudgetSettings, rng: random.Random) -> float:
    """Delay after the ``attempt``-th consecutive restart (attempt >= 1), jitter applied."""
    base = min(settings.backoff_max, settings.backoff_initial * 2 ** max(0, attempt - 1))
    if settings.jitter == "full":
        return rng.uniform(0.0, base)
    if settings.jitter == "equal":
        return base / 2 + rng.uniform(0.0, base / 2)
    return base


@dataclass
class RestartBudget:
    """Restart bookkeeping for one process. All times are monotonic seconds."""

    settings: BudgetSettings
    rng: random.Random = field(default_factory=random.Random, repr=False)
    restarts: list[float] = field(default_factory=list)  # times of restarts still inside the window
    attempt: int = 0  # consecutive restarts since the last stable period
    next_allowed: float = 0.0
    healthy_since: float | None = None
    gave_up: bool = False
    restarts_total: int = 0  # never reset: the Prometheus counter

    def _trim(self, now: float) -> None:
        self.restarts = [t for t in self.restarts if now - t < self.settings.window]

    def check(self, now: float) -> BudgetDecision:
        """May the process be restarted now? Does not change the budget (except dropping old restarts)."""
        self._trim(now)
        attempt = self.attempt + 1
        if self.gave_up or len(self.restarts) >= self.settings.max_restarts:
            return BudgetDecision(Decision.GIVE_UP, attempt, 0.0, len(self.restarts))
        wait = max(0.0, self.next_allowed - now)
        if wait > 0:
            return BudgetDecision(Decision.WAIT, attempt, wait, len(self.restarts))
        return BudgetDecision(Decision.RESTART, attempt, 0.0, len(self.restarts))

    def record_restart(self, now: float) -> float:
        """A restart was done at ``now``; returns the delay before the next one is allowed."""
        self._trim(now)
        self.restarts.append(now)
        self.restarts_total += 1
        self.attempt += 1
        self.healthy_since = None
        delay = backoff_delay(self.attempt, self.settings, self.rng)
        self.next_allowed = now + delay
        return delay

    def record_give_up(self) -> None:
        self.gave_up = True
        self.healthy_since = None

    def record_healthy(self, now: float) -> bool:
        """The process is healthy at ``now``; returns True when this completes a stable period (budget reset)."""
        if self.healthy_since is None:
            self.healthy_since = now
            return False
        if now - self.healthy_since >= self.settings.stable_after and (self.attempt or self.restarts or self.gave_up):
            self.reset()
            self.healthy_since = now
            return True
        return False

    def record_unhealthy(self) -> None:
        self.healthy_since = None

    def reset(self) -> None:
        """The whole budget back (after a stable period, or an operator's restart of a given-up process)."""
        self.restarts.clear()
        self.attempt = 0
        self.next_allowed = 0.0
        self.gave_up = False

    # -- persistence

    def to_dict(self) -> dict:
        return {
            "restarts": list(self.restarts),
            "attempt": self.attempt,
            "next_allowed": self.next_allowed,
            "healthy_since": self.healthy_since,
            "gave_up": self.gave_up,
            "restarts_total": self.restarts_total,
        }

    @classmethod
    def from_dict(
        cls, data: dict, settings: BudgetSettings, rng: random.Random | None = None, *, times_valid: bool = True
    ) -> RestartBudget:
        """Restore a saved budget. ``times_valid=False`` (another boot): keep counts and give-up, drop the times."""
        budget = cls(settings, rng or random.Random())
        budget.gave_up = bool(data.get("gave_up", False))
        budget.restarts_total = int(data.get("restarts_total", 0))
        budget.attempt = int(data.get("attempt", 0))
        if times_valid:
            budget.restarts = [float(t) for t in data.get("restarts", [])]
            budget.next_allowed = float(data.get("next_allowed", 0.0))
            hs = data.get("healthy_since")
            budget.healthy_since = None if hs is None else float(hs)
        return budget
