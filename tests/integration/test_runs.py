"""Runs against the real `python -m trainer`: archived summaries, and a changed entry starting a new run."""

from __future__ import annotations

import json
import shutil

import pytest

from keel.status import runs as files
from tests.integration.trainer_fixtures import NO_VALIDATION, start_trainer, write_config

pytestmark = pytest.mark.slow

PLUGIN = "examples.momentum.train:main"


def run_to_end(reaper, tmp_path, log_name: str, **trainer):
    config = write_config(tmp_path, num_workers=0, **trainer)
    tp = start_trainer(reaper, config, log_name=log_name)
    assert tp.wait(timeout=120) == 0, tp.log_path.read_text()[-3000:]
    return tp


def test_two_earlier_runs_are_listed_with_their_summaries(tmp_path, reaper, monkeypatch, capsys):
    tp1 = run_to_end(reaper, tmp_path, "one.log", max_steps=30, val_every_steps=10)
    first_id = tp1.payload()["run_id"]
    shutil.rmtree(tp1.checkpoint_dir)  # nothing to resume: the next start is a new run
    tp2 = run_to_end(reaper, tmp_path, "two.log", max_steps=20, val_every_steps=10)
    second_id = tp2.payload()["run_id"]
    assert first_id != second_id

    listed = files.list_runs(files.runs_root(tp2.run_dir, "trainer"))
    assert [s.id for s in listed] == [second_id, first_id]
    for s, steps in zip(listed, (20, 30)):
        assert s.end == "completed" and s.steps == steps and s.ended is not None and s.resumes == 0
        assert s.last_loss is not None and s.best_loss is not None and s.best_loss <= s.last_loss
        assert s.last_val_loss is not None and s.best_val_loss <= s.last_val_loss
        records = files.read_metrics(files.runs_root(tp2.run_dir, "trainer"), s.id)
        assert max(r["step"] for r in records if "loss" in r) == steps
    assert listed[0].config_digest == listed[1].config_digest  # same entry, params and seed

    # bin/status --runs reads the same archive (the stack file is the tmp one, not build/<env>)
    from keel.cli import status as status_cli
    from keel.render.contract import load_stack

    monkeypatch.setattr(status_cli, "load_rendered_stack", lambda env: load_stack(tmp_path / "keel.json"))
    assert status_cli.main(["test", "--runs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["RUN", "TRAINER", "STARTED"]
    assert [line.split()[0] for line in lines[1:]] == [second_id, first_id]
    assert all("completed" in line and listed[0].config_digest in line for line in lines[1:])
    assert status_cli.main(["test", "--runs", "--json"]) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == [second_id, first_id]


def test_a_resume_continues_the_run(tmp_path, reaper):
    tp1 = run_to_end(reaper, tmp_path, "one.log", max_steps=15, val_every_steps=NO_VALIDATION)
    tp2 = run_to_end(reaper, tmp_path, "two.log", max_steps=25, val_every_steps=NO_VALIDATION)
    assert tp2.payload()["run_id"] == tp1.payload()["run_id"]
    (s,) = files.list_runs(files.runs_root(tp2.run_dir, "trainer"))
    assert (s.steps, s.resumes, s.end) == (25, 1, "completed")


@pytest.mark.parametrize(("before", "after"), [(PLUGIN, None), (None, PLUGIN)])
def test_switching_entry_starts_a_new_run_instead_of_a_crash_loop(tmp_path, reaper, before, after):
    tp1 = run_to_end(reaper, tmp_path, "before.log", entry=before, max_steps=20, val_every_steps=NO_VALIDATION,
                     params={"lookback": 10} if before else {})
    old_id = tp1.payload()["run_id"]
    assert tp1.checkpoint_dir.exists() and any(tp1.checkpoint_dir.glob("ckpt-*.pt"))

    # Before: the built-in job loaded the plug-in's checkpoint and died with KeyError at every restart.
    tp2 = run_to_end(reaper, tmp_path, "after.log", entry=after, max_steps=20, val_every_steps=NO_VALIDATION,
                     params={"lookback": 10} if after else {})
    new_id = tp2.payload()["run_id"]
    assert new_id != old_id
    (logged,) = [r for r in tp2.log_records() if r.get("event") == "new_run"]
    assert logged["previous_run_id"] == old_id and "config changed" in logged["reason"]
    (event,) = [r for r in tp2.metrics() if r.get("event") == "new_run" and r["run_id"] == new_id]
    moved = tmp_path / "checkpoints" / "superseded" / old_id
    assert event["checkpoints_moved_to"] == str(moved) and any(moved.glob("ckpt-*.pt"))  # kept, not loaded
    listed = files.list_runs(files.runs_root(tp2.run_dir, "trainer"))
    assert [s.id for s in listed] == [new_id, old_id]
    assert listed[0].config_digest != listed[1].config_digest
    assert listed[0].config["entry"] == (after or "trainer.job:main")

    # and its own checkpoint resumes on the next start (the old run's files no longer shadow it)
    tp3 = run_to_end(reaper, tmp_path, "again.log", entry=after, max_steps=25, val_every_steps=NO_VALIDATION,
                     params={"lookback": 10} if after else {})
    assert tp3.payload()["run_id"] == new_id
    assert not [r for r in tp3.log_records() if r.get("event") == "new_run"]
    # the metrics stream says where each start began: two new runs, then the resume of the second
    assert [(r["event"], r["run_id"]) for r in tp3.metrics() if r.get("event") in ("new_run", "resume")] == [
        ("new_run", old_id), ("new_run", new_id), ("resume", new_id)]
