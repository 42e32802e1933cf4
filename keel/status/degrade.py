"""The status channel degrades, never kills: what a process does when a status or metrics write fails.

A failed write (ENOSPC, EIO, EDQUOT, EROFS, a lock timeout: any OSError) is
counted in `WriteFailures`, logged once per kind of failure (its errno name, or
the exception type when there is no errno), and retried after a `Backoff`
(doubling, capped). The next snapshot that gets through carries the count and
the last error (ProcessStatus.write_failures / last_write_error). See
docs/status-protocol.md, "When a write fails".
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from typing import Callable

log = logging.getLogger("keel.status")

# Between two "writes resumed" lines: a disk at the edge of full flaps, and the log must not.
_RESUMED_LOG_EVERY_S = 60.0


def failure_kind(exc: BaseException) -> str:
    """The kind a failure is logged and counted under: "ENOSPC", "EIO", ... or the type name."""
    code = getattr(exc, "errno", None)
    if isinstance(code, int) and code in errno.errorcode:
        return errno.errorcode[code]
    return type(exc).__name__


class Backoff:
    """When a failing channel may try again: `initial` after the first failure, doubling to `cap`."""

    def __init__(self, initial: float = 0.25, cap: float = 5.0, *, mono: Callable[[], float] = time.monotonic) -> None:
        if not 0 < initial <= cap:
            raise ValueError(f"backoff needs 0 < initial <= cap, not {initial}, {cap}")
        self.initial = initial
        self.cap = cap
        self._mono = mono
        self.delay = 0.0  # 0 while the channel works
        self._next = float("-inf")

    @property
    def failing(self) -> bool:
        """True from a failure until the next success."""
        return self.delay > 0

    def ready(self) -> bool:
        """True if an attempt is due (always, while the channel works)."""
        return self._mono() >= self._next

    def failed(self) -> None:
        """An attempt failed: wait longer before the next."""
        self.delay = self.initial if self.delay == 0 else min(self.delay * 2, self.cap)
        self._next = self._mono() + self.delay

    def succeeded(self) -> None:
        """An attempt worked: the next one is due at once."""
        self.delay = 0.0
        self._next = float("-inf")


class WriteFailures:
    """The failed writes of one process: counted, the first of each kind logged, the last one kept.

    Shared by the status and the metrics channel of a ProcessReporter; thread-safe.
    """

    def __init__(self, owner: str, *, logger: logging.Logger = log, mono: Callable[[], float] = time.monotonic) -> None:
        self.owner = owner
        self.count = 0
        self.last_error: str | None = None
        self.kinds: dict[str, int] = {}  # kind -> failures of that kind
        self._logger = logger
        self._mono = mono
        self._last_resumed_log = float("-inf")
        self._lock = threading.Lock()

    def record(self, exc: BaseException, channel: str) -> None:
        """Count a failed write on `channel` ("status", "metrics"); log it if its kind is new."""
        kind = failure_kind(exc)
        with self._lock:
            self.count += 1
            self.last_error = f"{kind}: {exc}"
            first = kind not in self.kinds
            self.kinds[kind] = self.kinds.get(kind, 0) + 1
        if first:
            self._logger.warning(
                "%s: %s write failed (%s); the process goes on, writes are retried with backoff "
                "and further %s failures are counted in the status, not logged",
                self.owner, channel, self.last_error, kind,
                extra={"event": "status_write_failed", "channel": channel, "kind": kind},
            )

    def resumed(self, channel: str, pending_failures: int) -> None:
        """`channel` wrote again after failing; logged at most once a minute."""
        now = self._mono()
        with self._lock:
            if now - self._last_resumed_log < _RESUMED_LOG_EVERY_S:
                return
            self._last_resumed_log = now
        self._logger.info(
            "%s: %s writes resumed (%d failed writes so far)", self.owner, channel, pending_failures,
            extra={"event": "status_write_resumed", "channel": channel, "write_failures": pending_failures},
        )
