"""The watchdog's ``same_crash`` settings: when a crash that repeats run after run stops the restarts.

Its own module so keel/config/model.py only gains the field line (docs/watchdog.md,
"Deterministic crashes"; the rule itself is keel.watch.crashes).
"""

from __future__ import annotations

from pydantic import Field

from keel.config.types import Strict

__all__ = ["SameCrashSettings"]


class SameCrashSettings(Strict):
    """Give up early on a trainer that dies with the same exception at the same step after every resume."""

    enabled: bool = Field(True, description="Give up, with an alert, on a trainer that crashes the same way after every resume instead of spending the whole restart budget.")
    resumes: int = Field(3, ge=1, description="How many resumed runs in a row must die with the same exception (type and message) before the watchdog gives up.")
    steps: int = Field(5, ge=0, description="Crashes this many steps apart or fewer count as the same step.")
