"""The watchdog's ``incidents`` settings: what it captures before it restarts or gives up on a process.

Its own module so keel/config/model.py only gains the field line.
"""

from __future__ import annotations

from pydantic import Field

from keel.config.types import Duration, Strict

__all__ = ["IncidentSettings"]


class IncidentSettings(Strict):
    """Incident bundles (docs/watchdog.md, "Incidents")."""

    enabled: bool = Field(True, description="Capture an incident (stacks, logs, metrics, resources) before a hung, frozen or over-limit process is restarted or given up on.")
    capture_timeout: Duration = Field(5.0, description="The restart waits at most this long for the incident; what is not captured by then is marked missing.")
    keep: int = Field(20, ge=1, le=10000, description="Incidents kept in <run_dir>/incidents; the oldest beyond this are deleted.")
    log_lines: int = Field(200, ge=0, le=100000, description="Last lines of the process's log copied into the incident.")
    metrics_records: int = Field(50, ge=0, le=100000, description="Last metrics records copied into the incident.")
    py_spy: str = Field("py-spy", description="The py-spy program (a name looked up on PATH and beside the interpreter, or a path); when it is missing or fails, the trainer's faulthandler dump is used.")
