"""keel.host.gpu_allocation: auto:N picks the least-used free GPUs under keel.fs.lock, across real processes."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import psutil
import pynvml
import pytest

from keel.fs.lock import FileLock
from keel.host.gpu_allocation import (
    GpuAllocationTimeout,
    NotEnoughGpus,
    allocate_gpus,
    gpu_lock_path,
    gpus_for_process,
)
from tests.support import PYTHON, REPO_ROOT, is_alive, wait_until
from tests.unit.fake_nvml import FakeNvml


def test_allocation_prefers_least_used_gpus(tmp_path):
    fake = FakeNvml([{"used": 9}, {"used": 1, "util": 90}, {"used": 1, "util": 10}, {"used": 5}])
    with allocate_gpus(2, tmp_path, "trainer", nvml=fake) as a:
        assert a.indices == [2, 1] and a.cuda_visible_devices == "2,1"
        assert a.lock_paths == [gpu_lock_path(tmp_path, 2), gpu_lock_path(tmp_path, 1)]
        assert (tmp_path / "gpu2.lock").read_text() == f"trainer pid={os.getpid()}\n"


def test_allocation_skips_locked_gpus_and_times_out_naming_the_held_locks(tmp_path):
    fake = FakeNvml([{}, {}, {}])
    first = allocate_gpus(2, tmp_path, "a", nvml=fake)
    second = allocate_gpus(1, tmp_path, "b", nvml=fake)
    assert not set(first.indices) & set(second.indices)
    with pytest.raises(GpuAllocationTimeout) as exc:
        allocate_gpus(1, tmp_path, "c", nvml=fake, timeout=0.3, poll=0.05)
    err = exc.value
    assert isinstance(err, TimeoutError) and err.run_dir == tmp_path
    assert sorted(err.busy) == sorted(first.lock_paths + second.lock_paths)
    assert str(err).startswith("c: only 0 of 1 GPU(s) free after 0.3s; held: ")
    for path, holder in [(p, "a") for p in first.lock_paths] + [(p, "b") for p in second.lock_paths]:
        assert f"{path} ({holder} pid={os.getpid()})" in str(err)  # who holds what, for the person debugging
    second.release()
    assert allocate_gpus(1, tmp_path, "c", nvml=fake, timeout=0.3).indices == second.indices


def test_a_gpu_locked_through_keel_fs_lock_is_never_chosen(tmp_path):
    # The one flock primitive: a FileLock on the GPU's lock file is the same lock allocation takes.
    with FileLock(gpu_lock_path(tmp_path, 0), timeout=1.0):
        with allocate_gpus(1, tmp_path, "trainer", nvml=FakeNvml([{}, {"used": 9}])) as a:
            assert a.indices == [1]
    with allocate_gpus(1, tmp_path, "trainer", nvml=FakeNvml([{}, {"used": 9}])) as a:
        assert a.indices == [0]  # released: the least-used GPU again


def test_release_frees_the_gpus_and_keeps_the_lock_files(tmp_path):
    fake = FakeNvml([{}])
    a = allocate_gpus(1, tmp_path, "a", nvml=fake)
    a.release()
    a.release()  # twice: harmless
    assert (tmp_path / "gpu0.lock").exists()  # never unlinked: a waiter could lock a file nobody else sees
    with allocate_gpus(1, tmp_path, "b", nvml=fake, timeout=0.0) as b:
        assert b.indices == [0] and (tmp_path / "gpu0.lock").read_text().startswith("b pid=")


def test_asking_for_more_gpus_than_exist_is_a_clear_error(tmp_path):
    with pytest.raises(NotEnoughGpus, match=r"trainer asks for 3 GPU\(s\) \(auto:3\); this host has 2"):
        allocate_gpus(3, tmp_path, "trainer", nvml=FakeNvml([{}, {}]))


def test_no_nvml_means_gpus_cannot_be_allocated(tmp_path):
    with pytest.raises(NotEnoughGpus, match="trainer: cannot allocate GPUs: no GPU metrics: NVML Shared Library Not Found"):
        allocate_gpus(1, tmp_path, "trainer")  # the real pynvml: no driver here
    assert allocate_gpus(0, tmp_path, "trainer").indices == []
    assert not list(tmp_path.iterdir())  # nothing half-done: no lock files


def test_nvml_failing_while_ranking_gpus_is_a_clear_error(tmp_path):
    fake = FakeNvml([{}, {}], fail={"nvmlDeviceGetMemoryInfo:1": pynvml.NVMLError_GpuIsLost})
    with pytest.raises(NotEnoughGpus, match="trainer: cannot allocate GPUs: NVML failed: GPU is lost"):
        allocate_gpus(1, tmp_path, "trainer", nvml=fake)


def test_negative_count_is_refused(tmp_path):
    with pytest.raises(ValueError, match="GPU count must be >= 0, got -1"):
        allocate_gpus(-1, tmp_path, "trainer", nvml=FakeNvml([{}]))


def test_gpus_for_process_applies_each_form_of_gpus(tmp_path):
    env: dict[str, str] = {}
    assert gpus_for_process({"gpus": []}, environ=env) == ([], None) and env["CUDA_VISIBLE_DEVICES"] == ""
    assert gpus_for_process({"gpus": [2, 0]}, environ=env) == ([2, 0], None) and env["CUDA_VISIBLE_DEVICES"] == "2,0"
    resolved = {"name": "trainer", "gpus": {"auto": 1}, "paths": {"run_dir": str(tmp_path)}}
    indices, alloc = gpus_for_process(resolved, environ=env, nvml=FakeNvml([{"used": 5}, {"used": 1}]))
    assert indices == [1] and env["CUDA_VISIBLE_DEVICES"] == "1" and alloc is not None
    alloc.release()


# --------------------------------------------------------------------------- real processes

# Allocates one of two GPUs once `go` exists, says which, holds it until `done` exists.
# With FORK=1 it first forks a child that outlives it (a DataLoader worker, say).
_ALLOC_SCRIPT = """
import os, sys, time, pathlib
sys.path.insert(0, {root!r})
from tests.unit.fake_nvml import FakeNvml
from keel.host.gpu_allocation import allocate_gpus
tag, run_dir, go, done = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3]), pathlib.Path(sys.argv[4])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.001)
a = allocate_gpus(1, run_dir, tag, nvml=FakeNvml([{{}}, {{}}]), timeout=10)
if os.environ.get("FORK") == "1" and os.fork() == 0:
    time.sleep(120)
    os._exit(0)
print(a.indices[0], flush=True)
while not done.exists():
    time.sleep(0.01)
"""


def _start(reaper, tmp_path: Path, tag: str, **env: str) -> subprocess.Popen:
    script = _ALLOC_SCRIPT.format(root=str(REPO_ROOT))
    args = [PYTHON, "-c", script, tag, str(tmp_path / "run"), str(tmp_path / "go"), str(tmp_path / "done")]
    return reaper.popen(args, stdout=subprocess.PIPE, text=True, env={**os.environ, **env})


@pytest.mark.slow
def test_two_processes_starting_at_once_never_take_the_same_gpu(tmp_path, reaper):
    for _ in range(3):  # a few rounds: the race window is small
        for f in ("go", "done"):
            (tmp_path / f).unlink(missing_ok=True)
        procs = [_start(reaper, tmp_path, f"p{i}") for i in range(2)]
        assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]  # both imported, both waiting
        (tmp_path / "go").touch()
        chosen = sorted(int(p.stdout.readline()) for p in procs)  # each holds its GPU until `done`
        (tmp_path / "done").touch()
        assert chosen == [0, 1]
        assert [p.wait(timeout=20) for p in procs] == [0, 0]


@pytest.mark.slow
def test_a_killed_holder_frees_its_gpu_even_with_a_forked_child_alive(tmp_path, reaper):
    # The kernel drops the flock when the holder dies; keel.fs.lock closes it in forked children,
    # so a DataLoader-like child that outlives the trainer does not keep the GPU taken.
    (tmp_path / "go").touch()
    holder = _start(reaper, tmp_path, "holder", FORK="1")
    assert holder.stdout.readline().strip() == "ready"
    held = int(holder.stdout.readline())
    child = psutil.Process(holder.pid).children()
    assert len(child) == 1
    reaper.track(child[0].pid)
    fake = FakeNvml([{"used": 9 if i != held else 0} for i in range(2)])  # the held GPU is the preferred one
    with pytest.raises(GpuAllocationTimeout):
        allocate_gpus(2, tmp_path / "run", "me", nvml=fake, timeout=0.0)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=20)
    assert is_alive(child[0].pid)  # the forked child still runs
    got = wait_until(lambda: _try_allocate(tmp_path / "run", fake), 10, what="the killed holder's GPU to be free")
    assert got == [held, 1 - held]


def _try_allocate(run_dir: Path, fake: FakeNvml) -> list[int] | None:
    try:
        with allocate_gpus(2, run_dir, "me", nvml=fake, timeout=0.0) as a:
            return list(a.indices)
    except GpuAllocationTimeout:
        return None
