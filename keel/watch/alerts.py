"""Alert hook: run the user's ``alert.command`` with one event as JSON on stdin.

keel knows nothing about mail or Slack; the command does (``["sh", "-c",
"mail -s keel ops@example.com"]``, a webhook curl, ...). Commands run on one
background thread, one at a time, each killed (its whole process group) after
``timeout``; the watchdog's poll loop only puts the event on a bounded queue,
so a slow or stuck command never delays a poll. When the queue is full the
alert is dropped and counted (an alert storm must not grow memory).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import threading
from typing import Callable, Sequence

__all__ = ["AlertHook", "AlertResult", "run_alert_command"]

log = logging.getLogger("keel.watch.alerts")


class AlertResult(dict):
    """{"command": argv, "rc": int | None, "timed_out": bool, "error": str | None, "stderr": str}."""


def run_alert_command(argv: Sequence[str], event: dict, timeout: float) -> AlertResult:
    """Run ``argv`` with ``event`` as JSON on stdin; kill its process group after ``timeout`` seconds. Never raises."""
    data = (json.dumps(event, default=str, allow_nan=True) + "\n").encode()
    try:
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, so a timeout kills its children too
        )
    except OSError as exc:
        return AlertResult(command=list(argv), rc=None, timed_out=False, error=f"cannot run: {exc}", stderr="")
    try:
        _, err = proc.communicate(data, timeout=timeout)
        return AlertResult(command=list(argv), rc=proc.returncode, timed_out=False, error=None,
                           stderr=err.decode(errors="replace")[-2000:])
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        return AlertResult(command=list(argv), rc=proc.returncode, timed_out=True,
                           error=f"killed after {timeout:g}s", stderr="")
    except OSError as exc:  # BrokenPipe: the command exited without reading stdin
        proc.kill()
        proc.wait()
        return AlertResult(command=list(argv), rc=proc.returncode, timed_out=False, error=str(exc), stderr="")


class AlertHook:
    """Queue alerts for a background thread that runs the command. ``command=None`` disables it."""

    def __init__(
        self,
        command: Sequence[str] | None,
        timeout: float = 10.0,
        *,
        on_result: Callable[[dict, AlertResult], None] | None = None,
        max_queued: int = 100,
    ) -> None:
        self.command = list(command) if command else None
        self.timeout = timeout
        self.on_result = on_result
        self.dropped = 0
        self._queue: queue.Queue[dict | None] = queue.Queue(maxsize=max_queued)
        self._thread: threading.Thread | None = None

    def send(self, event: dict) -> bool:
        """Queue ``event``; returns False when disabled or the queue is full. Never blocks."""
        if self.command is None:
            return False
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="keel-alerts", daemon=True)
            self._thread.start()
        try:
            self._queue.put_nowait(event)
            return True
        except queue.Full:
            self.dropped += 1
            log.warning("alert queue full; alert dropped", extra={"event": "alert_dropped", "dropped": self.dropped})
            return False

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            if event is None:
                return
            assert self.command is not None
            result = run_alert_command(self.command, event, self.timeout)
            if self.on_result is not None:
                try:
                    self.on_result(event, result)
                except Exception:  # noqa: BLE001 - reporting a result must not kill the alert thread
                    log.exception("alert result callback failed")

    def close(self, timeout: float | None = None) -> None:
        """Let queued alerts finish (up to ``timeout``; default: the command timeout plus a second)."""
        if self._thread is None:
            return
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(self.timeout + 1.0 if timeout is None else timeout)
