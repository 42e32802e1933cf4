"""Heartbeat: a daemon thread that proves a process is scheduled, by calling `beat()` on a period."""

from __future__ import annotations

import threading
from typing import Callable


class Heartbeat:
    """Calls `beat()` every `interval` seconds from a daemon thread until stop().

    Only proves the process is scheduled; it must not move the progress clock, so
    it gets a function that touches heartbeat fields only. An exception in `beat`
    is kept in `.last_error` and the thread keeps beating.
    """

    def __init__(self, interval: float, beat: Callable[[], object], *, name: str = "keel-heartbeat") -> None:
        if interval <= 0:
            raise ValueError(f"heartbeat interval must be > 0, not {interval}")
        self.interval = interval
        self._beat = beat
        self._name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.beats = 0
        self.last_error: BaseException | None = None

    def start(self) -> None:
        """Start the thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
                self.beats += 1
            except Exception as exc:  # noqa: BLE001 - keep beating; the caller sees .last_error
                self.last_error = exc

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop and join the thread; a beat in progress finishes first."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._thread = None

    @property
    def running(self) -> bool:
        """True while the thread is alive."""
        return self._thread is not None and self._thread.is_alive()
