"""Wait until every process of a stack is healthy, as bin/status judges it (keel.stack.view)."""

from __future__ import annotations

import time
from typing import Callable

from keel.control.factory import backend_for
from keel.host.sampling import ResourceSampler
from keel.render.contract import StackFile
from keel.stack.view import ProcessView, all_healthy, collect
from keel.status.reader import StatusReader


def progress_line(views: list[ProcessView]) -> str:
    """`waiting: trainer starting (no heartbeat yet), dashboard ok, ...`"""
    return "waiting: " + ", ".join(f"{v.name} {v.health}" + (f" ({v.reason})" if v.health != "ok" else "")
                                   for v in views)


def wait_healthy(stack: StackFile, timeout: float,
                 on_change: Callable[[str], None] | None = None) -> tuple[bool, list[ProcessView]]:
    """Poll once a second until all are healthy (True) or ``timeout`` passes (False); the last views.

    ``on_change`` gets the progress line each time it changes.
    """
    backend = backend_for(stack, timeout=10.0)
    reader, sampler = StatusReader(stack.paths.run_dir), ResourceSampler()
    deadline = time.monotonic() + timeout
    last_line = ""
    try:
        while True:
            views = collect(stack, backend, reader=reader, sampler=sampler)
            if all_healthy(views):
                return True, views
            line = progress_line(views)
            if line != last_line and on_change is not None:
                on_change(line)
                last_line = line
            if time.monotonic() >= deadline:
                return False, views
            time.sleep(1.0)
    finally:
        sampler.close()
