"""A real full filesystem under a real trainer: the status channel degrades, training goes on.

The run dir is a 2 MiB tmpfs mounted by the test (root only); a filler file takes
every byte of it. The trainer must keep its pid and keep stepping (its checkpoints,
on another filesystem, prove it), and when the filler goes its status resumes by
itself carrying the failure count and the ENOSPC error, and the metrics records
produced while the disk was full are written from memory, in order.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from keel.status.models import State
from tests.integration.trainer_fixtures import gone, start_trainer, write_config
from tests.support import is_alive, wait_until
from trainer.checkpoint import CheckpointStore

pytestmark = pytest.mark.slow


def mount_tmpfs(path: Path, size: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; run as root to test a real full filesystem")
    path.mkdir(parents=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")


def fill(path: Path) -> None:
    """Write `path` until the filesystem is full, ending with 1-byte writes so no page is left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (1 << 16, 1 << 12, 1):
            while True:
                try:
                    os.write(fd, b"\0" * chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    finally:
        os.close(fd)


def logged(tp, event: str) -> list[dict]:
    return [r for r in tp.log_records() if r.get("event") == event]


def test_full_run_dir_degrades_status_and_metrics_and_both_resume(tmp_path, reaper):
    run_dir = tmp_path / "run"
    mount_tmpfs(run_dir, "2M")
    tp = None
    try:
        config = write_config(tmp_path, num_workers=0, val_every_steps=1_000_000, checkpoint={"every_seconds": "1s"})
        tp = start_trainer(reaper, config)
        assert tp.run_dir == run_dir
        store = CheckpointStore(tp.checkpoint_dir)
        wait_until(lambda: tp.step() >= 20, 120, what="trainer stepping")
        pid = tp.status().pid
        assert pid == tp.pid

        filler = run_dir / "filler"
        fill(filler)
        t_full = time.time()
        step_full = tp.step()
        # Writes now fail; the trainer says so once (per kind) in its log, and goes on.
        failed = wait_until(lambda: logged(tp, "status_write_failed"), 60, what="a logged ENOSPC write failure")
        assert failed[0]["kind"] == "ENOSPC", failed
        wait_until(lambda: store.steps() and store.steps()[-1][0] > step_full + 20, 120,
                   what="checkpoints (on another filesystem) moving on while the run dir is full")
        assert tp.proc.poll() is None, "the trainer died on a full run dir"
        assert len([r for r in logged(tp, "status_write_failed") if r["kind"] == "ENOSPC"]) == 1  # logged once

        filler.unlink()
        t_free = time.time()
        st = wait_until(lambda: (s := tp.status()) and s.payload.step > step_full and s.write_failures > 0 and s, 60,
                        what="status resumed after space returned")
        assert st.pid == pid and st.state is State.RUNNING
        assert "ENOSPC" in st.last_write_error and "No space left on device" in st.last_write_error
        assert st.metrics_dropped == 0  # 4 MiB of buffer was plenty: nothing given up on

        # The records made while the disk was full were kept in memory and written, in order.
        def full_window_records():
            recs = tp.metrics()  # json.loads of every line: a cut line would fail here
            return [r for r in recs if "loss" in r and t_full < r["t"] < t_free] and recs

        records = wait_until(full_window_records, 60, what="metrics of the full-disk window written")
        steps = [r["step"] for r in records if "loss" in r]  # the summary records
        assert steps == sorted(steps) and len(set(steps)) == len(steps), "out of order or repeated"
        assert any(r["step"] > step_full for r in records if t_full < r["t"] < t_free)

        os.kill(tp.pid, signal.SIGTERM)
        assert tp.wait(timeout=60) == 0
        assert tp.status().state is State.STOPPED
    finally:
        if tp is not None and tp.proc.poll() is None:
            os.kill(tp.pid, signal.SIGKILL)
            tp.wait(timeout=30)
        if subprocess.run(["umount", str(run_dir)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(run_dir)], check=False)
    assert not os.path.ismount(run_dir)
    assert gone([tp.pid]) and not is_alive(tp.pid)
