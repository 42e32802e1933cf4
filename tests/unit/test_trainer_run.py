"""`Run`, the plug-in API, over a real ProcessReporter in tmp_path and an injected clock."""

from __future__ import annotations

import json
import logging
import math
import signal

import pytest

from keel.status.models import State
from keel.status.reporter import ProcessReporter
from keel.host.dirs import prepare_process_dirs
from keel.status.reader import StatusReader
from tests.integration.trainer_fixtures import write_config
from trainer.checkpoint import CheckpointStore
from trainer.run import NonFiniteLoss, Run
from trainer.sdnotify import Notifier
from trainer.settings import load_settings
from trainer.signals import StopFlag


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def restore_signals():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


_reporters: list[ProcessReporter] = []


@pytest.fixture(autouse=True)
def close_reporters():
    yield
    while _reporters:
        _reporters.pop().close()


def make_run(tmp_path, *, rank=0, any_rank=None, **trainer):
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = write_config(tmp_path, **trainer)
    prepare_process_dirs(json.loads(config.read_text()))
    settings = load_settings(config)
    reporter = ProcessReporter(settings.run_dir, "trainer", "trainer", heartbeat_interval=60)
    _reporters.append(reporter)
    reporter.start(payload={"run_id": "boot"})
    clock = Clock()
    stop = StopFlag()
    run = Run(
        settings,
        reporter=reporter,
        store=CheckpointStore(settings.checkpoint_dir, settings.checkpoint.keep),
        stop=stop,
        notifier=Notifier({}),
        device="cpu",
        logger=logging.getLogger("test.run"),
        rank=rank,
        any_rank=any_rank,
        clock=clock,
        run_id="abc",
    )
    return run, reporter, clock, stop


def metrics(tmp_path, *, events: bool = False) -> list[dict]:
    """The metrics file's step records (and its event records too, with ``events``: the run's start...)."""
    path = tmp_path / "run" / "trainer.metrics.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return recs if events else [r for r in recs if "event" not in r]


def test_reporting_is_throttled_and_summarised(tmp_path):
    run, reporter, clock, _ = make_run(tmp_path)
    seq0 = reporter.status.seq
    for step in range(1, 1001):  # 1000 steps of 1 ms
        clock.now += 0.001
        run.report(step=step, loss=2.0 if step <= 500 else 1.0, samples=64, lr=0.1, grad_norm=0.5)
    writes = reporter.status.seq - seq0
    assert 5 <= writes <= 8, writes  # one per 0.2 s (+ the running transition), not 1000
    recs = metrics(tmp_path)
    assert 4 <= len(recs) <= 5
    assert recs[0]["loss"] == 2.0 and recs[-1]["loss"] == 1.0
    assert all(r["samples_per_s"] == pytest.approx(64_000, rel=0.02) for r in recs)
    assert all(r["lr"] == 0.1 and r["grad_norm"] == 0.5 for r in recs)
    run.flush()
    st = StatusReader(tmp_path / "run").read("trainer")
    assert st.state == State.RUNNING and st.payload.step == 1000 and st.payload.loss == 1.0
    assert st.progress_mono is not None
    assert metrics(tmp_path)[-1]["step"] == 1000


def test_every_step_reporting_with_intervals_shorter_than_a_step(tmp_path):
    # 1 ms intervals, 10 ms steps: every step is due and gets its own record. The first step
    # starts the rate clock (no time has passed in it yet), so its loss goes into step 2's record.
    run, reporter, clock, _ = make_run(tmp_path, report={"status_interval": "1ms", "metrics_interval": "1ms"})
    for step in range(1, 11):
        clock.now += 0.01
        run.report(step=step, loss=float(step))
    recs = metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in recs] == [(2, 1.5)] + [(s, float(s)) for s in range(3, 11)]
    assert reporter.status.payload.step == 10


def test_validation_results_get_their_own_record(tmp_path):
    run, _, clock, _ = make_run(tmp_path)
    run.report(step=1, loss=1.0)
    run.report(step=2, loss=1.0, val_loss=0.7)
    run.flush()
    assert {"step": 2, "val_loss": 0.7}.items() <= next(r for r in metrics(tmp_path) if "val_loss" in r).items()


def test_eta_from_max_steps_and_the_step_rate(tmp_path):
    run, reporter, clock, _ = make_run(tmp_path, max_steps=300)
    for step in range(1, 101):
        clock.now += 0.01
        run.report(step=step, loss=1.0)
    run.flush()
    assert reporter.status.payload.eta_s == pytest.approx(2.0, rel=0.1)  # 200 steps at 100 steps/s


def test_nan_policies(tmp_path):
    run, _, _, _ = make_run(tmp_path, on_nan="skip")
    assert run.nonfinite_loss(3, math.nan) == "skip"
    run.report(step=3, loss=math.nan)  # already handled for step 3: no second event
    run.report(step=4, loss=math.inf)  # a plug-in that only reports: the policy still applies
    events = [r for r in metrics(tmp_path, events=True) if r.get("event") == "nonfinite_loss"]
    assert [(e["step"], e["loss"], e["action"]) for e in events] == [(3, "nan", "skip"), (4, "inf", "skip")]

    run2, _, _, _ = make_run(tmp_path / "b", on_nan="stop")
    with pytest.raises(NonFiniteLoss, match="loss is nan at step 9"):
        run2.report(step=9, loss=math.nan)


def test_checkpoint_due_by_steps_and_seconds(tmp_path):
    run, _, clock, _ = make_run(tmp_path, checkpoint={"every_seconds": 5.0, "every_steps": 100, "keep": 2})
    assert not run.checkpoint_due(50)
    assert run.checkpoint_due(100)
    run.save_checkpoint({"x": 1}, 100)
    assert not run.checkpoint_due(100) and not run.checkpoint_due(150)
    clock.now += 5.0
    assert run.checkpoint_due(150)


def test_save_and_load_wrap_the_user_state_and_keep_the_run_id(tmp_path):
    run, reporter, _, _ = make_run(tmp_path)
    run.report(step=7, loss=1.0)
    path = run.save_checkpoint({"weights": [1, 2]})
    assert path.name == "ckpt-000000007.pt"
    assert reporter.status.payload.checkpoint_step == 7

    fresh, reporter2, _, _ = make_run(tmp_path)
    fresh.run_id = "other"
    assert fresh.load_checkpoint() == {"weights": [1, 2]}
    assert fresh.run_id == "abc" and fresh.step == 7 and fresh.checkpoint_step == 7
    assert reporter2.status.payload.run_id == "abc"


def test_only_rank_zero_writes_checkpoints(tmp_path):
    run, _, _, _ = make_run(tmp_path, rank=1)
    assert run.save_checkpoint({"x": 1}, 5) is None
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())


def test_stop_moves_to_stopping_and_ignores_further_signals(tmp_path, restore_signals):
    run, reporter, _, stop = make_run(tmp_path)
    stop.install()
    assert not run.should_stop()
    signal.raise_signal(signal.SIGTERM)  # the real handler: sets the flag, nothing else
    assert stop.is_set() and stop.signum == signal.SIGTERM
    assert run.should_stop() and run.stop_requested()
    assert reporter.status.state == State.STOPPING
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    signal.raise_signal(signal.SIGTERM)  # a second SIGTERM while stopping: ignored, we are still here


def test_any_rank_decides_should_stop(tmp_path, restore_signals):
    calls = []
    run, reporter, _, _ = make_run(tmp_path, any_rank=lambda local: calls.append(local) or True)
    assert run.should_stop() and calls == [False]
    assert not run.stop_requested()
    assert reporter.status.state == State.STOPPING
