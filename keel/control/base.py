"""What every control backend is: one interface, typed errors, retrying, the process record.

Processes are named by their keel name (``trainer``), never by the backend's name
(``keel-trainer``, ``keel-trainer.service``: computed once, in keel.render.resolve, and read
from keel.json); a backend only knows the processes it was given, so nothing outside the
project can be touched through it.

States use supervisord's vocabulary for every backend: STOPPED, STARTING, RUNNING, BACKOFF,
STOPPING, EXITED, FATAL, UNKNOWN.

Errors are typed (``ControlError`` and subclasses). Transient ones (``BackendUnavailable``:
socket refused, timeout, systemctl missing) are retried with exponential backoff by
``retrying``; the caller still has to catch ``ControlError``: the watchdog logs it as an event
and carries on, the tools print it.
"""

from __future__ import annotations

import signal as _signal
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, Protocol, TypeVar

__all__ = [
    "BackendExit",
    "BackendUnavailable",
    "ControlBackend",
    "ControlError",
    "NoSuchProcess",
    "NotRunning",
    "ProcessInfo",
    "TRANSITIONAL_STATES",
    "retrying",
    "signal_name",
]

T = TypeVar("T")

# States in which the backend itself is (re)starting the process: the watchdog must not fight it.
TRANSITIONAL_STATES = frozenset({"STARTING", "BACKOFF", "STOPPING"})

# States from which `start_all` starts a process again (not RUNNING, not already being started).
STARTABLE_STATES = frozenset({"STOPPED", "EXITED", "FATAL"})


class ControlError(RuntimeError):
    """A control operation failed. ``process`` may be None for whole-backend failures."""

    def __init__(self, message: str, *, process: str | None = None, backend: str = "") -> None:
        super().__init__(message)
        self.process = process
        self.backend = backend


class NotRunning(ControlError):
    """The process is not running (stop or signal of a stopped process)."""


class NoSuchProcess(ControlError):
    """The backend does not know this process (not in keel.json, or not loaded by supervisord/systemd)."""


class BackendUnavailable(ControlError):
    """The backend cannot be reached (supervisord down, socket timeout, no systemctl). Worth retrying."""


class ShuttingDown(BackendUnavailable):
    """The backend is shutting down: it still answers, but only to say so, until its processes are gone."""


@dataclass
class ProcessInfo:
    name: str
    state: str
    pid: int | None
    started: float | None  # wall-clock epoch seconds, as the backend reports it
    exit_status: int | None
    description: str
    exit_signal: str | None = None  # "SIGKILL": the signal that ended the last run, where the backend says (systemd)


class BackendExit(NamedTuple):
    """How the backend's own record says a run ended: its exit code or killing signal, and whether the
    backend itself stopped it (supervisord writes "stopped:" only for a stop it made: an operator's
    ``supervisorctl stop``, ``bin/launch down`` or ``stop``, the watchdog's restart; a run that died of
    a signal from elsewhere is "exited:"). The one fact left once the backend runs the next run."""

    exit_code: int | None
    signal: str | None
    stopped: bool = False


class ControlBackend(Protocol):
    """What the watchdog and the tools use to act on a stack's processes.

    Per process: ``status``, ``start``, ``stop``, ``restart``, ``signal``. For the whole stack
    (bin/launch, bin/render-config, the Ansible role through ``bin/launch apply``):

    - ``apply()``: make the rendered files on disk take effect, restarting only what changed;
      returns one line per change (empty: nothing changed).
    - ``start_all()``: start every process of the stack that is not running or starting;
      returns the names started.
    - ``stop_all()``: stop every process of the stack, each within its stop timeout.
    - ``shutdown()``: stop the stack and, where the stack owns it, the control daemon itself.
    """

    kind: str

    def status(self) -> dict[str, ProcessInfo]: ...
    def start(self, name: str) -> None: ...
    def stop(self, name: str, *, wait: bool = True) -> None:
        """Stop ``name``; ``wait=False`` only asks (the backend still escalates to SIGKILL after the stop timeout)."""
        ...
    def restart(self, name: str) -> None: ...
    def signal(self, name: str, sig: int) -> None: ...
    def last_exit(self, name: str, pid: int | None) -> BackendExit | None:
        """How run ``pid`` ended when the backend keeps more than ``ProcessInfo`` says; else None."""
        ...
    def apply(self) -> list[str]: ...
    def start_all(self) -> list[str]: ...
    def stop_all(self) -> None: ...
    def shutdown(self) -> None: ...


def retrying(
    op: Callable[[], T],
    *,
    attempts: int = 3,
    initial: float = 0.2,
    factor: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run ``op``, retrying BackendUnavailable with exponential backoff; other errors pass straight through."""
    delay = initial
    for attempt in range(1, attempts + 1):
        try:
            return op()
        except BackendUnavailable:
            if attempt == attempts:
                raise
            sleep(delay)
            delay *= factor
    raise AssertionError("unreachable")  # pragma: no cover


def signal_name(sig: int) -> str:
    """SIGTERM -> "TERM": the spelling supervisord's signalProcess wants."""
    return _signal.Signals(sig).name.removeprefix("SIG")
