"""The built-in job's pure parts: the synthetic series, batch keys, the LR schedule, and import hygiene."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from trainer import job

TRAINER = Path(__file__).resolve().parents[2] / "trainer"


def test_series_is_seeded_standardised_and_learnable():
    a = job.synthetic_returns(5000, seed=3)
    assert np.array_equal(a, job.synthetic_returns(5000, seed=3))
    assert not np.array_equal(a, job.synthetic_returns(5000, seed=4))
    assert abs(float(a.mean())) < 1e-4 and abs(float(a.std()) - 1) < 1e-4
    # Regimes of opposite autocorrelation: the lag-1 correlation of returns changes sign between stretches.
    lag1 = [np.corrcoef(w[:-1], w[1:])[0, 1] for w in np.array_split(a, 20)]
    assert max(lag1) > 0.3 and min(lag1) < -0.2


def test_batches_are_a_pure_function_of_the_key_and_stay_in_their_segment():
    z = np.arange(1000, dtype=np.float32)
    ds = job.WindowBatches(z, 500, 1000, window=8, batch_size=16, seed=1)
    x, y = ds[(2, 5)]
    assert x.shape == (16, 8, 1) and y.shape == (16, 1)
    x2, y2 = ds[(2, 5)]
    assert torch.equal(x, x2) and not torch.equal(y, ds[(2, 6)][1])
    # Each input window is exactly the 8 values before its target, all inside [500, 1000).
    assert torch.equal(x[:, -1, 0] + 1, y[:, 0]) and torch.equal(x[:, 0, 0] + 8, y[:, 0])
    assert float(x.min()) >= 500 and float(y.max()) < 1000


def test_step_sampler_resumes_and_shards():
    s = job.StepSampler(batches_per_epoch=10, start=0)
    it = iter(s)
    keys = [next(it) for _ in range(12)]
    assert keys[:2] == [(0, 0), (0, 1)] and keys[10] == (1, 0)
    resumed = iter(job.StepSampler(10, start=7))
    assert [next(resumed) for _ in range(5)] == keys[7:12]
    r0, r1 = job.StepSampler(10, 0, rank=0, world_size=2), job.StepSampler(10, 0, rank=1, world_size=2)
    assert [r0.key(i) for i in range(5)] == [(0, 0), (0, 2), (0, 4), (0, 6), (0, 8)]
    assert [r1.key(i) for i in range(5)] == [(0, 1), (0, 3), (0, 5), (0, 7), (0, 9)]


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    f = job.lr_lambda(warmup=10, cycle=110, floor=0.1)
    assert f(0) == 0.1 and f(9) == 1.0
    assert f(10) == 1.0 and 0.1 < f(60) < 1.0 and abs(f(110) - 0.1) < 1e-9 and abs(f(10_000) - 0.1) < 1e-9


def test_params_ignore_unknown_keys():
    p = job.JobParams.from_config({"window": 8, "nan_at_steps": [3], "user_note": "x"})
    assert p.window == 8 and p.nan_at_steps == (3,)


def test_the_entry_point_does_not_import_torch_before_start_up():
    """torch must wait until CUDA_VISIBLE_DEVICES is final: a when, which .importlinter cannot see
    (it forbids bokeh and the dashboard in the trainer at all)."""
    import subprocess
    import sys

    code = "import sys, trainer.__main__; print(sorted(m for m in ('torch',) if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=TRAINER.parent, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
