"""Runs: the config digest, new run vs resume, the archive files, retention by count and bytes, atomicity."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace

import pytest

from keel.host.dirs import prepare_process_dirs
from keel.status import runs as files
from keel.status.reporter import ProcessReporter
from keel.status.runs import RunSummary, Tally
from tests.integration.trainer_fixtures import write_config
from trainer.checkpoint import CheckpointStore
from trainer.run import Run
from trainer.runs import BUILTIN_ENTRY, RunArchive, RunLedger, choose, config_digest, digest_inputs
from trainer.sdnotify import Notifier
from trainer.settings import load_settings
from trainer.signals import StopFlag


def settings_for(tmp_path, **trainer):
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = write_config(tmp_path, **trainer)
    prepare_process_dirs(json.loads(config.read_text()))
    return load_settings(config)


# --- the digest ------------------------------------------------------------------------------------


def test_digest_covers_entry_params_and_seed_only(tmp_path):
    base = settings_for(tmp_path, params={"hidden": 32, "window": 8})
    d = config_digest(digest_inputs(base))
    assert len(d) == 12 and int(d, 16) >= 0
    # the same settings in another key order: the same digest
    assert config_digest(digest_inputs(replace(base, params={"window": 8, "hidden": 32}))) == d
    # none means the built-in job, and naming it says the same
    assert config_digest(digest_inputs(replace(base, entry=BUILTIN_ENTRY))) == d
    for changed in (replace(base, entry="examples.momentum.train:main"), replace(base, params={"hidden": 64, "window": 8}),
                    replace(base, seed=1)):
        assert config_digest(digest_inputs(changed)) != d
    for same in (replace(base, max_steps=5), replace(base, batch_size=7), replace(base, learning_rate=0.1),
                 replace(base, num_workers=0, threads=2, val_every_steps=3)):
        assert config_digest(digest_inputs(same)) == d


def test_choose_resumes_only_the_same_digest():
    fresh = choose(None, "aaa")
    assert not fresh.resume and fresh.previous is None
    same = choose({"run_id": "r1", "config_digest": "aaa"}, "aaa")
    assert same.resume and same.previous == "r1"
    other = choose({"run_id": "r1", "config_digest": "bbb"}, "aaa")
    assert not other.resume and other.previous == "r1" and "bbb -> aaa" in other.reason
    legacy = choose({"run_id": "r0", "step": 5, "state": {}}, "aaa")  # written before digests
    assert not legacy.resume and legacy.previous == "r0" and "no config digest" in legacy.reason


# --- the archive files -----------------------------------------------------------------------------


def summary(run_id: str, started: float, **kw) -> RunSummary:
    return RunSummary(id=run_id, trainer="trainer", started=started, updated=started, config_digest="d", **kw)


def make_runs(root, n: int, size: int = 0) -> list[str]:
    ids = [f"run{i}" for i in range(n)]
    for i, run_id in enumerate(ids):
        files.write_summary(root, summary(run_id, 1000.0 + i))
        if size:
            (root / run_id / files.METRICS_FILE).write_bytes(b"x" * size)
    return ids


def test_list_runs_newest_first_skips_unreadable_and_foreign_dirs(tmp_path):
    make_runs(tmp_path, 3)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / files.SUMMARY_FILE).write_text("{not json")
    (tmp_path / ".hidden").mkdir()
    assert [s.id for s in files.list_runs(tmp_path)] == ["run2", "run1", "run0"]
    assert files.list_runs(tmp_path / "absent") == []


def test_prune_by_count_keeps_the_newest_and_never_the_live_run(tmp_path):
    make_runs(tmp_path, 5)
    pruned = files.prune(tmp_path, keep=3, max_bytes=10**9, live="run0")  # the live one is the oldest
    assert pruned.removed == ["run1", "run2"]
    assert sorted(os.listdir(tmp_path)) == ["run0", "run3", "run4"]


def test_prune_by_bytes_deletes_oldest_first_until_it_fits(tmp_path):
    make_runs(tmp_path, 4, size=10_000)
    one = files.run_bytes(tmp_path / "run0")
    assert one > 10_000
    pruned = files.prune(tmp_path, keep=100, max_bytes=2 * one + 10, live="run3")
    assert pruned.removed == ["run0", "run1"] and pruned.freed_bytes == 2 * one
    assert sorted(os.listdir(tmp_path)) == ["run2", "run3"]
    # a live run alone over the budget stays
    assert files.prune(tmp_path, keep=100, max_bytes=1, live="run3").removed == ["run2"]
    assert os.listdir(tmp_path) == ["run3"]


def test_a_failed_summary_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    files.write_summary(tmp_path, summary("r", 1.0, steps=5))
    real_fsync = os.fsync

    def failing(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError):
        files.write_summary(tmp_path, summary("r", 1.0, steps=9))
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert files.read_summary(tmp_path / "r" / files.SUMMARY_FILE).steps == 5
    assert os.listdir(tmp_path / "r") == [files.SUMMARY_FILE]


def test_read_metrics_skips_a_torn_line_and_drops_lost_work_after_a_resume(tmp_path):
    files.write_summary(tmp_path, summary("r", 1.0))
    files.append_metrics(tmp_path, "r", [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3, 4)])
    files.append_metrics(tmp_path, "r", [{"event": "resume", "step": 2}])
    files.append_metrics(tmp_path, "r", [{"step": 3, "loss": 0.5}, {"step": 4, "loss": 0.4}])
    with open(tmp_path / "r" / files.METRICS_FILE, "ab") as f:
        f.write(b'{"step": 5, "lo')  # killed mid-line
    records = files.read_metrics(tmp_path, "r")
    assert [(r.get("step"), r.get("loss")) for r in records if "event" not in r] == [(1, 1.0), (2, 0.5), (3, 0.5), (4, 0.4)]
    tally = Tally().add(records)
    assert (tally.steps, tally.last_loss, tally.best_loss) == (4, 0.4, 0.4)
    with pytest.raises(ValueError):
        files.read_metrics(tmp_path, "../escape")


def test_tally_ignores_nonfinite_and_events():
    t = Tally().add([{"step": 1, "loss": 2.0}, {"step": 2, "loss": "NaN"}, {"event": "x", "step": 99},
                     {"step": 3, "val_loss": 0.7}, {"step": 4, "loss": 1.5, "val_loss": 0.9}])
    assert t.fields() == {"steps": 4, "last_loss": 1.5, "best_loss": 1.5, "last_val_loss": 0.9, "best_val_loss": 0.7}


# --- the ledger with a real Run, store and reporter -------------------------------------------------


_reporters: list[ProcessReporter] = []


@pytest.fixture(autouse=True)
def close_reporters():
    yield
    while _reporters:
        _reporters.pop().close()


def make_run(tmp_path, run_id: str, keep: int = 20, max_bytes: int = 10**9, **trainer) -> Run:
    settings = settings_for(tmp_path, **trainer)
    reporter = ProcessReporter(settings.run_dir, "trainer", "trainer", heartbeat_interval=60)
    _reporters.append(reporter)
    reporter.start(payload={"run_id": run_id})
    store = CheckpointStore(settings.checkpoint_dir, settings.checkpoint.keep)
    ledger = RunLedger(settings, store=store)
    ledger.archive = RunArchive(settings.run_dir, "trainer", keep=keep, max_bytes=max_bytes,
                                inputs=ledger.inputs, digest=ledger.digest)
    return Run(settings, reporter=reporter, store=store, stop=StopFlag(), notifier=Notifier({}), device="cpu",
               logger=logging.getLogger("test.runs"), run_id=run_id, ledger=ledger)


def live_metrics(tmp_path) -> list[dict]:
    path = tmp_path / "run" / "trainer.metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_resume_continues_its_run_and_a_changed_config_starts_a_new_one(tmp_path):
    root = files.runs_root(tmp_path / "run", "trainer")
    first = make_run(tmp_path, "first", params={"hidden": 8})
    assert first.load_checkpoint() is None
    for step in (1, 2, 3):
        first.report(step=step, loss=1.0 / step)
    first.save_checkpoint({"model": "A"}, 3)
    first.flush()
    first.ledger.end("stopped")

    again = make_run(tmp_path, "again", params={"hidden": 8})
    assert again.load_checkpoint() == {"model": "A"} and again.run_id == "first"
    again.report(step=4, loss=0.1)
    again.flush()
    again.ledger.end("completed")
    (s,) = files.list_runs(root)
    assert (s.id, s.end, s.resumes, s.steps, s.best_loss) == ("first", "completed", 1, 4, 0.1)

    changed = make_run(tmp_path, "second", params={"hidden": 16})
    assert changed.load_checkpoint() is None and changed.run_id == "second"
    # the other run's checkpoints are kept aside, never loaded, and the event says where
    store = CheckpointStore(tmp_path / "checkpoints")
    assert store.steps() == []
    assert (tmp_path / "checkpoints" / "superseded" / "first" / "ckpt-000000003.pt").exists()
    # every start says in the metrics stream where its run began: the page draws restarts and new runs from it
    begins = [(r["event"], r["run_id"], r["step"]) for r in live_metrics(tmp_path) if r.get("event") in ("new_run", "resume")]
    assert begins == [("new_run", "first", 0), ("resume", "first", 3), ("new_run", "second", 0)]
    (event,) = [r for r in live_metrics(tmp_path) if r.get("event") == "new_run" and r["run_id"] == "second"]
    assert event["previous_run_id"] == "first"
    assert "config changed" in event["reason"] and event["checkpoints_moved_to"].endswith("superseded/first")
    changed.report(step=1, loss=5.0)
    changed.save_checkpoint({"model": "B"}, 1)
    assert [x.id for x in files.list_runs(root)] == ["second", "first"]
    assert files.list_runs(root)[0].config_digest != s.config_digest


def test_a_run_killed_without_a_word_is_marked_interrupted_by_the_next_new_run(tmp_path):
    root = files.runs_root(tmp_path / "run", "trainer")
    dead = make_run(tmp_path, "dead")
    dead.report(step=1, loss=1.0)
    dead.flush()  # no end: SIGKILL
    assert files.list_runs(root)[0].end == "running"
    nxt = make_run(tmp_path, "next")
    nxt.report(step=1, loss=1.0)
    ends = {x.id: x.end for x in files.list_runs(root)}
    assert ends == {"dead": "interrupted", "next": "running"}


def test_new_runs_prune_the_archive_to_keep(tmp_path):
    root = files.runs_root(tmp_path / "run", "trainer")
    for i in range(4):
        r = make_run(tmp_path, f"r{i}", keep=2)
        r.report(step=1, loss=1.0)
        r.flush()
        r.ledger.end("completed")
    assert [x.id for x in files.list_runs(root)] == ["r3", "r2"]


def test_a_run_over_the_byte_budget_stops_archiving_metrics(tmp_path):
    root = files.runs_root(tmp_path / "run", "trainer")
    run = make_run(tmp_path, "big", max_bytes=300, report={"status_interval": "1ms", "metrics_interval": "1ms"})
    for step in range(1, 60):
        run.report(step=step, loss=1.0)
        run.flush()  # a record per step
    run.ledger.end("completed")
    (s,) = files.list_runs(root)
    assert s.metrics_truncated and s.steps == 59  # the tally still counts every record
    assert (root / "big" / files.METRICS_FILE).stat().st_size < 300 + 200


def test_an_archive_failure_never_stops_training(tmp_path):
    run = make_run(tmp_path, "ro")
    runs_dir = tmp_path / "run" / "runs"
    runs_dir.mkdir(parents=True)
    (runs_dir / "trainer").write_text("not a directory")  # every archive write fails
    run.report(step=1, loss=1.0)
    run.report(step=2, loss=1.0)
    run.flush()
    run.ledger.end("completed")
    assert run.step == 2 and [r["step"] for r in live_metrics(tmp_path) if "loss" in r]
