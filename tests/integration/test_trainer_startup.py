"""Start-up failures of the real `python -m trainer`: a bad config file, GPUs that cannot be had."""

from __future__ import annotations

import json

import pytest

from keel.status.models import State
from tests.integration.trainer_fixtures import start_trainer, write_config

pytestmark = pytest.mark.slow


def test_unreadable_config_exits_2_without_a_status_file(tmp_path, reaper):
    config = write_config(tmp_path, on_nan="explode")
    tp = start_trainer(reaper, config)
    assert tp.wait(timeout=30) == 2
    assert "trainer.on_nan: must be stop, skip or continue" in tp.log_path.read_text()
    assert not tp.status()


def test_auto_gpus_that_cannot_be_allocated_give_state_failed(tmp_path, reaper):
    config = write_config(tmp_path)
    doc = json.loads(config.read_text())
    doc["gpus"] = {"auto": 1}  # this host has no GPU (and no NVML): allocate_gpus must refuse
    config.write_text(json.dumps(doc))
    tp = start_trainer(reaper, config)
    assert tp.wait(timeout=60) == 1
    st = tp.status()
    assert st.state == State.FAILED
    assert "GPU" in st.last_error and st.gpus == []
