"""keel.host.sampling and keel.host.gpus: process-tree sampling, and NVML's absence or failures degrading."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import psutil
import pynvml
import pytest

from keel.host.gpus import Nvml, NvmlUnusable, query_gpus
from keel.host.sampling import ResourceSampler, busy_percent
from tests.support import PYTHON, is_alive, wait_until
from tests.unit.fake_nvml import NVML_ERRORS, FakeNvml


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


def test_host_cpu_is_measured_since_the_previous_sample_whichever_thread_takes_it():
    # The page samples from a pool of threads; psutil.cpu_percent(None) keeps a baseline per thread, so
    # a sample taken on a thread that had not sampled before read 0 % whatever the host did.
    sampler = ResourceSampler(nvml=FakeNvml())
    me = psutil.Process()
    c0 = sum(me.cpu_times()[:2])
    while sum(me.cpu_times()[:2]) - c0 < 0.2:  # this process alone keeps one core busy
        pass
    got: list[float] = []
    worker = threading.Thread(target=lambda: got.append(sampler.sample([]).host.cpu_percent))
    worker.start()
    worker.join()
    assert got[0] >= 100 / psutil.cpu_count() * 0.5, got  # at least half of one core's share


def test_busy_percent_counts_as_psutil_does():
    times = type(psutil.cpu_times())
    zero = times(*[0.0] * len(times._fields))
    after = zero._replace(user=3.0, idle=4.0, iowait=1.0)  # Linux's fields; iowait counts as idle
    assert busy_percent(zero, after) == 37.5
    assert busy_percent(after, after) == 0.0  # no time passed: no figure, not a division by zero
    assert busy_percent(after, zero) == 0.0  # a counter that stepped back counts nothing


def test_the_first_sample_of_a_busy_process_has_no_cpu_figure_not_thousands_of_percent(reaper):
    # The baseline is taken in that same sample, microseconds before the reading: one clock tick over that
    # instant read as ~9000 % on the page's CPU plot. The first sample counts 0; the next one measures.
    busy = reaper.popen([PYTHON, "-c", "while True: pass"])
    child_of = psutil.Process(busy.pid)
    wait_until(lambda: sum(child_of.cpu_times()[:2]) > 0.1, 30, what="the busy loop burning CPU")
    # a tick lands inside that instant only now and then: many first samples, none may read a figure
    firsts = [ResourceSampler(nvml=FakeNvml()) for _ in range(500)]
    assert {s.sample([busy.pid]).processes[busy.pid].cpu_percent for s in firsts} == {0.0}
    sampler = firsts[0]
    c0 = sum(child_of.cpu_times()[:2])
    wait_until(lambda: sum(child_of.cpu_times()[:2]) - c0 > 0.1, 30, what="0.1 s more of CPU")
    assert 0 < sampler.sample([busy.pid]).processes[busy.pid].cpu_percent <= 100 * psutil.cpu_count() + 5


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


# --------------------------------------------------------------------------- NVML failures


def test_a_gpu_lost_between_samples_is_skipped_and_named_then_comes_back():
    fake = FakeNvml([{"used": 1}, {"used": 2}])
    sampler = ResourceSampler(nvml=fake)
    assert [g.index for g in sampler.sample([]).gpus] == [0, 1]
    fake.fail["nvmlDeviceGetHandleByIndex:1"] = pynvml.NVMLError_GpuIsLost  # falls off the bus mid-run
    s = sampler.sample([os.getpid()])
    assert [g.index for g in s.gpus] == [0]
    assert s.gpu_error == "GPU metrics incomplete: GPU 1: GPU is lost"
    assert s.processes[os.getpid()].alive  # the processes are still measured
    del fake.fail["nvmlDeviceGetHandleByIndex:1"]
    s = sampler.sample([])
    assert [g.index for g in s.gpus] == [0, 1] and s.gpu_error is None
    assert fake.init_calls == 1  # NVML was not re-initialised for a per-GPU failure


def test_every_gpu_failing_mid_sample_means_no_gpu_metrics():
    fake = FakeNvml([{}, {}], fail={"nvmlDeviceGetName:0": pynvml.NVMLError_Unknown,
                                    "nvmlDeviceGetMemoryInfo:1": pynvml.NVMLError_GpuIsLost})
    s = ResourceSampler(nvml=fake).sample([os.getpid()])
    assert s.gpus == [] and s.gpu_process_memory == {}
    assert s.gpu_error == "no GPU metrics: GPU 0: Unknown Error; GPU 1: GPU is lost"
    assert s.processes[os.getpid()].gpu_memory_bytes is None


def test_per_process_gpu_memory_failing_keeps_the_gpu():
    me = os.getpid()
    fake = FakeNvml([{"used": 7, "procs": {me: 3}}],
                    fail={"nvmlDeviceGetComputeRunningProcesses:0": pynvml.NVMLError_NoPermission})
    s = ResourceSampler(nvml=fake).sample([me])
    assert [(g.index, g.memory_used) for g in s.gpus] == [(0, 7)] and s.gpu_error is None
    assert s.gpu_process_memory == {} and s.processes[me].gpu_memory_bytes == 0


def test_real_pynvml_without_a_driver_is_unusable_with_the_reason():
    nvml = Nvml()
    assert nvml.get() is None and nvml.error == "no GPU metrics: NVML Shared Library Not Found"
    with pytest.raises(NvmlUnusable, match="NVML Shared Library Not Found"):
        query_gpus()


def test_a_missing_pynvml_module_is_no_gpu_metrics():
    def loader():
        raise ImportError("No module named 'pynvml'")

    nvml = Nvml(loader=loader)
    assert nvml.get() is None and nvml.error == "no GPU metrics: No module named 'pynvml'"


def test_query_gpus_failing_midway_is_unusable_and_shuts_nvml_down():
    fake = FakeNvml([{}, {}], fail={"nvmlDeviceGetMemoryInfo:1": pynvml.NVMLError_GpuIsLost})
    with pytest.raises(NvmlUnusable, match="NVML failed: GPU is lost"):
        query_gpus(fake)
    assert fake.init_calls == 1 and fake.shutdown_calls == 1
