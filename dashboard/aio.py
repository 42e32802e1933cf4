"""Run blocking work off an asyncio event loop, with a timeout, and own the tasks we start.

Two small tools for long-lived loops (the dashboard's collector, the watchdog):

``BlockingRunner.run(fn, *args, timeout=..., what=...)`` runs ``fn`` in the
runner's own thread pool and waits at most ``timeout`` seconds. Every
exception is logged and re-raised to the caller; a timeout raises
``BlockingTimeout``. A thread cannot be killed, so a job that timed out keeps
running: the runner remembers it, refuses to start the same ``what`` again
while it is still running (``StillRunning``, so a hung NFS read cannot pile up
threads), and logs how the abandoned job ended when it finally does.

``TaskSet.spawn(coro, name=...)`` keeps a strong reference to each task (the
loop itself keeps only weak ones, so an unreferenced task can vanish), logs any
exception the moment a task fails (no "Task exception was never retrieved"),
and ``await close()`` cancels and awaits what is left.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from typing import Any, Callable, Coroutine, TypeVar

log = logging.getLogger("dashboard.aio")
T = TypeVar("T")


class BlockingTimeout(TimeoutError):
    """A blocking job ran past its timeout; it may still be running in its thread."""

    def __init__(self, what: str, timeout: float) -> None:
        super().__init__(f"{what}: no answer after {timeout:g}s")
        self.what = what
        self.timeout = timeout


class StillRunning(RuntimeError):
    """The previous job with the same name has not finished yet (it timed out earlier)."""

    def __init__(self, what: str, running_for: float) -> None:
        super().__init__(f"{what}: previous run still busy after {running_for:.1f}s")
        self.what = what
        self.running_for = running_for


class BlockingRunner:
    """Runs blocking callables in a private thread pool with a timeout each."""

    def __init__(self, max_workers: int = 2, thread_name_prefix: str = "keel-blocking") -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix=thread_name_prefix
        )
        # what -> (start monotonic, future) for jobs still running after their caller gave up
        self._abandoned: dict[str, tuple[float, concurrent.futures.Future]] = {}
        self._closed = False

    async def run(self, fn: Callable[..., T], *args: Any, timeout: float, what: str = "",
                  late: bool = False) -> T:
        """Run ``fn(*args)`` in the pool; return its result or raise (after logging) its exception.

        Raises ``BlockingTimeout`` after ``timeout`` seconds and ``StillRunning``
        while an earlier, timed-out run with the same ``what`` has not returned.
        ``late``: once that earlier run has returned, the next call returns its result (and runs
        nothing): for a read whose result is a delta (a tail's new records, read past for good by
        the time it returns), which would be lost for good if dropped; a snapshot is just read again.
        """
        what = what or getattr(fn, "__qualname__", repr(fn))
        if self._closed:
            raise RuntimeError(f"{what}: runner is closed")
        stuck = self._abandoned.get(what)
        if stuck is not None:
            started, fut = stuck
            if not fut.done():
                raise StillRunning(what, time.monotonic() - started)
            del self._abandoned[what]
            if late and not fut.cancelled() and fut.exception() is None:
                return fut.result()
        started = time.monotonic()
        cfut = self._pool.submit(fn, *args)
        afut = asyncio.wrap_future(cfut)
        try:
            # shield: on timeout we stop waiting but must not mark the asyncio
            # wrapper cancelled before we attach our own completion logging.
            return await asyncio.wait_for(asyncio.shield(afut), timeout)
        except (TimeoutError, asyncio.TimeoutError):
            self._abandon(what, started, cfut, afut)
            log.warning("%s timed out after %.3gs", what, timeout, extra={"event": "blocking_timeout"})
            raise BlockingTimeout(what, timeout) from None
        except asyncio.CancelledError:
            # our caller was cancelled (shutdown); the job runs on, its outcome is still logged
            self._abandon(what, started, cfut, afut)
            raise
        except Exception:
            log.exception("%s failed", what, extra={"event": "blocking_error"})
            raise

    def _abandon(
        self, what: str, started: float, cfut: concurrent.futures.Future, afut: asyncio.Future
    ) -> None:
        """Remember a job nobody waits for any more and log how it ends."""
        # Retrieve the asyncio wrapper's outcome so asyncio never reports it as unretrieved.
        afut.add_done_callback(_swallow)
        if cfut.cancel():
            return
        self._abandoned[what] = (started, cfut)

        def _report(f: concurrent.futures.Future) -> None:
            took = time.monotonic() - started
            if f.cancelled():
                return
            exc = f.exception()
            if exc is not None:
                log.error(
                    "%s finished late (%.1fs) with %s: %s", what, took, type(exc).__name__, exc,
                    extra={"event": "blocking_late_error"},
                )
            else:
                log.info("%s finished late (%.1fs)", what, took, extra={"event": "blocking_late"})

        cfut.add_done_callback(_report)

    def busy(self) -> list[str]:
        """Names of timed-out jobs that are still running."""
        return [w for w, (_, f) in self._abandoned.items() if not f.done()]

    def close(self) -> None:
        """Stop accepting work; do not wait for stuck threads (they are daemon-like workers)."""
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)


def _swallow(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


class TaskSet:
    """Owns background tasks: strong references, immediate failure logging, orderly cancel."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()
        self.failures: list[tuple[str, BaseException]] = []

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task:
        """Start ``coro`` as a task on the running loop and keep it until it ends."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()  # retrieving it is what silences asyncio's warning
        if exc is not None:
            self.failures.append((task.get_name(), exc))
            log.error(
                "task %s failed: %s: %s", task.get_name(), type(exc).__name__, exc,
                exc_info=exc, extra={"event": "task_failed"},
            )

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self, timeout: float = 5.0) -> None:
        """Cancel every task and wait (at most ``timeout``) for them to finish."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=timeout)
            for t in pending:
                log.warning("task %s did not stop within %gs", t.get_name(), timeout)


async def sleep_until_or_stop(stop: asyncio.Event, delay: float) -> bool:
    """Sleep ``delay`` seconds or until ``stop`` is set; True when stopped."""
    try:
        await asyncio.wait_for(stop.wait(), delay)
        return True
    except (TimeoutError, asyncio.TimeoutError):
        return False
