"""When the collector reads: on a change in the run dir, and at ``refresh`` for the rest.

A status or metrics write must reach the page within 0.3 s, but the collector's
full cycle (status scan, tails, host/process/GPU sampling, log tails, its own
status write) every 0.1 s would cost idle CPU for nothing. So the collector is
woken by a change in the run dir and runs a ``FILES`` cycle (status scan, metrics
and events tails) then; the ``FULL`` cycle still runs every ``refresh``.

A change comes from the kernel (dashboard.inotify: a descriptor on the event loop,
nothing runs while nothing changes) where it can: a run dir on a local filesystem.
On a network filesystem (NFS, ...), which gets no inotify event for another host's
write, or where inotify cannot watch it, a thread stat-polls the run dir's entries
every ``POLL_S`` instead (``RunDirWatcher``: one ``scandir`` and an ``lstat`` per
entry). ``watch_run_dir`` picks one and says which, and why.

The poll's stamps are (name, inode, size, mtime_ns): a status snapshot is replaced by
rename (new inode), a metrics or events log grows (new size). Not watched, by either:
write temps (dot names), writers' lock files (flock does not touch them), and the
dashboard's own status file, which it rewrites every cycle (else every cycle would
trigger the next): ``ignored``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import threading
import time
from typing import Callable, Iterator

from keel.status.paths import LOCK_SUFFIX, STATUS_SUFFIX

from dashboard.inotify import InotifyWatch, remote_fs

log = logging.getLogger("dashboard.watcher")

POLL_S = 0.05  # the stat poll's period: worst case 0.05 s of the 0.3 s budget (~0.6 % of a core idle: the wakes)
# A run dir of many files (a 256-rank torchrun: ~1.6 ms a poll) is polled less often, so the
# poll never costs more than 1/POLL_BUDGET of a core: freshness then degrades, idle CPU does not.
POLL_BUDGET = 200

# inotify reports a write the moment it lands, and a trainer's step is a burst of writes (its metrics line,
# then its status snapshot, 1.0 ms later median, 3.5 ms p95, measured with keel's reporter): woken at the
# first, the collector read the burst in two or three cycles, and every tab updated for each (417 updates
# in a minute of 3 tabs instead of 360). The first change of a burst waits this long for the rest.
SETTLE_S = 0.02

Stamp = tuple[str, int, int, int]  # name, inode, size, mtime_ns
Signature = tuple[Stamp, ...] | None  # None: the run dir cannot be listed (the status scan says why)


class Cycle(enum.Enum):
    FULL = "full"  # everything, host resources and log tails included: every ``refresh``
    QUIET = "quiet"  # FULL but the resource sample, for a run dir quiet for QUIET_AFTER_S
    FILES = "files"  # the run dir's files only: on a change


# Nothing written for QUIET_AFTER_S: host/process/GPU samples every QUIET_SAMPLE_EVERY refreshes
# only. Each sample is a stream message to every open tab (~1 ms of Bokeh each), and a stack
# with nothing running has nothing new to show there; any write brings the 1-refresh pace back.
QUIET_AFTER_S = 10.0
QUIET_SAMPLE_EVERY = 5


# Errors of the reads only a FULL cycle makes: a FILES cycle keeps them as they were, so the
# page does not flash an error on and off between full cycles.
FULL_ONLY_ERRORS = ("resources", "logs", "own status")
QUIET_SKIPS_ERRORS = ("resources",)


def ignored(name: str, own: frozenset[str] = frozenset()) -> bool:
    """Is a run dir entry's change no news (a write temp, a lock file, the dashboard's own status: ``own``)?"""
    return name.startswith(".") or name.endswith(LOCK_SUFFIX) or name in own


def run_dir_signature(run_dir: str, ignore: frozenset[str] = frozenset(),
                      scandir: Callable[[str], Iterator[os.DirEntry]] = os.scandir) -> Signature:
    """The stamps of the watched files of ``run_dir``, sorted; None if the dir cannot be listed."""
    stamps: list[Stamp] = []
    try:
        entries = scandir(run_dir)
    except OSError:
        return None
    with entries as it:  # type: ignore[attr-defined]
        for e in it:
            name = e.name
            if ignored(name, ignore):
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:  # replaced or removed since readdir: the next poll sees what is there
                continue
            stamps.append((name, st.st_ino, st.st_size, st.st_mtime_ns))
    stamps.sort()
    return tuple(stamps)


class RunDirWatcher:
    """``changed()``: has any watched file of the run dir changed since the last call? (True at first.)"""

    def __init__(self, run_dir: str, own_name: str | None = None,
                 signature: Callable[[str, frozenset[str]], Signature] = run_dir_signature) -> None:
        self.run_dir = run_dir
        self.ignore = frozenset({f"{own_name}{STATUS_SUFFIX}"} if own_name else ())
        self._signature = signature
        self._last: Signature | object = _NEVER
        self.polls = 0
        self.delay = POLL_S  # seconds until the next poll (see POLL_BUDGET)

    def changed(self) -> bool:
        t0 = time.thread_time()  # CPU time, not wall: a poll preempted on a busy box is not a costly one
        try:
            sig = self._signature(self.run_dir, self.ignore)
        except OSError:  # a readdir that fails half-way (NFS): unlistable, like a missing dir
            sig = None
        self.delay = max(POLL_S, POLL_BUDGET * (time.thread_time() - t0))
        self.polls += 1
        if sig == self._last:
            return False
        self._last = sig
        return True

    def start_thread(self, on_change: Callable[[], None]) -> threading.Event:
        """Poll in a daemon thread, calling ``on_change`` (thread-safe, e.g. ``loop.call_soon_threadsafe``)
        after each poll that saw a change; set the returned event to stop it.

        A thread, not a job per poll on the event loop's thread pool: an idle poll then wakes
        nothing but this thread (a pool job per poll cost ~4x the CPU, measured). An unlistable
        run dir is one signature (None): a change once, which the status scan reports. A poll that
        hangs (NFS) stalls only this thread; the FULL cycle every ``refresh`` still reads and reports.
        """
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(self.delay):
                try:
                    hit = self.changed()
                except Exception:  # noqa: BLE001 - a bug here must not end the polling
                    log.exception("polling the run dir failed")
                    hit = False
                if hit and not stop.is_set():
                    on_change()

        threading.Thread(target=run, name="dashboard-watch", daemon=True).start()
        return stop


_NEVER = object()


class RunDirWatch:
    """Calls ``on_change`` on ``loop`` after each change in ``poll``'s run dir: from inotify (dashboard.inotify)
    on a local filesystem, else from ``poll``'s thread (a network filesystem, a run dir inotify cannot watch,
    ``use_inotify`` False). ``how`` says which, and why; ``stop()`` ends it. A run dir whose watch ends (removed,
    moved, unmounted) is polled from then on: the poll sees it come back."""

    def __init__(self, poll: RunDirWatcher, loop: asyncio.AbstractEventLoop, on_change: Callable[[], None],
                 use_inotify: bool = True) -> None:
        self._poll, self._loop, self._on_change = poll, loop, on_change
        self.inotify: InotifyWatch | None = None
        self._stop_poll: threading.Event | None = None
        self._settling: asyncio.TimerHandle | None = None  # a change seen, reported SETTLE_S after it
        if not use_inotify:
            self._start_poll("inotify not asked for")
            return
        try:
            fs = remote_fs(poll.run_dir)
            if fs is None:
                self.inotify = InotifyWatch(poll.run_dir, lambda name: ignored(name, poll.ignore))
        except OSError as exc:
            self._start_poll(f"inotify cannot watch it: {exc}")
            return
        if self.inotify is None:
            self._start_poll(f"on {fs}, inotify misses other hosts' writes")
            return
        loop.add_reader(self.inotify.fileno(), self._readable)
        self.how = "inotify"

    def _start_poll(self, why: str) -> None:
        self._stop_poll = self._poll.start_thread(lambda: self._loop.call_soon_threadsafe(self._on_change))
        self.how = f"a stat poll every {POLL_S:g} s ({why})"

    def _readable(self) -> None:
        w = self.inotify
        try:
            hit = w.read()
        except OSError:  # never seen; were it to happen, a read of the run dir is the safe answer
            log.exception("reading the run dir's inotify events failed")
            hit = True
        if w.gone:
            self._close_inotify()
            self._start_poll("its inotify watch ended: the run dir was removed, moved or unmounted")
            log.warning("run dir %s: %s", self._poll.run_dir, self.how, extra={"event": "run_dir_watch"})
        if hit and self._settling is None:
            self._settling = self._loop.call_later(SETTLE_S, self._settled)

    def _settled(self) -> None:
        self._settling = None
        self._on_change()

    def _close_inotify(self) -> None:
        if self.inotify is not None:
            self._loop.remove_reader(self.inotify.fileno())
            self.inotify.close()
            self.inotify = None

    def stop(self) -> None:
        if self._settling is not None:
            self._settling.cancel()
        self._close_inotify()
        if self._stop_poll is not None:
            self._stop_poll.set()


class Pacer:
    """Which cycle is due: FULL every ``refresh`` seconds (the first one at once; QUIET instead, most of the
    time, once nothing changed for QUIET_AFTER_S), FILES on a change."""

    def __init__(self, refresh: float) -> None:
        self.refresh = refresh
        self._last_full: float | None = None
        self._last_sample: float | None = None
        self._last_change: float | None = None

    def due(self, now: float, changed: bool) -> Cycle | None:
        if changed:
            self._last_change = now
        if self._last_full is None or now - self._last_full >= self.refresh:
            quiet = self._last_change is None or now - self._last_change >= QUIET_AFTER_S
            if quiet and self._last_sample is not None and \
                    now - self._last_sample < QUIET_SAMPLE_EVERY * self.refresh - 0.5 * self.refresh:
                return Cycle.QUIET
            return Cycle.FULL
        return Cycle.FILES if changed else None

    def until_full(self, now: float) -> float:
        """Seconds from ``now`` to the next FULL cycle."""
        return 0.0 if self._last_full is None else max(0.0, self._last_full + self.refresh - now)

    def ran(self, cycle: Cycle, started: float) -> None:
        """Record a cycle that began at ``started`` (so the next FULL is ``refresh`` after its start)."""
        if cycle is not Cycle.FILES:
            self._last_full = started
        if cycle is Cycle.FULL:
            self._last_sample = started


def kept_errors(previous: dict[str, str], cycle: Cycle) -> dict[str, str]:
    """The errors a cycle of kind ``cycle`` carries over from the last one (see FULL_ONLY_ERRORS)."""
    if cycle is Cycle.FULL:
        return {}
    keep = QUIET_SKIPS_ERRORS if cycle is Cycle.QUIET else FULL_ONLY_ERRORS
    return {k: v for k, v in previous.items() if k.startswith(keep)}


async def nothing() -> None:
    """Stands for a read a FILES cycle skips (in the collector's ``asyncio.gather``)."""
    return None


async def wait_any(a: asyncio.Event, b: asyncio.Event, timeout: float) -> None:
    """Until ``a`` or ``b`` is set, or ``timeout`` seconds."""
    if a.is_set() or b.is_set():
        return
    waits = [asyncio.ensure_future(a.wait()), asyncio.ensure_future(b.wait())]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
