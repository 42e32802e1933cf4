"""CheckpointStore: atomic saves, keep-last-K, skipping corrupt files, and 200 SIGKILLs mid-write."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest
import torch

from trainer.checkpoint import TEMP_PREFIX, CheckpointStore, checkpoint_name, parse_step


def test_names_sort_like_steps_and_parse_back():
    assert checkpoint_name(1234) == "ckpt-000001234.pt"
    assert parse_step("ckpt-000001234.pt") == 1234
    assert parse_step(checkpoint_name(10**10)) == 10**10
    for other in ("ckpt-1.pt", ".tmp-ckpt-abc.pt", "ckpt-000000001.pt.corrupt", "notes.txt"):
        assert parse_step(other) is None
    assert sorted([checkpoint_name(s) for s in (100, 9, 20)]) == [checkpoint_name(s) for s in (9, 20, 100)]


def test_save_keeps_last_k_and_loads_newest(tmp_path):
    store = CheckpointStore(tmp_path / "ck", keep=2)
    assert store.load_latest() is None
    for step in (5, 10, 15):
        store.save(step, {"step": step, "w": torch.full((3,), float(step))})
    assert [s for s, _ in store.steps()] == [10, 15]
    loaded = store.load_latest()
    assert loaded.step == 15 and torch.equal(loaded.state["w"], torch.full((3,), 15.0))
    assert not [n for n in os.listdir(tmp_path / "ck") if n.startswith(TEMP_PREFIX)]


def test_corrupt_newest_is_skipped_reported_and_set_aside(tmp_path):
    seen = []
    store = CheckpointStore(tmp_path, keep=3, on_corrupt=lambda p, e: seen.append(p.name))
    store.save(1, {"step": 1})
    (tmp_path / checkpoint_name(2)).write_bytes(b"\x80garbage")
    (tmp_path / checkpoint_name(3)).write_bytes(b"")  # a zero-length file, as after a crash without fsync
    loaded = store.load_latest()
    assert loaded is not None and loaded.step == 1
    assert seen == [checkpoint_name(3), checkpoint_name(2)]
    assert [s for s, _ in store.steps()] == [1]
    assert (tmp_path / (checkpoint_name(2) + ".corrupt")).exists()


def test_a_non_dict_checkpoint_is_corrupt_too(tmp_path):
    torch.save([1, 2], tmp_path / checkpoint_name(7))
    assert CheckpointStore(tmp_path).load_latest() is None


def test_failed_write_leaves_no_temp_file_and_keeps_the_old_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(1, {"ok": True})
    with pytest.raises(Exception):
        store.save(2, {"bad": threading.Lock()})  # cannot be pickled: torch.save fails mid-way
    assert os.listdir(tmp_path) == [checkpoint_name(1)]
    assert store.load_latest().step == 1


def test_stale_temps_are_removed(tmp_path):
    (tmp_path / f"{TEMP_PREFIX}abc.pt").write_bytes(b"half")
    (tmp_path / checkpoint_name(3)).write_bytes(b"x")
    removed = CheckpointStore(tmp_path).remove_stale_temps()
    assert [p.name for p in removed] == [f"{TEMP_PREFIX}abc.pt"]
    assert os.listdir(tmp_path) == [checkpoint_name(3)]


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(ValueError):
        CheckpointStore(tmp_path, keep=0)


def _payload() -> torch.Tensor:
    return torch.randn(64 * 1024, generator=torch.Generator().manual_seed(0))


def _writer_child(directory: str, start: int, ready_fd: int) -> None:
    """Runs in a forked child: save checkpoints of ~256 KiB back to back until killed."""
    try:
        torch.set_num_threads(1)
        store = CheckpointStore(directory, keep=2)
        payload = _payload()
        step = start
        os.write(ready_fd, b"x")  # the parent's random delay starts now, not before our set-up
        while True:
            step += 1
            store.save(step, {"step": step, "w": payload})
    finally:
        os._exit(0)


@pytest.mark.slow
def test_200_random_sigkills_during_checkpoint_writes_never_leave_a_corrupt_newest(tmp_path):
    """Fork writers from this process (torch already imported) and SIGKILL them at random moments."""
    rng = random.Random(4)
    directory = str(tmp_path)
    last_step = 0
    kills_mid_write = 0
    expected = _payload()
    for _ in range(200):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            _writer_child(directory, last_step, w)
        os.close(w)
        os.read(r, 1)
        os.close(r)
        # Kill at a random instant; most land inside torch.save/fsync/replace, since that is all it does.
        time.sleep(rng.uniform(0.0, 0.03))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL

        # What a restarting trainer does: drop temps, load the newest; every named file must load.
        corrupt = []
        store = CheckpointStore(directory, keep=2, on_corrupt=lambda p, e: corrupt.append((p, e)))
        if store.remove_stale_temps():
            kills_mid_write += 1  # the kill landed between mkstemp and os.replace
        loaded = store.load_latest()
        assert corrupt == []
        if loaded is not None:
            assert loaded.step >= last_step
            assert loaded.state["step"] == loaded.step and torch.equal(loaded.state["w"], expected)
            last_step = loaded.step
    assert last_step > 0
    # The test only means something if kills really hit writes in progress.
    assert kills_mid_write > 50, kills_mid_write
