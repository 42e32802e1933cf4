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


def test_returns_the_result_and_does_not_block_the_loop():
    runner = BlockingRunner()
    ticks = []

    async def main():
        async def ticker():
            for _ in range(5):
                ticks.append(time.monotonic())
                await asyncio.sleep(0.02)

        t = asyncio.get_running_loop().create_task(ticker())
        result = await runner.run(lambda: (time.sleep(0.15), 42)[1], timeout=2, what="slow")
        await t
        return result

    assert run(main()) == 42
    assert len(ticks) == 5  # the loop kept running while the job slept
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
        # the same job again while the first is stuck: refused at once, no new thread
        t0 = time.monotonic()
        with pytest.raises(StillRunning):
            await runner.run(hang, timeout=5, what="scan")
        assert time.monotonic() - t0 < 0.5
        assert runner.busy() == ["scan"]
        # other work is not blocked by the stuck job
        assert await runner.run(lambda: "ok", timeout=1, what="other") == "ok"
        release.set()
        for _ in range(100):
            if not runner.busy():
                break
            await asyncio.sleep(0.02)
        assert runner.busy() == []
        assert await runner.run(lambda: "again", timeout=1, what="scan") == "again"

    with caplog.at_level(logging.INFO, logger="dashboard.aio"):
        run(main())
    assert any(getattr(r, "event", "") == "blocking_late_error" and "late failure" in r.getMessage()
               for r in caplog.records)
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
        await asyncio.sleep(0.05)
        assert len(tasks) == 0
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

        async def forever():
            try:
                await asyncio.sleep(100)
            finally:
                stopped.append(True)

        t = tasks.spawn(forever(), name="forever")
        await asyncio.sleep(0)
        await tasks.close(timeout=2)
        return t, stopped

    t, stopped = run(main())
    assert t.cancelled() and stopped == [True]


def test_timeout_during_shutdown_cancellation_keeps_job_tracked():
    runner = BlockingRunner()
    release = threading.Event()

    async def main():
        task = asyncio.get_running_loop().create_task(runner.run(release.wait, 5, timeout=10, what="hang"))
        await asyncio.sleep(0.05)
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
        t0 = time.monotonic()
        assert await sleep_until_or_stop(stop, 5) is True
        return time.monotonic() - t0

    assert run(main()) < 1
