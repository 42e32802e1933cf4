"""Start-up failures of the real `python -m trainer`: a bad config file, GPUs that cannot be had."""

from __future__ import annotations

import json

import pytest

from keel.status.models import State
from tests.integration.trainer_fixtures import start_trainer, write_config

pytestmark = pytest.mark.slow


def test_a_resolved_file_off_the_contract_exits_2_naming_file_and_key(tmp_path, reaper):
    config = write_config(tmp_path)
    doc = json.loads(config.read_text())
    doc["trainer"]["on_nan"] = "explode"  # what no resolver writes: an edited or stale file
    config.write_text(json.dumps(doc))
    tp = start_trainer(reaper, config)
    assert tp.wait(timeout=30) == 2
    assert f"{config}: trainer.on_nan: Input should be 'stop', 'skip' or 'continue'" in tp.log_path.read_text()
    assert not tp.status()


def test_a_resolved_file_of_another_format_version_exits_2(tmp_path, reaper):
    config = write_config(tmp_path)
    doc = json.loads(config.read_text())
    doc["format_version"] = 1
    config.write_text(json.dumps(doc))
    tp = start_trainer(reaper, config)
    assert tp.wait(timeout=30) == 2
    assert f"{config}: format_version: unknown format_version 1" in tp.log_path.read_text()
    assert not tp.status()


def test_auto_gpus_that_cannot_be_allocated_give_state_failed(tmp_path, reaper):
    config = write_config(tmp_path, gpus="auto:1")  # this host has no GPU (and no NVML): allocate_gpus must refuse
    tp = start_trainer(reaper, config)
    assert tp.wait(timeout=60) == 1
    st = tp.status()
    assert st.state == State.FAILED
    assert "GPU" in st.last_error and st.gpus == []
