"""A tiny sd_notify(3): READY=1, WATCHDOG=1, STOPPING=1 over systemd's unix datagram socket.

No dependency on libsystemd. NOTIFY_SOCKET may be a path or an abstract socket
(leading '@', which becomes a NUL byte). Without NOTIFY_SOCKET every call is a
no-op, so the trainer runs the same under supervisord and in a terminal.

WATCHDOG=1 must only be sent from the training loop's progress path: a ping from
a background thread would keep systemd happy while the loop is hung.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Callable, Mapping


def _address(value: str) -> str | bytes:
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


class Notifier:
    """Sends sd_notify messages; `watchdog()` only when WATCHDOG_USEC is set, at most every half of it."""

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        min_watchdog_interval: float | None = None,
    ) -> None:
        env = os.environ if environ is None else environ
        self._address = _address(env["NOTIFY_SOCKET"]) if env.get("NOTIFY_SOCKET") else None
        self._clock = clock
        self._last_watchdog: float | None = None
        self._sock: socket.socket | None = None
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        # WATCHDOG_PID names the process systemd expects pings from; another one must stay quiet.
        self.watchdog_enabled = bool(usec) and (not pid or pid == str(os.getpid()))
        if min_watchdog_interval is not None:
            self.watchdog_interval = min_watchdog_interval
        elif usec:
            # systemd recommends pinging at half the timeout.
            self.watchdog_interval = int(usec) / 2e6
        else:
            self.watchdog_interval = 1.0

    @property
    def enabled(self) -> bool:
        """True when NOTIFY_SOCKET is set."""
        return self._address is not None

    def notify(self, message: str) -> bool:
        """Send one message (e.g. "READY=1"); False when there is no socket or the send failed."""
        if self._address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message.encode(), self._address)
            return True
        except OSError:
            # A vanished socket (systemd restarted, test ended) must never break training.
            return False

    def ready(self) -> bool:
        """READY=1: start-up is over (systemd Type=notify waits for this)."""
        return self.notify(f"READY=1\nMAINPID={os.getpid()}")

    def stopping(self) -> bool:
        """STOPPING=1: shutdown has begun."""
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        """WATCHDOG=1, at most once per interval; call it whenever a training step completes."""
        if self._address is None or not self.watchdog_enabled:
            return False
        now = self._clock()
        if self._last_watchdog is not None and now - self._last_watchdog < self.watchdog_interval:
            return False
        self._last_watchdog = now
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        """Close the socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
