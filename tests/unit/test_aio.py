"""dashboard.aio: blocking work off the loop with a timeout, and task hygiene."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time

import pytest

from dashboard.aio import BlockingRunner, BlockingTimeout, StillRunning, TaskSet, sleep_until_or_stop


def run(coro):
    return asyncio.run(coro)


async def until(predicate, timeout: float = 30.0) -> None:
    """Yield to the loop until `predicate()` holds; the timeout only bounds the wait."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {predicate}"
        await asyncio.sleep(0.01)


def test_returns_the_result_and_does_not_block_the_loop():
    runner = BlockingRunner()
    ticked = threading.Event()  # set by a task on the loop; the job waits for it

    async def main():
        async def ticker():
            for _ in range(5):
                await asyncio.sleep(0.01)
            ticked.set()

        t = asyncio.get_running_loop().create_task(ticker())
        # a job that blocked the loop would wait in vain: only the loop's ticker can release it
        result = await runner.run(lambda: 42 if ticked.wait(60) else None, timeout=120, what="slow")
        await t
        return result

    assert run(main()) == 42
    runner.close()


def test_exception_is_logged_and_reraised(caplog):
    runner = BlockingRunner()

    def boom():
        raise OSError(5, "I/O error")

    with caplog.at_level(logging.ERROR, logger="dashboard.aio"):
        with pytest.raises(OSError):
            run(runner.run(boom, timeout=1, what="read x"))
    rec = [r for r in caplog.records if r.getMessage() == "read x failed"]
    assert rec and rec[0].exc_info and rec[0].event == "blocking_error"
    runner.close()


def test_timeout_then_still_running_then_late_outcome_logged(caplog):
    runner = BlockingRunner()
    release = threading.Event()

    def hang():
        release.wait(5)
        raise ValueError("late failure")

    async def main():
        with pytest.raises(BlockingTimeout) as e:
            await runner.run(hang, timeout=0.1, what="scan")
        assert isinstance(e.value, TimeoutError) and e.value.what == "scan"
        # the same job again while the first is stuck: refused without waiting for it, no new thread
        threads = threading.active_count()
        with pytest.raises(StillRunning):
            await runner.run(hang, timeout=5, what="scan")
        assert not release.is_set() and threading.active_count() == threads
        assert runner.busy() == ["scan"]
        # other work is not blocked by the stuck job
        assert await runner.run(lambda: "ok", timeout=1, what="other") == "ok"
        release.set()
        await until(lambda: not runner.busy())
        assert runner.busy() == []
        assert await runner.run(lambda: "again", timeout=1, what="scan") == "again"

    with caplog.at_level(logging.INFO, logger="dashboard.aio"):
        run(main())
    assert any(getattr(r, "event", "") == "blocking_late_error" and "late failure" in r.getMessage()
               for r in caplog.records)
    runner.close()


def test_a_late_result_goes_to_the_next_call_when_asked_and_is_read_again_otherwise():
    # a tail read that timed out has read past its records: dropping its result would lose them
    runner = BlockingRunner()
    release = threading.Event()
    calls = []

    def read(n):
        calls.append(n)
        if n == 1:
            release.wait(5)
        return [f"record {n}"]

    async def main():
        with pytest.raises(BlockingTimeout):
            await runner.run(read, 1, timeout=0.1, what="metrics", late=True)
        release.set()
        await until(lambda: not runner.busy())
        assert await runner.run(read, 2, timeout=5, what="metrics", late=True) == ["record 1"]
        assert await runner.run(read, 3, timeout=5, what="metrics", late=True) == ["record 3"]
        assert calls == [1, 3]  # the call that got the late result ran nothing
        # without late (a snapshot): the late result is dropped and the call reads afresh
        release.clear()
        with pytest.raises(BlockingTimeout):
            await runner.run(read, 1, timeout=0.1, what="scan")
        release.set()
        await until(lambda: not runner.busy())
        assert await runner.run(read, 4, timeout=5, what="scan") == ["record 4"]

    run(main())
    runner.close()


def test_no_task_exception_was_never_retrieved(caplog):
    """A failed task is logged when it fails; asyncio has nothing left to complain about."""
    seen: list[dict] = []

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, ctx: seen.append(ctx))
        tasks = TaskSet()

        async def fails():
            raise RuntimeError("kaput")

        tasks.spawn(fails(), name="fails")
        await until(lambda: len(tasks) == 0)
        assert tasks.failures and tasks.failures[0][0] == "fails"
        gc.collect()
        await asyncio.sleep(0)

    with caplog.at_level(logging.ERROR, logger="dashboard.aio"):
        run(main())
    gc.collect()
    assert seen == []
    assert any("task fails failed" in r.getMessage() for r in caplog.records)


def test_taskset_close_cancels_and_waits():
    async def main():
        tasks = TaskSet()
        stopped = []
        started = asyncio.Event()

        async def forever():
            started.set()
            try:
                await asyncio.sleep(100)
            finally:
                stopped.append(True)

        t = tasks.spawn(forever(), name="forever")
        await started.wait()
        await tasks.close(timeout=30)
        return t, stopped

    t, stopped = run(main())
    assert t.cancelled() and stopped == [True]


def test_timeout_during_shutdown_cancellation_keeps_job_tracked():
    runner = BlockingRunner()
    release = threading.Event()
    entered = threading.Event()

    def hang():
        entered.set()
        release.wait(60)

    async def main():
        task = asyncio.get_running_loop().create_task(runner.run(hang, timeout=120, what="hang"))
        await until(entered.is_set)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert runner.busy() == ["hang"]
        release.set()

    run(main())
    runner.close()


def test_sleep_until_or_stop():
    async def main():
        stop = asyncio.Event()
        assert await sleep_until_or_stop(stop, 0.01) is False
        asyncio.get_running_loop().call_later(0.01, stop.set)
        # an hour's sleep that returns (within the bound) returned because of the stop
        return await asyncio.wait_for(sleep_until_or_stop(stop, 3600), 60)

    assert run(main()) is True
