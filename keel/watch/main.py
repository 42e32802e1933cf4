"""The watchdog process: ``python -m keel.watchdog --config build/<env>/watchdog.json`` (``bin/watchdog``).

Loads its resolved file and ``keel.json``, polls on a fixed grid until SIGTERM, follows
``keel.json`` when render-config rewrites it, and publishes its own status.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

from keel.control.factory import backend_for
from keel.host.sampling import ResourceSampler
from keel.render.contract import ContractError, load_process_file, load_stack
from keel.status.models import State
from keel.watch.settings import WatchdogSettings
from keel.watch.watchdog import Watchdog

log = logging.getLogger("keel.watchdog")


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def run(watchdog: Watchdog, stop: threading.Event, *, on_poll: Callable[[], None] | None = None) -> None:
    """Poll every ``poll_interval`` (on a fixed grid, so slow polls do not drift) until ``stop`` is set."""
    interval = watchdog.settings.poll_interval
    next_poll = watchdog.clock()
    while not stop.is_set():
        try:
            watchdog.poll_once()
            watchdog.write_prom()
            if on_poll is not None:
                on_poll()
        except Exception as exc:  # noqa: BLE001 - the watchdog must outlive its own bugs
            log.exception("poll failed")
            watchdog.emit(process=None, action="internal_error", reason=f"{type(exc).__name__}: {exc}")
        next_poll += interval
        now = watchdog.clock()
        if next_poll < now:  # we fell behind (a long restart): skip, don't burst
            next_poll = now + interval
        stop.wait(next_poll - now)


def main(argv: list[str] | None = None) -> int:
    """``python -m keel.watchdog --config build/<env>/watchdog.json``. Exit 0 on SIGTERM/SIGINT, 2 on bad config."""
    parser = argparse.ArgumentParser(prog="watchdog", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the watchdog's resolved file, build/<env>/watchdog.json")
    args = parser.parse_args(argv)

    from keel.logs import setup_logging  # imported here: no logging set-up at import time
    from keel.status.models import WatchdogStatus, utc_now
    from keel.status.reporter import ProcessReporter

    try:
        settings = WatchdogSettings.from_process_file(load_process_file(args.config), args.config)
        stack = load_stack(settings.stack)
    except ContractError as exc:  # names the file and the key
        print(f"watchdog: cannot load configuration: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.name, fmt=settings.log_format, level=settings.log_level)  # type: ignore[arg-type]

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    settings.run_dir.mkdir(parents=True, exist_ok=True)
    watchdog = Watchdog(stack, settings, backend=backend_for(stack), sampler=ResourceSampler())
    reporter = ProcessReporter(settings.run_dir, settings.name, "watchdog",
                               heartbeat_interval=settings.heartbeat_interval)
    reporter.start(payload=WatchdogStatus(processes_watched=sorted(watchdog.watched)))
    reporter.set_state(State.RUNNING)
    watchdog.emit(process=None, action="started",
                  reason=f"watching {', '.join(sorted(watchdog.watched)) or 'nothing'} every {settings.poll_interval:g}s")

    stack_mtime = _mtime(settings.stack)

    def on_poll() -> None:
        nonlocal stack_mtime
        reporter.progress(last_poll=utc_now(), **watchdog.status_fields())
        mtime = _mtime(settings.stack)
        if mtime != stack_mtime:  # bin/render-config rewrote keel.json: follow it without a restart
            stack_mtime = mtime
            try:
                new = load_stack(settings.stack)
                watchdog.set_stack(new, backend_for(new))
                watchdog.emit(process=None, action="stack_reloaded",
                              reason=f"{settings.stack} changed; watching {', '.join(sorted(watchdog.watched))}")
            except ContractError as exc:
                watchdog.emit(process=None, action="stack_reload_failed", reason=f"{settings.stack}: {exc}")

    try:
        run(watchdog, stop, on_poll=on_poll)
    finally:
        watchdog.emit(process=None, action="stopped", reason="signal received")
        watchdog.close()
        watchdog.sampler.close()
        reporter.close(State.STOPPED)
    return 0


if __name__ == "__main__":
    sys.exit(main())
