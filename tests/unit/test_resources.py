"""keel.host.resources: process-tree sampling, NVML degradation, auto:N GPU allocation, process dirs."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pynvml
import pytest

from keel.host.resources import (
    GpuAllocationTimeout,
    gpus_for_process,
    NotEnoughGpus,
    ResourceSampler,
    allocate_gpus,
    prepare_process_dirs,
)
from tests.support import PYTHON, REPO_ROOT, is_alive, wait_until

# Every error class nvidia-ml-py defines (NVMLError_LibraryNotFound, _GpuIsLost, _DriverNotLoaded, ...).
NVML_ERRORS = sorted(
    (c for n, c in vars(pynvml).items() if n.startswith("NVMLError_") and isinstance(c, type)), key=lambda c: c.__name__
)


@dataclass
class _Mem:
    used: int
    total: int


@dataclass
class _Util:
    gpu: int


@dataclass
class _Proc:
    pid: int
    usedGpuMemory: int | None


class FakeNvml:
    """Stands in for pynvml with the real module's error classes; `fail` maps a function name to an error class."""

    NVMLError = pynvml.NVMLError
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, gpus: list[dict] | None = None, fail: dict[str, type] | None = None) -> None:
        self.gpus = gpus or []
        self.fail = fail or {}
        self.init_calls = 0
        self.shutdown_calls = 0

    def _check(self, fn: str, index: int | None = None) -> None:
        err = self.fail.get(fn) or (self.fail.get(f"{fn}:{index}") if index is not None else None)
        if err is not None:
            raise err()

    def nvmlInit(self) -> None:
        self.init_calls += 1
        self._check("nvmlInit")

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1

    def nvmlDeviceGetCount(self) -> int:
        self._check("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        self._check("nvmlDeviceGetHandleByIndex", i)
        return i

    def nvmlDeviceGetName(self, h: int) -> str:
        return self.gpus[h].get("name", "Fake GPU")

    def nvmlDeviceGetMemoryInfo(self, h: int) -> _Mem:
        self._check("nvmlDeviceGetMemoryInfo", h)
        return _Mem(self.gpus[h].get("used", 0), self.gpus[h].get("total", 80 << 30))

    def nvmlDeviceGetUtilizationRates(self, h: int) -> _Util:
        self._check("nvmlDeviceGetUtilizationRates", h)
        return _Util(self.gpus[h].get("util", 0))

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        self._check("nvmlDeviceGetTemperature", h)
        return 40

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        self._check("nvmlDeviceGetPowerUsage", h)
        return 150_000

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[_Proc]:
        self._check("nvmlDeviceGetComputeRunningProcesses", h)
        return [_Proc(pid, mem) for pid, mem in self.gpus[h].get("procs", {}).items()]

    def nvmlDeviceGetGraphicsRunningProcesses(self, h: int) -> list[_Proc]:
        return []


# --------------------------------------------------------------------------- sampling


@pytest.mark.slow
def test_sample_measures_the_whole_process_tree(reaper):
    # A parent that starts a child holding 40 MiB: the tree's RSS and count include the child.
    code = (
        "import subprocess,sys,time;"
        "subprocess.Popen([sys.executable,'-c','b=bytearray(40<<20);b[::4096]=b\"x\"*len(b[::4096]);"
        "import time;time.sleep(60)']);time.sleep(60)"
    )
    parent = reaper.popen([PYTHON, "-c", code])
    sampler = ResourceSampler(nvml=FakeNvml())
    s = wait_until(lambda: (x := sampler.sample([parent.pid]).processes[parent.pid]).num_procs == 2
                   and x.rss_bytes > 40 << 20 and x, 10, what="child in the tree")
    assert s.alive and s.create_time and len(s.tree_pids) == 2 and parent.pid in s.tree_pids


@pytest.mark.slow  # starts a real process
def test_sample_of_a_gone_pid_is_not_alive_and_never_raises():
    gone = subprocess.Popen([PYTHON, "-c", "pass"])
    gone.wait()
    s = ResourceSampler(nvml=FakeNvml()).sample([gone.pid])
    assert s.processes[gone.pid].alive is False and s.processes[gone.pid].rss_bytes == 0


@pytest.mark.slow
def test_a_zombie_counts_as_not_alive(reaper):
    child = reaper.popen([PYTHON, "-c", "pass"])
    wait_until(lambda: not is_alive(child.pid), 10, what="child exit (zombie)")
    s = ResourceSampler(nvml=FakeNvml()).sample([child.pid])
    assert s.processes[child.pid].alive is False
    child.wait()


def test_cpu_percent_of_a_busy_process_is_measured_between_samples():
    sampler = ResourceSampler(nvml=FakeNvml())
    me = psutil.Process()
    sampler.sample([me.pid])
    c0, t0 = sum(me.cpu_times()[:2]), time.monotonic()
    while sum(me.cpu_times()[:2]) - c0 < 0.2:  # burn 0.2 s of CPU, however loaded the machine is
        pass
    got = sampler.sample([me.pid]).processes[me.pid].cpu_percent
    expected = 100 * (sum(me.cpu_times()[:2]) - c0) / (time.monotonic() - t0)
    assert expected * 0.5 < got < expected * 1.5 + 5


def test_no_nvml_driver_means_no_gpu_metrics_not_a_failure():
    # The real nvidia-ml-py on this host: no driver, nvmlInit raises NVMLError_LibraryNotFound.
    s = ResourceSampler().sample([os.getpid()])
    assert s.gpus == [] and s.gpu_process_memory == {}
    assert s.gpu_error is not None and s.gpu_error.startswith("no GPU metrics")
    assert s.processes[os.getpid()].gpu_memory_bytes is None


def test_nvml_is_initialised_once_even_when_it_fails():
    fake = FakeNvml(fail={"nvmlInit": pynvml.NVMLError_DriverNotLoaded})
    sampler = ResourceSampler(nvml=fake)
    for _ in range(3):
        s = sampler.sample([])
    assert fake.init_calls == 1 and s.gpu_error == "no GPU metrics: Driver Not Loaded"


@pytest.mark.parametrize("error", NVML_ERRORS, ids=lambda c: c.__name__)
def test_every_nvml_error_class_on_init_degrades(error):
    s = ResourceSampler(nvml=FakeNvml(fail={"nvmlInit": error})).sample([os.getpid()])
    assert s.gpus == [] and s.gpu_error.startswith("no GPU metrics")


@pytest.mark.parametrize("error", NVML_ERRORS, ids=lambda c: c.__name__)
def test_every_nvml_error_class_while_sampling_degrades(error):
    fake = FakeNvml([{"used": 1}, {"used": 2}], fail={"nvmlDeviceGetMemoryInfo:1": error, "nvmlDeviceGetCount": None})
    s = ResourceSampler(nvml=fake).sample([])
    assert [g.index for g in s.gpus] == [0]
    assert "GPU 1" in s.gpu_error


def test_device_count_failure_means_no_gpu_metrics():
    s = ResourceSampler(nvml=FakeNvml([{}], fail={"nvmlDeviceGetCount": pynvml.NVMLError_GpuIsLost})).sample([])
    assert s.gpus == [] and s.gpu_error == "no GPU metrics: GPU is lost"


def test_gpu_samples_and_per_pid_memory_summed_over_the_tree():
    me = os.getpid()
    fake = FakeNvml(
        [
            {"name": "H200", "used": 10 << 30, "total": 141 << 30, "util": 55, "procs": {me: 3 << 30, 1: 1 << 30}},
            {"used": 1 << 30, "procs": {me: 2 << 30, 424242: None}},
        ],
        fail={"nvmlDeviceGetUtilizationRates:1": pynvml.NVMLError_NotSupported,
              "nvmlDeviceGetPowerUsage:1": pynvml.NVMLError_NotSupported},
    )
    s = ResourceSampler(nvml=fake).sample([me])
    assert s.gpu_error is None
    g0, g1 = s.gpus
    assert (g0.name, g0.util_percent, g0.memory_used, g0.temperature_c, g0.power_w) == ("H200", 55.0, 10 << 30, 40.0, 150.0)
    assert g1.util_percent is None and g1.power_w is None  # unsupported fields are None, not errors
    assert s.gpu_process_memory == {me: 5 << 30, 1: 1 << 30}
    assert s.processes[me].gpu_memory_bytes == 5 << 30


def test_close_shuts_nvml_down():
    fake = FakeNvml([{}])
    sampler = ResourceSampler(nvml=fake)
    sampler.sample([])
    sampler.close()
    assert fake.shutdown_calls == 1


# --------------------------------------------------------------------------- allocation


def test_allocation_prefers_least_used_gpus(tmp_path):
    fake = FakeNvml([{"used": 9}, {"used": 1, "util": 90}, {"used": 1, "util": 10}, {"used": 5}])
    with allocate_gpus(2, tmp_path, "trainer", nvml=fake) as a:
        assert a.indices == [2, 1] and a.cuda_visible_devices == "2,1"
        assert (tmp_path / "gpu2.lock").read_text().startswith("trainer pid=")


def test_allocation_skips_locked_gpus_and_times_out_when_none_are_free(tmp_path):
    fake = FakeNvml([{}, {}, {}])
    first = allocate_gpus(2, tmp_path, "a", nvml=fake)
    second = allocate_gpus(1, tmp_path, "b", nvml=fake)
    assert not set(first.indices) & set(second.indices)
    t0 = time.monotonic()
    with pytest.raises(GpuAllocationTimeout) as exc:
        allocate_gpus(1, tmp_path, "c", nvml=fake, timeout=0.3, poll=0.05)
    assert isinstance(exc.value, TimeoutError) and time.monotonic() - t0 < 2
    assert "0 of 1" in str(exc.value)
    second.release()
    assert allocate_gpus(1, tmp_path, "c", nvml=fake, timeout=0.3).indices == second.indices


def test_asking_for_more_gpus_than_exist_is_a_clear_error(tmp_path):
    with pytest.raises(NotEnoughGpus, match=r"trainer asks for 3 GPU\(s\) \(auto:3\); this host has 2"):
        allocate_gpus(3, tmp_path, "trainer", nvml=FakeNvml([{}, {}]))


def test_no_nvml_means_gpus_cannot_be_allocated(tmp_path):
    with pytest.raises(NotEnoughGpus, match="NVML Shared Library Not Found"):
        allocate_gpus(1, tmp_path, "trainer")  # the real pynvml: no driver here
    assert allocate_gpus(0, tmp_path, "trainer").indices == []


_ALLOC_SCRIPT = """
import sys, time, pathlib
sys.path.insert(0, {root!r})
from tests.unit.test_resources import FakeNvml
from keel.host.resources import allocate_gpus
go = pathlib.Path({go!r})
while not go.exists():
    time.sleep(0.001)
a = allocate_gpus(1, {run_dir!r}, sys.argv[1], nvml=FakeNvml([{{}}, {{}}]), timeout=0.5)
print(a.indices[0], flush=True)
time.sleep(1.0)   # hold the lock while the other process allocates
"""


@pytest.mark.slow
def test_two_processes_starting_at_once_never_take_the_same_gpu(tmp_path, reaper):
    go = tmp_path / "go"
    script = _ALLOC_SCRIPT.format(root=str(REPO_ROOT), go=str(go), run_dir=str(tmp_path / "run"))
    for _ in range(3):  # a few rounds: the race window is small
        if go.exists():
            go.unlink()
        procs = [reaper.popen([PYTHON, "-c", script, f"p{i}"], stdout=subprocess.PIPE, text=True) for i in range(2)]
        time.sleep(0.8)  # both are importing and waiting on the go file
        go.touch()
        chosen = [int(p.communicate(timeout=20)[0].strip()) for p in procs]
        assert sorted(chosen) == [0, 1]


def test_gpus_for_process_applies_each_form_of_gpus(tmp_path):
    env: dict[str, str] = {}
    assert gpus_for_process({"gpus": []}, environ=env) == ([], None) and env["CUDA_VISIBLE_DEVICES"] == ""
    assert gpus_for_process({"gpus": [2, 0]}, environ=env) == ([2, 0], None) and env["CUDA_VISIBLE_DEVICES"] == "2,0"
    resolved = {"name": "trainer", "gpus": {"auto": 1}, "paths": {"run_dir": str(tmp_path)}}
    indices, alloc = gpus_for_process(resolved, environ=env, nvml=FakeNvml([{"used": 5}, {"used": 1}]))
    assert indices == [1] and env["CUDA_VISIBLE_DEVICES"] == "1" and alloc is not None
    alloc.release()


# --------------------------------------------------------------------------- directories


@pytest.mark.parametrize("umask", [0o077, 0o022])
def test_process_dirs_are_created_0750_whatever_the_umask(tmp_path, umask):
    resolved = {
        "paths": {
            "run_dir": str(tmp_path / "run"),
            "log_dir": str(tmp_path / "log"),
            "checkpoint_dir": str(tmp_path / "ckpt"),
            "tmp_dir": str(tmp_path / "run" / "tmp" / "trainer"),
        }
    }
    old = os.umask(umask)
    try:
        prepare_process_dirs(resolved)
        prepare_process_dirs(resolved)  # twice: idempotent
    finally:
        os.umask(old)
    for key in ("run_dir", "log_dir", "checkpoint_dir", "tmp_dir"):
        mode = stat.S_IMODE(Path(resolved["paths"][key]).stat().st_mode)
        assert mode == 0o750, (key, oct(mode))


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_tmp_dir_is_given_to_the_process_user(tmp_path):
    import pwd

    nobody = pwd.getpwnam("nobody")
    resolved = {"user": "nobody", "paths": {"tmp_dir": str(tmp_path / "tmp" / "w"), "run_dir": str(tmp_path)}}
    prepare_process_dirs(resolved)
    st = (tmp_path / "tmp" / "w").stat()
    assert st.st_uid == nobody.pw_uid and tmp_path.stat().st_uid == 0  # the existing run dir keeps its owner
