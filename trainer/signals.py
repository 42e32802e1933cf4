"""SIGTERM/SIGINT as a flag the training loop polls at step boundaries.

The handler only sets a flag: doing real work (saving, logging, raising) inside
a signal handler can interrupt a checkpoint write half-way. While the final
checkpoint is written, further signals are ignored (`shielded`), so a second
SIGTERM from an impatient supervisor cannot stop us mid-way; the supervisor's
SIGKILL after stop.timeout is the only thing that can, and the write is atomic.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopFlag:
    """Set once a stop was requested, by a signal or by code (`request`)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signum: int | None = None

    def request(self, signum: int | None = None) -> None:
        """Ask the loop to stop at its next step boundary."""
        if self.signum is None:
            self.signum = signum
        self._event.set()

    def is_set(self) -> bool:
        """True once a stop was requested."""
        return self._event.is_set()

    def _handle(self, signum: int, frame: object) -> None:
        self.request(signum)

    def install(self) -> None:
        """Route SIGTERM and SIGINT to this flag (main thread only)."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Ignore SIGTERM/SIGINT for the duration (the final checkpoint and status write)."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def ignore_stop_signals() -> None:
    """Ignore SIGTERM/SIGINT from now on: the process is already stopping."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
