"""ProcessReporter: how a keel process publishes its state, heartbeat, progress and metrics.

Usage (trainer)::

    rep = ProcessReporter(run_dir, "trainer", "trainer", heartbeat_interval=2.0)
    rep.start(payload={"run_id": run_id})
    rep.set_state(State.RUNNING)
    for step in ...:
        rep.progress(step=step, loss=loss)          # a finished step: moves the progress clock
        rep.metrics([{"step": step, "loss": loss}])
    rep.close()                                     # state=stopped

The reporter owns the only in-memory copy of its status and writes it whole with
StatusWriter.write; one lock serialises the heartbeat thread and the caller.

The status channel degrades, never kills: no method raises for a failed write
(OSError: ENOSPC, EIO, EROFS, a lock timeout...). The failure is counted and logged
once per kind (keel.status.degrade), the write is retried with backoff (at the
latest by the next heartbeat), metrics records wait in a bounded queue
(keel.status.spool), and the next snapshot that gets through carries
write_failures, last_write_error and metrics_dropped.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable

import psutil

from keel.fs.osops import OS, OsOps
from keel.status.degrade import Backoff, WriteFailures
from keel.status.heartbeat import Heartbeat
from keel.status.jsonl import JsonlWriter
from keel.status.models import Payload, ProcessStatus, State, payload_for, to_utc, utc_now
from keel.status.paths import metrics_path
from keel.status.snapshot import Durability, StatusWriter
from keel.status.spool import JsonlSpool


class ProcessReporter:
    """What a process uses: state transitions, heartbeat thread, progress, metrics."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        name: str,
        kind: str,
        *,
        durability: Durability = "none",
        heartbeat_interval: float = 2.0,
        gpus: Iterable[int] = (),
        metrics_max_bytes: int = 16 << 20,
        metrics_backups: int = 3,
        metrics_buffer_bytes: int = 4 << 20,
        retry_initial: float = 0.25,
        retry_max: float = 5.0,
        lock_timeout: float = 5.0,
        wall: Callable[[], datetime] = utc_now,
        mono: Callable[[], float] = time.monotonic,
        ops: OsOps = OS,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.name = name
        self.kind = kind
        self.writer = StatusWriter(run_dir, name, durability=durability, lock_timeout=lock_timeout, ops=ops)
        self.metrics_path = metrics_path(run_dir, name)
        #: Failed status and metrics writes of this process (both channels count here).
        self.failures = WriteFailures(name, mono=mono)
        self._status_backoff = Backoff(retry_initial, retry_max, mono=mono)
        self._spool = JsonlSpool(
            JsonlWriter(self.metrics_path, max_bytes=metrics_max_bytes, backups=metrics_backups, ops=ops),
            budget_bytes=metrics_buffer_bytes,
            failures=self.failures,
            backoff=Backoff(retry_initial, retry_max, mono=mono),
        )
        self._wall = wall
        self._mono = mono
        self._gpus = list(gpus)
        self._lock = threading.RLock()
        self._status: ProcessStatus | None = None
        self._closed = False
        self.heartbeat = Heartbeat(heartbeat_interval, self.beat, name=f"keel-heartbeat-{name}")

    def _now_wall(self) -> datetime:
        # model_copy skips validation, so normalise an injected clock here.
        return to_utc(self._wall())

    @property
    def status(self) -> ProcessStatus | None:
        """The last snapshot written (None before start())."""
        return self._status

    @property
    def metrics_pending(self) -> int:
        """Metrics records waiting in memory for a write to succeed."""
        return self._spool.pending

    def _publish(self, *, force: bool = False, **fields: Any) -> bool:
        # Caller holds self._lock. Every write is also a heartbeat: it proves we run.
        if self._status is None:
            raise RuntimeError(f"ProcessReporter({self.name!r}): call start() first")
        fields.setdefault("heartbeat_wall", self._now_wall())
        fields.setdefault("heartbeat_mono", self._mono())
        self._status = self._status.model_copy(update=fields)
        return self._write(force)

    def _write(self, force: bool) -> bool:
        """Write the in-memory status unless the backoff says wait; True if it reached the file."""
        # Caller holds self._lock. The memory copy is the truth; the file follows when it can.
        assert self._status is not None
        if not (force or self._status_backoff.ready()):
            return False
        status = self._status.model_copy(
            update={
                "write_failures": self.failures.count,
                "last_write_error": self.failures.last_error,
                "metrics_dropped": self._spool.dropped,
            }
        )
        try:
            self._status = self.writer.write(status)
        except OSError as exc:  # StatusWriteError, StatusLockTimeout: degrade, never kill
            self._status = status
            self.failures.record(exc, "status")
            self._status_backoff.failed()
            return False
        if self._status_backoff.failing:
            self._status_backoff.succeeded()
            self.failures.resumed("status", self.failures.count)
        return True

    def start(self, payload: Payload | dict | None = None) -> None:
        """Write the first snapshot (state=starting) and start the heartbeat thread."""
        with self._lock:
            now_wall, now_mono = self._now_wall(), self._mono()
            pid = os.getpid()
            self._status = ProcessStatus(
                name=self.name,
                kind=self.kind,
                host=socket.gethostname(),
                pid=pid,
                pid_start_time=psutil.Process(pid).create_time(),
                state=State.STARTING,
                started_at=now_wall,
                heartbeat_wall=now_wall,
                heartbeat_mono=now_mono,
                gpus=self._gpus,
                payload=payload_for(self.kind, payload),
            )
            self._write(force=True)
        self.heartbeat.start()

    def beat(self) -> None:
        """One heartbeat: refresh heartbeat_wall/heartbeat_mono only (never the progress clock).

        Also the retry clock of a failing channel: queued metrics go out from here
        when nothing else writes them."""
        with self._lock:
            if self._status is not None:
                self._publish()
        self._spool.retry()

    def set_state(self, state: State, error: str | None = None) -> None:
        """Move to `state`; `error` becomes last_error (kept when None). Tried at once, even in backoff."""
        with self._lock:
            fields: dict[str, Any] = {"state": State(state)}
            if error is not None:
                fields["last_error"] = error
            self._publish(force=True, **fields)

    def _merged_payload(self, fields: dict[str, Any]) -> Payload:
        if self._status is None:
            raise RuntimeError(f"ProcessReporter({self.name!r}): call start() first")
        current = self._status.payload
        base = {} if current is None else (current if isinstance(current, dict) else current.model_dump())
        return payload_for(self.kind, {**base, **fields})

    def progress(self, **payload_fields: Any) -> None:
        """Record progress (a finished step): moves the progress clock and merges the payload."""
        with self._lock:
            now_wall, now_mono = self._now_wall(), self._mono()
            self._publish(
                payload=self._merged_payload(payload_fields),
                progress_wall=now_wall,
                progress_mono=now_mono,
                heartbeat_wall=now_wall,
                heartbeat_mono=now_mono,
            )

    def update_payload(self, **payload_fields: Any) -> None:
        """Merge into the payload without moving the progress clock."""
        with self._lock:
            self._publish(payload=self._merged_payload(payload_fields))

    def metrics(self, records: list[dict]) -> None:
        """Append records to <name>.metrics.jsonl (batched into as few writes as rotation allows).

        A failed write keeps them queued (see keel.status.spool); raises only TypeError."""
        self._spool.append_many(records)

    def close(self, state: State = State.STOPPED, error: str | None = None) -> None:
        """Stop the heartbeat, flush queued metrics, write the final state, close files. Safe to call twice.

        Metrics still queued after one last attempt count as dropped in that final state."""
        self.heartbeat.stop()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._spool.close()
            if self._status is not None:
                self.set_state(state, error)
        self.writer.close()

    def __enter__(self) -> "ProcessReporter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            self.close()
        else:
            self.close(State.FAILED, f"{type(exc).__name__}: {exc}")
