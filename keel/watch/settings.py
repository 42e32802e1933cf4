"""The watchdog's settings: the ``watchdog`` block of ``build/<env>/watchdog.json``.

keel.render.contract reads and checks the file; every value here comes from it
(resolve writes the model's defaults), none is defaulted here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from keel.render.contract import ContractError, Incidents, ProcessFile, SameCrash


@dataclass(frozen=True)
class WatchdogSettings:
    """The ``watchdog`` block of the watchdog's resolved file (docs/internals.md)."""

    name: str
    run_dir: Path
    stack: Path
    poll_interval: float
    rss_consecutive_polls: int
    stable_after: float
    alert_command: list[str] | None
    alert_timeout: float
    prometheus_textfile: Path | None
    prometheus_interval: float
    heartbeat_interval: float
    jitter: str
    log_format: str
    log_level: str
    same_crash: SameCrash  # keel.watch.crashes
    incidents: Incidents | None  # keel.watch.recorder; None: no incident capture

    @classmethod
    def from_process_file(cls, resolved: ProcessFile, where: str) -> WatchdogSettings:
        """The watchdog's view of a checked resolved file; ContractError unless it is a watchdog's."""
        w = resolved.watchdog
        if resolved.kind != "watchdog" or w is None:
            raise ContractError(where, "kind", f"expected a watchdog's resolved file, got kind {resolved.kind!r}")
        return cls(
            name=resolved.name,
            run_dir=Path(resolved.paths.run_dir),
            stack=Path(w.stack),
            poll_interval=w.poll_interval,
            rss_consecutive_polls=w.rss_consecutive_polls,
            stable_after=w.stable_after,
            alert_command=list(w.alert.command) if w.alert.command is not None else None,
            alert_timeout=w.alert.timeout,
            prometheus_textfile=Path(w.prometheus_textfile) if w.prometheus_textfile else None,  # resolve made it absolute
            prometheus_interval=w.prometheus_interval,
            heartbeat_interval=resolved.heartbeat_interval,
            jitter=w.jitter,
            log_format=resolved.log.format,
            log_level=resolved.log.level,
            same_crash=w.same_crash,
            incidents=w.incidents,
        )
