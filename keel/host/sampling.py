"""Process-tree, host and GPU sampling: what the watchdog, the page and bin/status measure.

``ResourceSampler.sample(pids)`` measures each process *tree* (a trainer's
DataLoader workers and torchrun's children count towards their parent), the
host, and, when NVML is usable, every GPU and the GPU memory of every pid.
NVML is optional (keel.host.gpus): no driver or any ``NVMLError`` becomes
``gpu_error`` ("no GPU metrics: ..."), never an exception.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import psutil

from keel.host.gpus import GpuSample, Nvml, sample_gpus

__all__ = ["HostSample", "ProcessSample", "ResourceSample", "ResourceSampler"]


@dataclass(frozen=True)
class ProcessSample:
    """One process tree, measured at one poll. ``alive`` is False for a gone or zombie root."""

    pid: int
    alive: bool
    create_time: float | None
    rss_bytes: int
    cpu_percent: float
    num_procs: int
    # Additions beyond docs/internals.md (defaults keep the documented constructor valid):
    tree_pids: tuple[int, ...] = ()
    gpu_memory_bytes: int | None = None  # sum over the tree; None when there are no GPU metrics


@dataclass(frozen=True)
class HostSample:
    """The whole host at one poll: CPU percent over all cores since the previous sample, memory in bytes."""

    cpu_percent: float
    mem_used: int
    mem_total: int


@dataclass(frozen=True)
class ResourceSample:
    """One poll: every asked-for process tree (by root pid), the host, and the GPUs (or why there are none)."""

    mono: float
    host: HostSample
    processes: dict[int, ProcessSample]
    gpus: list[GpuSample]
    gpu_error: str | None  # "no GPU metrics: NVML Shared Library Not Found"
    gpu_process_memory: dict[int, int]  # pid -> bytes


class ResourceSampler:
    """Samples process trees (psutil) and GPUs (NVML, optional). Keep one per poller: CPU% needs the previous sample."""

    def __init__(self, *, nvml: Any | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._nvml = Nvml(nvml)
        self._clock = clock
        # psutil.Process objects are kept between polls because cpu_percent() measures since the previous call.
        self._procs: dict[tuple[int, int], psutil.Process] = {}
        # The host's CPU times at the previous sample, kept here: psutil.cpu_percent(None) keeps its own
        # baseline per *thread*, and the page samples from a pool of threads, so each thread's first
        # sample read 0 % (the page's host line zig-zagged 0 / 60 % while the trainer used a whole core).
        self._host_times = psutil.cpu_times()

    def _proc(self, pid: int, start_ticks: int | None) -> tuple[psutil.Process, bool]:
        """The kept Process object of ``pid``, and whether it was made just now (no CPU baseline yet)."""
        key = (pid, start_ticks)
        proc = self._procs.get(key)
        # Keyed by (pid, start time): a reused pid gets a fresh object, so a fresh CPU baseline.
        if proc is None:
            proc = psutil.Process(pid)
            proc.cpu_percent(None)
            self._procs[key] = proc
            return proc, True
        return proc, False

    def _measure(self, proc: psutil.Process, fresh: bool) -> tuple[int, float]:
        with proc.oneshot():  # one read of /proc/<pid>/stat for both
            rss, cpu = proc.memory_info().rss, proc.cpu_percent(None)
        # A baseline taken microseconds ago: one clock tick of CPU over that instant reads as thousands
        # of percent. The first sample of a process has no CPU figure yet; it counts 0.
        return rss, 0.0 if fresh else cpu

    def _sample_tree(self, pid: int, table: dict[int, tuple[int, int]], kids: dict[int, list[int]],
                     seen: set) -> ProcessSample:
        if pid not in table:
            return ProcessSample(pid, False, None, 0, 0.0, 0)
        try:
            root, root_fresh = self._proc(pid, table[pid][1])
            with root.oneshot():
                create_time = root.create_time()
                if root.status() == psutil.STATUS_ZOMBIE:
                    return ProcessSample(pid, False, create_time, 0, 0.0, 0)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return ProcessSample(pid, False, None, 0, 0.0, 0)
        rss = 0
        cpu = 0.0
        pids: list[int] = []
        todo = [pid]
        while todo:
            member = todo.pop()
            todo.extend(kids.get(member, ()))
            try:
                proc, fresh = self._proc(member, table[member][1])
                m_rss, m_cpu = self._measure(proc, fresh or (member == pid and root_fresh))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue  # a child that exited since /proc was listed
            rss += m_rss
            cpu += m_cpu
            pids.append(member)
            seen.add((member, table[member][1]))
        return ProcessSample(pid, True, create_time, rss, cpu, len(pids), tuple(pids))

    def sample(self, pids: Iterable[int]) -> ResourceSample:
        """Measure each pid's whole process tree, the host and the GPUs. Never raises for a gone pid or missing GPU."""
        # One pass over /proc per sample: psutil's children() would rescan it for every tree.
        table = _proc_table()
        kids: dict[int, list[int]] = {}
        for child, (ppid, _) in table.items():
            kids.setdefault(ppid, []).append(child)
        seen: set[tuple[int, int]] = set()
        trees = {pid: self._sample_tree(pid, table, kids, seen) for pid in dict.fromkeys(pids)}
        for stale in set(self._procs) - seen:
            del self._procs[stale]

        vm = psutil.virtual_memory()
        host_times = psutil.cpu_times()
        host = HostSample(busy_percent(self._host_times, host_times), int(vm.total - vm.available), int(vm.total))
        self._host_times = host_times

        nvml = self._nvml.get()
        if nvml is None:
            gpus, per_pid, gpu_error = [], {}, self._nvml.error
        else:
            gpus, per_pid, gpu_error = sample_gpus(nvml)
        if nvml is not None and (gpus or per_pid):
            trees = {
                pid: _with_gpu_memory(s, per_pid) if s.alive else s for pid, s in trees.items()
            }
        return ResourceSample(self._clock(), host, trees, gpus, gpu_error, per_pid)

    def close(self) -> None:
        """Shut NVML down (if it was initialised) and forget cached processes."""
        self._nvml.shutdown()
        self._procs.clear()


def busy_percent(before: Any, after: Any) -> float:
    """Percent of all cores busy between two ``psutil.cpu_times()``, counted as psutil counts it: guest
    time is already in user and nice, and iowait is idle. 0.0 when no time passed."""
    delta = {f: max(0.0, getattr(after, f) - getattr(before, f)) for f in before._fields}  # a counter can step back
    total = sum(delta.values()) - delta.get("guest", 0.0) - delta.get("guest_nice", 0.0)
    busy = total - delta["idle"] - delta.get("iowait", 0.0)
    return round(100.0 * busy / total, 1) if total > 0 else 0.0


def _proc_table(proc_root: str = "/proc") -> dict[int, tuple[int, int]]:
    """pid -> (ppid, start time in clock ticks) for every process, from one read of each /proc/<pid>/stat."""
    table: dict[int, tuple[int, int]] = {}
    try:
        entries = os.scandir(proc_root)
    except OSError:
        return table
    with entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                with open(f"{proc_root}/{entry.name}/stat", "rb") as f:
                    data = f.read()
            except OSError:
                continue  # exited while we listed
            # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
            fields = data[data.rfind(b")") + 2 :].split()
            try:
                table[int(entry.name)] = (int(fields[1]), int(fields[19]))
            except (IndexError, ValueError):
                continue
    return table


def _with_gpu_memory(s: ProcessSample, per_pid: dict[int, int]) -> ProcessSample:
    total = sum(per_pid.get(p, 0) for p in s.tree_pids)
    return ProcessSample(s.pid, s.alive, s.create_time, s.rss_bytes, s.cpu_percent, s.num_procs, s.tree_pids, total)
