"""Settings for the watchdog's trainer rules: ``auto`` hang timeouts per phase, data starvation, GPU idle.

Its own module so keel/config/model.py only gains the field lines. See docs/watchdog.md, "Phases and auto".
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import Field

from keel.config.types import Duration, Strict

__all__ = ["AUTO", "AutoTimeout", "DataStarvedSettings", "GpuIdleSettings", "ProgressTimeout"]

AUTO = "auto"

# `auto` first: a duration's parser would reject the word with a less helpful message.
ProgressTimeout = Union[Literal["auto"], Duration]


class AutoTimeout(Strict):
    """How ``progress_timeout: auto`` derives a phase's hang threshold: max(floor, k x p99), at most its ceiling."""

    k: float = Field(10.0, gt=1, le=1000, description="The hang threshold is k times the phase's p99 duration.")
    floor: Duration = Field(2.0, description="The threshold is never below this; keep it above report.status_interval (short phases are published with the status writes).")
    ceiling: Duration = Field(600.0, description="The threshold of a phase with no history yet, and the most any phase gets.")
    ceilings: dict[str, Duration] = Field(default_factory=dict, description="Per-phase ceilings (validation: 30m, checkpoint: 15m); other phases use `ceiling`.")
    min_samples: int = Field(3, ge=1, le=10000, description="Durations a phase needs before its p99 is trusted; fewer: its ceiling.")


class DataStarvedSettings(Strict):
    """Rule ``data_starved`` (a warning, never a restart)."""

    fraction: float = Field(0.5, gt=0, le=1, description="Warn when the trainer spends more than this share of step time waiting for data...")
    polls: int = Field(5, ge=1, le=100000, description="...for this many watchdog polls in a row.")


class GpuIdleSettings(Strict):
    """Rule ``gpu_idle`` (a warning, never a restart)."""

    util_percent: float = Field(2.0, ge=0, le=100, description="A held GPU at or below this utilisation (NVML) counts as idle.")
    polls: int = Field(10, ge=1, le=100000, description="Warn when every GPU a running trainer holds is idle for this many polls in a row.")


