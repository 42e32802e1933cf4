"""Many writers, one status: 8 processes x 4 threads doing update() on one counter, readers alongside."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from keel.status.models import ProcessStatus
from keel.status.reader import StatusReader
from keel.status.snapshot import StatusWriter
from tests.integration.test_status_torture import fork
from tests.support import is_alive, wait_until
from tests.unit.test_statusfile import make_status

pytestmark = pytest.mark.slow

PROCS, THREADS, UPDATES = 8, 4, 20


def writer_proc(run: Path) -> int:
    w = StatusWriter(run, "counter", lock_timeout=60)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(UPDATES):
                w.update(payload=lambda p: {"count": p["count"] + 1})
        except BaseException as e:  # reported through the exit code
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return 1 if errors else 0


def reader_proc(run: Path, stop: Path, base_seq: int, report: Path) -> int:
    r = StatusReader(run)
    last, reads = base_seq, 0
    while not stop.exists():
        got = r.read("counter")
        reads += 1
        if not isinstance(got, ProcessStatus) or got.seq < last or got.payload["count"] != got.seq - base_seq:
            report.write_text(f"bad read after seq {last}: {got}")
            return 1
        last = got.seq
    report.write_text(f"ok {reads}")
    return 0


def test_no_lost_update_across_processes_and_threads(tmp_path, reaper):
    run = tmp_path / "run"
    run.mkdir()
    base = StatusWriter(run, "counter").write(make_status("counter", "custom", payload={"count": 0})).seq
    stop = tmp_path / "stop"
    readers = [fork(lambda i=i: reader_proc(run, stop, base, tmp_path / f"reader{i}.txt")) for i in range(2)]
    writers = [fork(lambda: writer_proc(run)) for _ in range(PROCS)]
    for pid in readers + writers:
        reaper.track(pid)
    writer_codes = []
    for pid in writers:  # a bounded wait: a writer starved of the lock fails here, not by a speed limit
        _, status = wait_until(lambda pid=pid: (got := os.waitpid(pid, os.WNOHANG)) != (0, 0) and got, 90,
                               interval=0.01, what=f"writer {pid} done")
        writer_codes.append(os.waitstatus_to_exitcode(status))
    assert writer_codes == [0] * PROCS
    stop.touch()
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in readers]
    reports = [(tmp_path / f"reader{i}.txt").read_text() for i in range(2)]
    assert codes == [0, 0], reports
    assert all(r.startswith("ok") and int(r.split()[1]) >= 1 for r in reports), reports
    final = StatusReader(run).read("counter")
    total = PROCS * THREADS * UPDATES
    assert final.payload == {"count": total} and final.seq == base + total
    assert sorted(p.name for p in run.iterdir()) == ["counter.lock", "counter.status.json"]
    assert not any(is_alive(p) for p in readers + writers)


def test_writer_exit_codes_reach_the_parent(tmp_path):
    """The fork helper reports a failing child: a writer without a snapshot to update fails."""
    pid = fork(lambda: writer_proc(tmp_path))
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 1
