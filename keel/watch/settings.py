"""The watchdog's settings: the ``watchdog`` block of ``build/<env>/watchdog.json``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

@dataclass(frozen=True)
class WatchdogSettings:
    """The ``watchdog`` block of the watchdog's resolved file (docs/internals.md)."""

    run_dir: Path
    stack: Path
    poll_interval: float = 5.0
    rss_consecutive_polls: int = 3
    stable_after: float = 600.0
    alert_command: list[str] | None = None
    alert_timeout: float = 10.0
    prometheus_textfile: Path | None = None
    # Scrapers read the textfile every 15-60 s; rewriting it more often than this only costs CPU.
    prometheus_interval: float = 5.0
    heartbeat_interval: float = 2.0
    jitter: str = "full"

    @classmethod
    def from_resolved(cls, resolved: dict) -> WatchdogSettings:
        w = resolved.get("watchdog", {})
        run_dir = Path(resolved["paths"]["run_dir"])
        prom = w.get("prometheus_textfile")
        alert = w.get("alert") or {}
        command = alert.get("command")
        return cls(
            run_dir=run_dir,
            stack=Path(w["stack"]),
            poll_interval=float(w.get("poll_interval", 5.0)),
            rss_consecutive_polls=int(w.get("rss_consecutive_polls", 3)),
            stable_after=float(w.get("stable_after", 600.0)),
            alert_command=[command] if isinstance(command, str) else command,
            alert_timeout=float(alert.get("timeout", 10.0)),
            prometheus_textfile=None if not prom else (Path(prom) if os.path.isabs(prom) else run_dir / prom),
            heartbeat_interval=float(resolved.get("heartbeat_interval", 2.0)),
            jitter=str(w.get("jitter", "full")),
            prometheus_interval=float(w.get("prometheus_interval", 5.0)),
        )
