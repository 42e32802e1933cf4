"""The real `python -m trainer`: trains, reports, checkpoints, resumes after SIGKILL, stops on SIGTERM."""

from __future__ import annotations

import os
import signal
import statistics

import pytest
import torch

from keel.status.models import State
from tests.integration.trainer_fixtures import NO_VALIDATION, gone, start_trainer, write_config
from tests.support import wait_until
from trainer.checkpoint import CheckpointStore, checkpoint_name

pytestmark = pytest.mark.slow


def _states(tp) -> list[str]:
    return [r["state"] for r in tp.log_records() if r.get("event") == "state"]


def test_trains_loss_falls_reports_and_stops_cleanly_on_sigterm_to_the_group(tmp_path, reaper):
    config = write_config(tmp_path, num_workers=2)
    tp = start_trainer(reaper, config)

    wait_until(lambda: tp.step() >= 500, 60, what="500 steps")
    st = tp.status()
    assert st.state == State.RUNNING and st.kind == "trainer" and st.pid == tp.pid
    assert st.progress_mono is not None and st.payload.device == "cpu" and st.payload.lr > 0
    workers = [p.pid for p in tp.children()]
    assert len(workers) == 2, f"expected 2 DataLoader workers, found {workers}"

    # The loss falls: validation loss and the training loss of the metrics records.
    records = tp.metrics()
    losses = [r["loss"] for r in records if "loss" in r]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(vals) >= 3, records
    assert vals[-1] < 0.9 * vals[0], vals
    assert statistics.mean(losses[-3:]) < statistics.mean(losses[:3]), losses
    for r in records:
        if "loss" in r:
            assert {"step", "lr", "samples_per_s", "grad_norm"} <= r.keys(), r
    assert [r["step"] for r in records] == sorted(r["step"] for r in records)
    # Throttled: at most one summary record per metrics_interval (0.2 s), not one per step.
    summaries = [r for r in records if "loss" in r]
    assert len(summaries) <= (summaries[-1]["t"] - summaries[0]["t"]) / 0.2 + 3  # + first, final flush, clock skew
    assert len(summaries) < summaries[-1]["step"]

    # supervisord's stopasgroup signals the whole process group: workers must not crash the trainer.
    os.killpg(tp.pid, signal.SIGTERM)
    assert tp.wait(timeout=60) == 0  # a bound on the wait; the trainer exits 0 after a clean stop
    st = tp.status()
    assert st.state == State.STOPPED
    final = st.payload.step
    assert st.payload.checkpoint_step == final
    assert (tp.checkpoint_dir / checkpoint_name(final)).exists()
    assert CheckpointStore(tp.checkpoint_dir).load_latest().step == final
    assert _states(tp) == ["starting", "running", "stopping", "stopped"]
    wait_until(lambda: gone(workers), 5, what=f"DataLoader workers {workers} gone")


def test_sigkill_then_restart_resumes_skipping_a_corrupt_checkpoint_and_double_sigterm_is_safe(tmp_path, reaper):
    config = write_config(tmp_path, num_workers=1, val_every_steps=NO_VALIDATION)
    tp = start_trainer(reaper, config)
    store = CheckpointStore(tp.checkpoint_dir)
    wait_until(lambda: len(store.steps()) >= 2, 60, what="two checkpoints")
    workers = [p.pid for p in tp.children()]
    assert workers
    os.kill(tp.pid, signal.SIGKILL)
    tp.wait(timeout=10)
    # PR_SET_PDEATHSIG: the worker dies with the trainer, not 5 s later.
    wait_until(lambda: gone(workers), 3, what="worker dies with its SIGKILLed trainer")
    good = store.steps()[-1][0]
    run_id = torch.load(store.steps()[-1][1], weights_only=False)["run_id"]
    records_before = len(tp.metrics())
    assert good > 0

    # A newer checkpoint that is garbage (a torn copy, a bad disk) and a temp file a killed writer left.
    corrupt = tp.checkpoint_dir / checkpoint_name(good + 1000)
    corrupt.write_bytes(b"not a checkpoint")
    stale = tp.checkpoint_dir / ".tmp-ckpt-leftover.pt"
    stale.write_bytes(b"half")

    tp2 = start_trainer(reaper, config, log_name="trainer2.log")
    wait_until(lambda: tp2.step() > good + 50, 60, what="progress after resume")
    resumed = [r for r in tp2.log_records() if r.get("event") == "resume"]
    assert resumed and resumed[0]["step"] == good
    # and in the metrics stream, where the page draws the restart from (even one at the very step it stopped)
    assert [r["step"] for r in tp2.metrics() if r.get("event") == "resume"] == [good]
    assert any(r.get("event") == "checkpoint_corrupt" for r in tp2.metrics())
    assert not stale.exists()
    assert not corrupt.exists() and corrupt.with_name(corrupt.name + ".corrupt").exists()
    assert tp2.status().payload.run_id == run_id
    # The step continued from the checkpoint: the restart's first record is past it, not near 0.
    new_steps = [r["step"] for r in tp2.metrics()[records_before:] if "loss" in r]
    assert new_steps and new_steps[0] > good

    # Two SIGTERMs close together: the second arrives while stopping and must change nothing.
    os.kill(tp2.pid, signal.SIGTERM)
    wait_until(lambda: "stopping" in _states(tp2), 30, what="state=stopping after the first SIGTERM")
    os.kill(tp2.pid, signal.SIGTERM)  # a zombie until tp2.wait reaps it: the kill cannot miss
    assert tp2.wait(timeout=60) == 0
    assert tp2.status().state == State.STOPPED
    latest = CheckpointStore(tp.checkpoint_dir).load_latest()
    assert latest is not None and latest.step == tp2.status().payload.step
