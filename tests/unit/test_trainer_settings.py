"""Resolved-file parsing, entry resolution, device/backend/rank selection: the trainer's pure decisions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.trainer_fixtures import write_config
from trainer import distributed
from trainer.__main__ import resolve_entry, status_name
from keel.render.contract import ContractError
from trainer.settings import choose_tmpdir, load_settings, parse_settings


def test_parses_the_resolved_file_shape(tmp_path):
    s = load_settings(write_config(tmp_path, max_steps=7, params={"a": 1}))
    assert s.name == "trainer" and s.run_dir == tmp_path / "run" and s.checkpoint_dir == tmp_path / "checkpoints"
    assert s.max_steps == 7 and s.params == {"a": 1} and s.checkpoint.every_seconds == 1.0
    assert s.report.status_interval == 0.2 and s.on_nan == "stop" and s.auto_gpus is None
    assert s.backend == "auto" and s.threads == 1 and s.stop_timeout == 15.0


def test_every_value_comes_from_the_file(tmp_path):
    """The model's defaults reach the trainer through the file: 5 m checkpoints, 60 s stop timeout."""
    from tests.resolved import resolve_stack

    resolve_stack(tmp_path, {"trainer": {"kind": "trainer"}})
    s = load_settings(tmp_path / "trainer.json")
    assert s.checkpoint.every_seconds == 300.0 and s.stop_timeout == 60.0 and s.heartbeat_interval == 2.0


def test_errors_name_the_file_and_the_key(tmp_path):
    config = write_config(tmp_path)
    doc = json.loads(config.read_text())
    del doc["paths"]["run_dir"]
    with pytest.raises(ContractError) as e:
        parse_settings(doc, "t.json")
    assert (e.value.path, e.value.key, str(e.value)) == ("t.json", "paths.run_dir", "t.json: paths.run_dir: missing")
    doc = json.loads(config.read_text())
    doc["trainer"]["on_nan"] = "explode"
    with pytest.raises(ContractError, match="trainer.on_nan"):
        parse_settings(doc)


def test_a_file_of_another_kind_is_refused(tmp_path):
    from tests.resolved import resolve_stack

    resolve_stack(tmp_path, {"watchdog": {"kind": "watchdog"}})
    with pytest.raises(ContractError, match="kind: expected a trainer's resolved file"):
        load_settings(tmp_path / "watchdog.json")


def test_auto_gpus(tmp_path):
    assert load_settings(write_config(tmp_path, gpus="auto:2")).auto_gpus == 2
    doc = json.loads(write_config(tmp_path).read_text())
    doc["gpus"] = {"some": 2}
    with pytest.raises(ContractError, match="gpus"):
        parse_settings(doc)


def test_tmpdir_falls_back_when_too_long_for_unix_sockets():
    short = Path("/srv/keel/var/run/tmp/trainer")
    assert choose_tmpdir(short, "trainer", 0) == (short, False)
    deep = Path("/opt/keel/releases/2026-11-28T12-00-00/var/run/tmp/trainer.rank0/and/deeper")
    assert choose_tmpdir(deep, "trainer.rank0", 1000) == (Path("/tmp/keel-1000-trainer.rank0"), True)


def test_resolve_entry():
    assert resolve_entry(None).__module__ == "trainer.job"
    assert resolve_entry("examples.momentum.train:main").__name__ == "main"
    assert resolve_entry("os.path:join") is __import__("os").path.join
    with pytest.raises(ValueError):
        resolve_entry("no_colon")
    with pytest.raises(ModuleNotFoundError):
        resolve_entry("no_such_module_xyz:main")
    with pytest.raises(AttributeError):
        resolve_entry("examples.momentum.train:nope")


def test_rank_detection_and_status_names(tmp_path):
    s = load_settings(write_config(tmp_path))
    assert distributed.detect({}) is None
    info = distributed.detect({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert info == distributed.DistInfo(rank=1, world_size=2, local_rank=1) and not info.is_main
    assert status_name(s, None) == "trainer"
    assert status_name(s, info) == "trainer.rank1"


@pytest.mark.parametrize(
    ("cuda", "gpus", "local_rank", "device"),
    [(False, True, 0, "cpu"), (True, False, 0, "cpu"), (True, True, 0, "cuda:0"), (True, True, 1, "cuda:1")],
)
def test_device_selection(cuda, gpus, local_rank, device):
    assert distributed.select_device(cuda, gpus, local_rank) == device


def test_backend_choice():
    assert distributed.choose_backend("auto", cuda=False) == "gloo"
    assert distributed.choose_backend("auto", cuda=True) == "nccl"
    assert distributed.choose_backend("gloo", cuda=True) == "gloo"


def test_memory_limit_is_a_no_op_on_cpu():
    import torch

    assert distributed.apply_memory_limit(torch.device("cpu"), 0.5, None) is None


def test_memory_fraction_from_the_limits():
    gib = 1 << 30
    assert distributed.memory_fraction(0.25, None, 80 * gib) == 0.25
    assert distributed.memory_fraction(None, 20 * gib, 80 * gib) == 0.25
    assert distributed.memory_fraction(None, 100 * gib, 80 * gib) == 1.0
    assert distributed.memory_fraction(None, None, 80 * gib) is None
