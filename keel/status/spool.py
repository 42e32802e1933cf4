"""JsonlSpool: a JsonlWriter that never raises for a failed write; its records wait in memory.

Records that could not be written (a full disk, say) stay in a queue bounded by
`budget_bytes` of encoded lines and go out, in order, on the next attempt the
backoff allows (the next append, or `retry()` from the heartbeat). When the queue
is over budget the oldest records are dropped and counted in `.dropped`: the log
then has a gap, and the count says how many records are missing from it.
"""

from __future__ import annotations

import threading
from collections import deque

from keel.status.degrade import Backoff, WriteFailures
from keel.status.jsonl import JsonlWriter, encode_record


class JsonlSpool:
    """Appends records through `writer`; failures go to `failures`, retries wait for `backoff`."""

    def __init__(self, writer: JsonlWriter, *, budget_bytes: int, failures: WriteFailures, backoff: Backoff) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, not {budget_bytes}")
        self.writer = writer
        self.budget_bytes = budget_bytes
        self.failures = failures
        self.backoff = backoff
        self.dropped = 0  # records given up on, over budget
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        """Records waiting to be written."""
        return len(self._queue)

    def append_many(self, records: list[dict]) -> None:
        """Queue `records` and write the queue if the backoff allows. Raises only TypeError (unencodable)."""
        lines = [encode_record(r) for r in records]
        with self._lock:
            self._queue.extend(lines)
            self._queued_bytes += sum(map(len, lines))
            if self.backoff.ready():
                self._flush()
            self._trim()

    def retry(self, *, force: bool = False) -> bool:
        """Write what is queued if the backoff allows (or `force`); True when nothing is left queued."""
        with self._lock:
            if self._queue and (force or self.backoff.ready()):
                self._flush()
                self._trim()
            return not self._queue

    def _flush(self) -> None:
        if not self._queue:
            return
        lines = list(self._queue)
        try:
            self.writer.append_lines(lines)
            written = len(lines)
        except OSError as exc:
            written = getattr(exc, "records_written", 0)
            self._pop(written)
            self.failures.record(exc, "metrics")
            self.backoff.failed()
            return
        self._pop(written)
        if self.backoff.failing:
            self.backoff.succeeded()
            self.failures.resumed("metrics", self.failures.count)

    def _pop(self, n: int) -> None:
        for _ in range(n):
            self._queued_bytes -= len(self._queue.popleft())

    def _trim(self) -> None:
        while self._queued_bytes > self.budget_bytes and self._queue:
            self._pop(1)
            self.dropped += 1

    def close(self) -> None:
        """One last forced attempt, then close the writer. What is still queued is counted as dropped."""
        self.retry(force=True)
        with self._lock:
            self.dropped += len(self._queue)
            self._queue.clear()
            self._queued_bytes = 0
        self.writer.close()
