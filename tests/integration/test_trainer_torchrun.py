"""`launcher: torchrun`: two CPU ranks (gloo) report separately and stop together on SIGTERM to the agent."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from keel.status.models import State
from tests.integration.trainer_fixtures import gone, start_trainer, write_config
from tests.support import PYTHON, wait_until
from trainer.checkpoint import CheckpointStore

pytestmark = pytest.mark.slow

TORCHRUN = str(Path(PYTHON).parent / "torchrun")


def test_two_gloo_ranks_report_and_stop_together_on_sigterm_to_the_agent(tmp_path, reaper):
    config = write_config(tmp_path, launcher="torchrun", num_workers=1, val_every_steps=50)
    argv = [TORCHRUN, "--nproc-per-node", "2", "--nnodes", "1", "--standalone", "-m", "trainer", "--config", str(config)]
    tp = start_trainer(reaper, config, argv=argv)
    names = ["trainer.rank0", "trainer.rank1"]
    wait_until(lambda: all(tp.step(n) >= 30 for n in names), 120, what="both ranks training")
    for rank, n in enumerate(names):
        st = tp.status(n)
        assert st.state == State.RUNNING and st.payload.rank == rank and st.payload.world_size == 2
        assert any("loss" in r for r in tp.metrics(n))
    ranks = [p.pid for p in tp.children() if p.ppid() == tp.pid]
    everything = [p.pid for p in tp.children()]
    assert len(ranks) == 2 and len(everything) == 4  # two ranks, one DataLoader worker each

    os.kill(tp.pid, signal.SIGTERM)  # the agent forwards it to one rank; the all-reduce stops the other
    tp.wait(timeout=30)  # torchrun itself exits non-zero when signalled; the ranks are what matter
    wait_until(lambda: gone(everything), 10, what="ranks and workers gone")
    steps = []
    for n in names:
        st = tp.status(n)
        assert st.state == State.STOPPED, (n, st.state, st.last_error)
        steps.append(st.payload.step)
    assert steps[0] == steps[1]  # stopped at the same step boundary
    # Only rank 0 checkpoints; its last checkpoint is the final step.
    assert CheckpointStore(tp.checkpoint_dir).load_latest().step == steps[0]
    rank_logs = {r.get("process") for r in tp.log_records() if r.get("event") == "checkpoint"}
    assert rank_logs == {"trainer.rank0"}
