"""Stacks on request: a signal makes ``faulthandler`` write every thread's Python stack to a file.

The watchdog's fallback when py-spy is missing or fails (keel.watch.stacks). The file is
``<run_dir>/stackdump/<pid>.txt``; its first line says which signal to send and when the
registration happened, so the watchdog only signals a process that registered (the
signal's default action would kill any other) and never a reused pid (one started after
the line was written). A real-time signal, not SIGUSR1/2: those can be a process's
configured stop signal (``stop.signal``), and trainer/signals.py owns SIGTERM/SIGINT.

faulthandler writes from its C signal handler, so it answers even while the main
thread is blocked in a lock or a C call -- but not while the process is SIGSTOPped
(nothing runs then; the watchdog says so in the incident).
"""

from __future__ import annotations

import atexit
import faulthandler
import os
import signal
import time
from pathlib import Path
from typing import IO

from keel.status.paths import STACKDUMP_HEADER, stackdump_path

DUMP_SIGNAL = signal.SIGRTMIN + 6  # 40 on Linux; read from the file's header by the watchdog, not assumed

_handle: IO[str] | None = None


def register(run_dir: str | os.PathLike) -> Path | None:
    """Make ``DUMP_SIGNAL`` dump all threads' stacks to ``stackdump_path(run_dir, getpid())``. None if it cannot."""
    global _handle
    path = stackdump_path(run_dir, os.getpid())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "w", encoding="utf-8")  # noqa: SIM115 - faulthandler keeps the fd for our lifetime
        handle.write(STACKDUMP_HEADER.format(pid=os.getpid(), signal=int(DUMP_SIGNAL), registered=time.time()))
        handle.flush()
        faulthandler.register(DUMP_SIGNAL, file=handle, all_threads=True, chain=False)
    except (OSError, RuntimeError, ValueError):
        return None
    _handle = handle
    atexit.register(_unregister, path, os.getpid())
    return path


def _unregister(path: Path, pid: int) -> None:
    if os.getpid() != pid:  # a forked child (DataLoader worker) exiting: the file is its parent's
        return
    try:
        faulthandler.unregister(DUMP_SIGNAL)
        path.unlink()
    except (OSError, RuntimeError):
        pass
