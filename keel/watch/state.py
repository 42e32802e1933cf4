"""What the watchdog remembers about each process: between polls (``Watched``) and across its own restarts.

``watchdog.state.json`` is the watchdog's private memory (budget, give-up pid,
the run it dates ``startup_grace`` from), written atomically after a poll that
changed it and before each action's event (``Watchdog.emit``), so a killed
watchdog resumes with the budget it had. Nobody else reads it: what readers need
is published in the watchdog's status (``keel.watch.publish``). Monotonic times are valid only within one boot, so
they are dropped when the boot id changed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from keel.fs.atomic import atomic_write_text
from keel.render.contract import StackProcess
from keel.status.results import ReadError
from keel.status.models import ProcessStatus
from keel.watch.budget import RestartBudget
from keel.watch.crashes import CrashStreak
from keel.watch.end_evidence import RunTrack
from keel.watch.endings import EndState
from keel.watch.health import HealthVerdict

__all__ = ["STATE_FILE", "STATE_FORMAT", "LastAction", "Watched", "boot_id", "load_state", "state_data", "write_state"]

STATE_FILE = "watchdog.state.json"
STATE_FORMAT = 1


@dataclass(frozen=True)
class LastAction:
    """The last event about a process other than "observed" (published; wall time labels it)."""

    action: str
    reason: str
    wall: float


@dataclass
class Watched:
    """What the watchdog remembers about one process between polls."""

    name: str
    config: StackProcess  # its keel.json entry
    budget: RestartBudget
    incarnation: int | None = None  # the pid whose run `running_since` dates
    pid: int | None = None  # the pid judged in the last poll (kept after a restart, for metrics)
    running_since: float | None = None
    rss_over: int = 0
    gpu_over: int = 0
    gave_up_pid: int | None = None
    backend_pid: int | None = None  # the last pid seen RUNNING under the backend
    backend_restarts: list[float] = field(default_factory=list)  # when the backend restarted it by itself
    own_restart: bool = False  # the next new pid is ours, not the backend's autorestart
    last_key: tuple[str, str] | None = None
    deferred_attempt: int | None = None
    verdict: HealthVerdict | None = None
    last_action: LastAction | None = None
    statuses: list[ProcessStatus | ReadError] = field(default_factory=list)
    end: EndState | None = None  # how its last run ended (keel.watch.endings), published and persisted
    crashes: CrashStreak = field(default_factory=CrashStreak)  # keel.watch.crashes, persisted
    run: RunTrack = field(default_factory=RunTrack)  # keel.watch.end_evidence: OOM count, last RSS of the run


def boot_id() -> str:
    """This boot's id: monotonic times saved under another boot are meaningless."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def state_data(watched: dict[str, Watched]) -> dict:
    """The state file's content for ``watched`` (compared with the last write, to skip unchanged polls)."""
    return {
        "format_version": STATE_FORMAT,
        "boot_id": boot_id(),
        "processes": {
            name: {
                "budget": w.budget.to_dict(),
                "gave_up_pid": w.gave_up_pid,
                "incarnation": w.incarnation,
                "running_since": w.running_since,
                "end": w.end.to_dict() if w.end else None,
                "crashes": w.crashes.to_list(),
            }
            for name, w in watched.items()
        },
    }


def write_state(path: Path, data: dict) -> None:
    """Replace ``path`` atomically (temp file in the same dir, fsync, rename). Raises OSError."""
    atomic_write_text(path, json.dumps(data, sort_keys=True), 0o640)


def load_state(path: Path, watched: dict[str, Watched], rng: random.Random) -> str | None:
    """Restore the saved budgets into ``watched``; returns what happened, for an event (None: no file).

    Raises OSError/ValueError for a file that cannot be read; the caller starts afresh.
    """
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    if data.get("format_version") != STATE_FORMAT:
        return None
    same_boot = data.get("boot_id") == boot_id()
    for name, saved in data.get("processes", {}).items():
        w = watched.get(name)
        if w is None:
            continue
        w.budget = RestartBudget.from_dict(saved.get("budget", {}), w.budget.settings, rng, times_valid=same_boot)
        w.gave_up_pid = saved.get("gave_up_pid")
        w.end = EndState.from_dict(saved["end"]) if isinstance(saved.get("end"), dict) else None
        w.crashes = CrashStreak.from_list(saved.get("crashes", []))
        if same_boot:
            w.incarnation = saved.get("incarnation")
            w.running_since = saved.get("running_since")
    return f"budget state restored from {path}" + ("" if same_boot else " (new boot: times dropped)")
