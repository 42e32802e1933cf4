"""dashboard.watcher and dashboard.inotify: the run dir's inotify watch and stat poll, the cycle pacing, and the
collector loop that uses them."""

from __future__ import annotations

import asyncio
import os
import shutil
import time

import pytest

from keel.status.models import State
from keel.status.reporter import ProcessReporter

from dashboard import inotify, watcher
from dashboard.collector import Collector
from dashboard.watcher import POLL_S, QUIET_AFTER_S, QUIET_SAMPLE_EVERY, Cycle, Pacer, RunDirWatcher, kept_errors, run_dir_signature
from tests.unit.test_dashboard_page import make_cfg

QUIET_AFTER_S_INT = int(QUIET_AFTER_S)
WAIT = 20.0  # bounds the condition waits only; each is met in a few tenths of a second


def test_signature_sees_a_replace_and_an_append_but_not_temps_locks_or_the_own_status(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "trainer.status.json").write_text("{}")
    (d / "trainer.metrics.jsonl").write_text("{}\n")
    w = RunDirWatcher(str(d), own_name="dashboard")
    assert w.changed()  # the first poll always reads
    assert not w.changed()
    # not watched: a write in flight, a writers' lock, the dashboard's own status
    (d / ".trainer.status.json.1.tmp").write_text("x")
    (d / "trainer.lock").write_text("")
    (d / "dashboard.status.json").write_text("{}")
    assert not w.changed()
    # an atomic replace (new inode, same size and maybe the same mtime tick)
    tmp = d / ".t"
    tmp.write_text("{}")
    os.replace(tmp, d / "trainer.status.json")
    assert w.changed() and not w.changed()
    with open(d / "trainer.metrics.jsonl", "a") as f:  # an append: new size
        f.write("{}\n")
    assert w.changed() and not w.changed()
    (d / "watchdog.status.json").write_text("{}")  # a new process
    assert w.changed()
    assert w.polls == 8


def test_signature_of_a_missing_run_dir_is_none_and_its_creation_is_a_change(tmp_path):
    d = tmp_path / "run"
    assert run_dir_signature(str(d)) is None
    w = RunDirWatcher(str(d))
    assert w.changed() and not w.changed()
    d.mkdir()
    assert w.changed()  # empty, but listable now: the scan's "no run dir" error must clear


def test_pacer_full_at_first_and_every_refresh_files_only_on_a_change():
    p = Pacer(refresh=30.0)
    assert p.due(100.0, changed=False) is Cycle.FULL
    p.ran(Cycle.FULL, 100.0)
    assert p.due(100.1, changed=False) is None
    assert p.due(100.2, changed=True) is Cycle.FILES
    p.ran(Cycle.FILES, 100.2)
    assert p.due(129.9, changed=False) is None
    assert p.due(130.0, changed=False) is Cycle.QUIET  # nothing written for 29.8 s: no resource sample
    assert p.due(130.0, changed=True) is Cycle.FULL  # a full cycle reads the files too
    assert p.until_full(140.0) == 0.0
    p.ran(Cycle.FULL, 130.0)
    assert p.until_full(140.0) == 20.0


def test_a_quiet_run_dir_is_sampled_every_few_refreshes_and_a_write_ends_the_quiet():
    p = Pacer(refresh=1.0)
    kinds = []
    for t in range(0, 30):  # one call a second, nothing written after t=0
        kind = p.due(float(t), changed=(t == 0))
        kinds.append(kind)
        p.ran(kind, float(t))
    quiet_part = kinds[QUIET_AFTER_S_INT:]
    assert all(k is Cycle.FULL for k in kinds[:QUIET_AFTER_S_INT])
    assert Cycle.QUIET in quiet_part and Cycle.FULL in quiet_part
    # while quiet, a resource sample every QUIET_SAMPLE_EVERY refreshes
    full_at = [t for t, k in enumerate(kinds) if k is Cycle.FULL and t >= QUIET_AFTER_S_INT]
    assert all(b - a == QUIET_SAMPLE_EVERY for a, b in zip(full_at, full_at[1:])), full_at
    assert p.due(29.5, changed=True) is Cycle.FILES
    p.ran(Cycle.FILES, 29.5)
    assert p.due(30.0, changed=False) is Cycle.FULL  # written 0.5 s ago: sampled at every refresh again


def test_a_files_cycle_keeps_the_errors_of_reads_it_does_not_make():
    prev = {"resources": "resources: timed out", "logs": "logs: EIO", "own status": "own status: ENOSPC",
            "status scan": "status scan: hung", "metrics trainer": "ValueError: x"}
    assert kept_errors(prev, Cycle.FILES) == {k: prev[k] for k in ("resources", "logs", "own status")}
    assert kept_errors(prev, Cycle.QUIET) == {"resources": prev["resources"]}
    assert kept_errors(prev, Cycle.FULL) == {}


def _run_loop(cfg, body, use_inotify=True):
    """Start a real collector loop on a fresh event loop, run ``body(collector)`` (a coroutine), stop it."""

    async def main():
        c = Collector(cfg, use_inotify=use_inotify)
        c.start()
        try:
            return await body(c)
        finally:
            await c.stop()

    return asyncio.run(main())


async def _until(cond, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def _step(c: Collector) -> int | None:
    s = c.statuses.get("trainer")
    payload = getattr(s, "payload", None)
    return getattr(payload, "step", None)


@pytest.mark.parametrize("use_inotify", [True, False], ids=["inotify", "poll"])
def test_a_write_in_the_run_dir_is_read_without_waiting_for_the_refresh(tmp_path, use_inotify):
    cfg = make_cfg(tmp_path, refresh=30.0)  # a full cycle every 30 s: only a change can explain a new read
    rep = ProcessReporter(cfg.run_dir, "trainer", "trainer", heartbeat_interval=3600)
    rep.start({"run_id": "unit"})
    rep.set_state(State.RUNNING)
    rep.progress(step=1, loss=1.0)
    try:
        async def body(c: Collector):
            await _until(lambda: c.cycles >= 1 and _step(c) == 1, "the first (full) cycle, applied")
            assert c.watch.how == "inotify" if use_inotify else c.watch.how.startswith("a stat poll")
            notified = []
            c.subscribe(lambda: notified.append(_step(c)))
            samples = len(c.resources)  # a full cycle samples resources; a files-only cycle does not
            rep.progress(step=2, loss=0.5)
            rep.metrics([{"step": 2, "loss": 0.5}])
            await _until(lambda: _step(c) == 2 and "trainer" in c.metrics, "the new step, read on the change")
            await _until(lambda: 2 in notified, "the sessions notified")
            return len(c.resources) - samples, c.metrics["trainer"].latest("loss")

        full_cycles, loss = _run_loop(cfg, body, use_inotify)
        assert full_cycles == 0 and loss == 0.5  # read by a files-only cycle, not the next full one (30 s on)
    finally:
        rep.close()


def test_a_long_history_is_read_in_at_once_not_a_chunk_per_refresh(tmp_path):
    from dashboard.rundir import METRICS_PER_CYCLE

    cfg = make_cfg(tmp_path, refresh=30.0)  # nothing writes after the start: only catching up reads again
    rep = ProcessReporter(cfg.run_dir, "trainer", "trainer", heartbeat_interval=3600)
    rep.start({"run_id": "unit"})
    n = 2 * METRICS_PER_CYCLE + 5  # three cycles' worth
    rep.metrics([{"step": i, "loss": 1.0} for i in range(n)])
    try:
        async def body(c: Collector):
            await _until(lambda: "trainer" in c.metrics and len(c.metrics["trainer"]) == n, "the whole history")
            await _until(lambda: not c.catching_up, "the catching up done")
            return c.cycles

        assert _run_loop(cfg, body) >= 3  # in under WAIT s; a chunk per refresh would take 60 s
    finally:
        rep.close()


def test_an_unchanged_run_dir_is_polled_but_not_read(tmp_path):
    cfg = make_cfg(tmp_path, refresh=30.0)
    rep = ProcessReporter(cfg.run_dir, "trainer", "trainer", heartbeat_interval=3600)
    rep.start({"run_id": "unit"})
    rep.set_state(State.RUNNING)
    rep.progress(step=1, loss=1.0)
    try:
        async def body(c: Collector):
            await _until(lambda: c.cycles >= 1 and _step(c) == 1, "the first (full) cycle")
            # The first poll may race the first cycle's own writes: let it settle on one signature.
            await _until(lambda: c.watcher.polls >= 3, "three polls")
            cycles, polls = c.cycles, c.watcher.polls
            await _until(lambda: c.watcher.polls >= polls + 10, "ten more polls")
            return cycles, c.cycles

        before, after = _run_loop(cfg, body, use_inotify=False)
        assert before >= 1 and after == before  # ten polls of an unchanged dir, no read
    finally:
        rep.close()


def test_a_slow_poll_is_made_less_often():
    def slow(run_dir, ignore):
        end = time.thread_time() + 0.002  # 2 ms of CPU (the watcher measures CPU, not wall time)
        while time.thread_time() < end:
            pass
        return ()

    w = RunDirWatcher("/nonexistent", signature=slow)
    assert w.delay == POLL_S
    w.changed()
    assert w.delay >= 0.4  # 2 ms a poll: at most 1/200 of a core
    fast = RunDirWatcher("/nonexistent", signature=lambda d, i: ())
    fast.changed()
    assert fast.delay == POLL_S


def _replace(path, text: str) -> None:
    """An atomic write, as the status layer makes one: a dot temp, then a rename into place."""
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)


def test_inotify_wakes_on_what_the_poll_stamps_and_not_on_temps_locks_or_the_own_status(tmp_path):
    cfg = make_cfg(tmp_path, refresh=30.0)
    run = tmp_path / "run"
    (run / "incidents").mkdir()
    _replace(run / "trainer.status.json", "{}")

    async def body(c: Collector):
        await _until(lambda: c.cycles >= 1, "the first (full) cycle")
        w = c.watch.inotify
        assert w is not None and c.watch.how == "inotify"
        seen, cycles = w.events, c.cycles
        # no news: a write in flight and its rename into the own status, a writers' lock (made, then
        # flocked: flock makes no event), a lock file touched
        _replace(run / "dashboard.status.json", "{}")
        (run / "trainer.lock").write_text("")
        os.utime(run / "trainer.lock")
        await _until(lambda: w.events >= seen + 5, "the kernel's events for them, read")
        assert c.cycles == cycles
        grown = []
        for what, change in [
            ("a status replaced", lambda: _replace(run / "trainer.status.json", '{"a": 1}')),
            ("a log grown", lambda: open(run / "trainer.metrics.jsonl", "a").write("{}\n")),
            ("an entry touched", lambda: os.utime(run / "trainer.status.json")),
            ("an entry in a subdirectory", lambda: (run / "incidents" / "0001").mkdir()),
            ("a new subdirectory", lambda: (run / "runs").mkdir()),
            ("an entry in the new one", lambda: (run / "runs" / "r1").mkdir()),
            ("an entry removed", lambda: os.unlink(run / "trainer.metrics.jsonl")),
        ]:
            before = c.cycles
            change()
            await _until(lambda: c.cycles > before, what)
            grown.append(what)
        return grown

    assert len(_run_loop(cfg, body)) == 7


def test_a_run_dir_removed_under_inotify_is_polled_and_read_again_when_it_comes_back(tmp_path):
    cfg = make_cfg(tmp_path, refresh=30.0)
    run = tmp_path / "run"

    async def body(c: Collector):
        await _until(lambda: c.cycles >= 1, "the first (full) cycle")
        assert c.watch.how == "inotify"
        shutil.rmtree(run)
        await _until(lambda: c.watch.inotify is None, "the watch ended")
        assert "removed, moved or unmounted" in c.watch.how
        await _until(lambda: c.watcher.polls >= 2, "the poll running")
        run.mkdir()
        rep = ProcessReporter(str(run), "trainer", "trainer", heartbeat_interval=3600)
        rep.start({"run_id": "unit"})
        try:
            rep.set_state(State.RUNNING)
            rep.progress(step=7, loss=1.0)
            await _until(lambda: _step(c) == 7, "the status written in the new run dir, read by the poll")
        finally:
            rep.close()
        return c.watcher.polls

    assert _run_loop(cfg, body) >= 1


def test_a_run_dir_on_a_network_filesystem_is_polled_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(watcher, "remote_fs", lambda path: "nfs")  # a seam: no NFS mount here
    cfg = make_cfg(tmp_path, refresh=30.0)

    async def body(c: Collector):
        await _until(lambda: c.watcher.polls >= 3, "three polls")
        return c.watch.how, c.watch.inotify

    how, ino = _run_loop(cfg, body)
    assert ino is None and how == "a stat poll every 0.05 s (on nfs, inotify misses other hosts' writes)"


def test_the_filesystem_type_is_read_from_statfs(tmp_path):
    assert inotify.fs_type("/proc") == 0x9FA0  # PROC_SUPER_MAGIC: the struct's first field is read right
    assert inotify.remote_fs(str(tmp_path)) is None
    with pytest.raises(FileNotFoundError):
        inotify.fs_type(str(tmp_path / "missing"))
