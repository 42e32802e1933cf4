"""Resources: psutil/NVML sampling, ``auto:N`` GPU allocation, per-process directories.

- ``ResourceSampler.sample(pids)`` measures each process *tree* (a trainer's
  DataLoader workers and torchrun's children count towards their parent), the
  host, and, when NVML is usable, every GPU and the GPU memory of every pid.
  NVML is optional: no driver (``NVMLError_LibraryNotFound``) or any other
  ``NVMLError`` becomes ``gpu_error`` ("no GPU metrics: ..."), never an exception.
- ``allocate_gpus(count, run_dir, owner)`` picks the least-used GPUs under one
  ``flock`` file per GPU in the run dir, so two processes starting at once never
  take the same GPU. The locks are held for as long as the allocation is (the
  life of the process, normally): the kernel drops them when the process dies.
- ``prepare_process_dirs(resolved)`` creates a process's TMPDIR, log and
  checkpoint dirs with mode 0750 (and its owner, when running as root).

The NVML module is injectable (``nvml=``) so tests can replay nvidia-ml-py's own
error classes without a GPU; by default ``pynvml`` is imported lazily, on first use.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable

import psutil

__all__ = [
    "GpuAllocation",
    "GpuAllocationError",
    "GpuAllocationTimeout",
    "GpuSample",
    "HostSample",
    "NotEnoughGpus",
    "ProcessSample",
    "ResourceSample",
    "ResourceSampler",
    "allocate_gpus",
    "gpus_for_process",
    "load_nvml",
    "prepare_process_dirs",
    "query_gpus",
]

DIR_MODE = 0o750


# --------------------------------------------------------------------------- samples


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
class GpuSample:
    index: int
    name: str
    util_percent: float | None
    memory_used: int
    memory_total: int
    temperature_c: float | None
    power_w: float | None


@dataclass(frozen=True)
class HostSample:
    cpu_percent: float
    mem_used: int
    mem_total: int


@dataclass(frozen=True)
class ResourceSample:
    mono: float
    host: HostSample
    processes: dict[int, ProcessSample]
    gpus: list[GpuSample]
    gpu_error: str | None  # "no GPU metrics: NVML Shared Library Not Found"
    gpu_process_memory: dict[int, int]  # pid -> bytes


def load_nvml() -> ModuleType:
    """Import nvidia-ml-py's ``pynvml`` (lazily: importing it costs ~50 ms and most hosts here have no GPU)."""
    import pynvml

    return pynvml


class _Nvml:
    """NVML initialised once, lazily; remembers why it is unusable instead of retrying every poll."""

    def __init__(self, nvml: Any | None, loader: Callable[[], Any] = load_nvml) -> None:
        self._mod = nvml
        self._loader = loader
        self._ready = False
        self.error: str | None = None

    def get(self) -> Any | None:
        if self._ready:
            return self._mod
        if self.error is not None:
            return None
        try:
            if self._mod is None:
                self._mod = self._loader()
        except ImportError as exc:  # nvidia-ml-py is a hard dependency, but degrade anyway
            self.error = f"no GPU metrics: {exc}"
            return None
        try:
            self._mod.nvmlInit()
        except self._mod.NVMLError as exc:
            self.error = f"no GPU metrics: {exc}"
            return None
        self._ready = True
        return self._mod

    def shutdown(self) -> None:
        if self._ready:
            self._ready = False
            try:
                self._mod.nvmlShutdown()
            except self._mod.NVMLError:
                pass


def _optional(fn: Callable[[], Any], nvml: Any) -> Any:
    """A field some GPUs do not support (utilisation on MIG, power on some boards) is None, not an error."""
    try:
        return fn()
    except nvml.NVMLError:
        return None


def _sample_gpus(nvml: Any) -> tuple[list[GpuSample], dict[int, int], str | None]:
    """Every GPU and the memory of every pid on it. A failing GPU is skipped and named in the error."""
    gpus: list[GpuSample] = []
    per_pid: dict[int, int] = {}
    errors: list[str] = []
    try:
        count = nvml.nvmlDeviceGetCount()
    except nvml.NVMLError as exc:
        return [], {}, f"no GPU metrics: {exc}"
    for index in range(count):
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(handle)
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
        except nvml.NVMLError as exc:
            errors.append(f"GPU {index}: {exc}")
            continue
        if isinstance(name, bytes):  # older nvidia-ml-py returned bytes
            name = name.decode(errors="replace")
        util = _optional(lambda: float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu), nvml)
        temp = _optional(lambda: float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)), nvml)
        power = _optional(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0, nvml)  # mW -> W
        gpus.append(GpuSample(index, str(name), util, int(mem.used), int(mem.total), temp, power))
        for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            procs = _optional(lambda: getattr(nvml, getter)(handle), nvml) or []
            for proc in procs:
                used = getattr(proc, "usedGpuMemory", None)
                if used is None:  # NVML reports "not available" under some permission setups
                    continue
                per_pid[int(proc.pid)] = per_pid.get(int(proc.pid), 0) + int(used)
    error = ("GPU metrics incomplete: " + "; ".join(errors)) if errors else None
    return gpus, per_pid, error


class ResourceSampler:
    """Samples process trees (psutil) and GPUs (NVML, optional). Keep one per poller: CPU% needs the previous sample."""

    def __init__(self, *, nvml: Any | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._nvml = _Nvml(nvml)
        self._clock = clock
        # psutil.Process objects are kept between polls because cpu_percent() measures since the previous call.
        self._procs: dict[tuple[int, int], psutil.Process] = {}
        psutil.cpu_percent(None)  # prime the host counter (first call always returns 0.0)

    def _proc(self, pid: int, start_ticks: int | None) -> psutil.Process:
        key = (pid, start_ticks)
        proc = self._procs.get(key)
        # Keyed by (pid, start time): a reused pid gets a fresh object, so a fresh CPU baseline.
        if proc is None:
            proc = psutil.Process(pid)
            proc.cpu_percent(None)
            self._procs[key] = proc
        return proc

    def _measure(self, proc: psutil.Process) -> tuple[int, float]:
        with proc.oneshot():  # one read of /proc/<pid>/stat for both
            return proc.memory_info().rss, proc.cpu_percent(None)

    def _sample_tree(self, pid: int, table: dict[int, tuple[int, int]], kids: dict[int, list[int]],
                     seen: set) -> ProcessSample:
        if pid not in table:
            return ProcessSample(pid, False, None, 0, 0.0, 0)
        try:
            root = self._proc(pid, table[pid][1])
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
                m_rss, m_cpu = self._measure(self._proc(member, table[member][1]))
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
        host = HostSample(psutil.cpu_percent(None), int(vm.total - vm.available), int(vm.total))

        nvml = self._nvml.get()
        if nvml is None:
            gpus, per_pid, gpu_error = [], {}, self._nvml.error
        else:
            gpus, per_pid, gpu_error = _sample_gpus(nvml)
            if not gpus and gpu_error:
                gpu_error = gpu_error if gpu_error.startswith("no GPU metrics") else f"no GPU metrics: {gpu_error}"
        if nvml is not None and (gpus or per_pid):
            trees = {
                pid: _with_gpu_memory(s, per_pid) if s.alive else s for pid, s in trees.items()
            }
        return ResourceSample(self._clock(), host, trees, gpus, gpu_error, per_pid)

    def close(self) -> None:
        """Shut NVML down (if it was initialised) and forget cached processes."""
        self._nvml.shutdown()
        self._procs.clear()


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


# --------------------------------------------------------------------------- GPU allocation


class GpuAllocationError(RuntimeError):
    """GPUs could not be allocated. ``run_dir`` is where the lock files live."""

    def __init__(self, message: str, run_dir: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.run_dir = run_dir


class NotEnoughGpus(GpuAllocationError):
    """Fewer GPUs exist on this host than were asked for (or there is no usable NVML at all)."""


class GpuAllocationTimeout(GpuAllocationError, TimeoutError):
    """Enough GPUs exist, but not enough were free (unlocked) within the timeout."""


@dataclass(frozen=True)
class GpuUsage:
    index: int
    memory_used: int
    util_percent: float


def query_gpus(nvml: Any | None = None) -> list[GpuUsage]:
    """Index, used memory and utilisation of every GPU. Raises NotEnoughGpus when NVML is unusable."""
    holder = _Nvml(nvml)
    mod = holder.get()
    if mod is None:
        raise NotEnoughGpus(f"cannot allocate GPUs: {holder.error}")
    try:
        out = []
        for index in range(mod.nvmlDeviceGetCount()):
            handle = mod.nvmlDeviceGetHandleByIndex(index)
            used = int(mod.nvmlDeviceGetMemoryInfo(handle).used)
            util = _optional(lambda: float(mod.nvmlDeviceGetUtilizationRates(handle).gpu), mod)
            out.append(GpuUsage(index, used, util if util is not None else 0.0))
        return out
    except mod.NVMLError as exc:
        raise NotEnoughGpus(f"cannot allocate GPUs: NVML failed: {exc}") from exc
    finally:
        holder.shutdown()


@dataclass
class GpuAllocation:
    """GPUs taken by one process. Hold it for the life of the process; ``release()`` (or exit) frees them."""

    indices: list[int]
    owner: str
    lock_paths: list[Path] = field(default_factory=list)
    _fds: list[int] = field(default_factory=list, repr=False)

    @property
    def cuda_visible_devices(self) -> str:
        """The value for CUDA_VISIBLE_DEVICES: "2,0" (ordered by preference), or "" for none."""
        return ",".join(str(i) for i in self.indices)

    def release(self) -> None:
        """Unlock every GPU. The lock files stay: deleting a lock file races with a process about to lock it."""
        for fd in self._fds:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        self._fds.clear()

    def __enter__(self) -> GpuAllocation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _gpu_lock_path(run_dir: Path, index: int) -> Path:
    return run_dir / f"gpu{index}.lock"


def _try_lock(path: Path) -> int | None:
    """Open and lock without blocking; None when another process holds it.

    The file is never truncated before it is locked (as filelock's _unix.py
    explains, that would wipe the holder's note), and never unlinked.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return fd


def allocate_gpus(
    count: int,
    run_dir: str | os.PathLike[str],
    owner: str,
    *,
    timeout: float = 30.0,
    nvml: Any | None = None,
    poll: float = 0.2,
    clock: Callable[[], float] = time.monotonic,
) -> GpuAllocation:
    """Lock the ``count`` least-used free GPUs for ``owner`` (``auto:N``).

    Least used = least memory in use, then lowest utilisation, then lowest index.
    A GPU whose lock file is held by a live process is never chosen. Raises
    NotEnoughGpus when the host has fewer than ``count`` GPUs (or no NVML) and
    GpuAllocationTimeout when they exist but stay taken for ``timeout`` seconds.
    """
    run_path = Path(run_dir)
    if count < 0:
        raise ValueError(f"GPU count must be >= 0, got {count}")
    if count == 0:
        return GpuAllocation([], owner)
    gpus = query_gpus(nvml)
    if len(gpus) < count:
        raise NotEnoughGpus(f"{owner} asks for {count} GPU(s) (auto:{count}); this host has {len(gpus)}", run_path)
    order = [g.index for g in sorted(gpus, key=lambda g: (g.memory_used, g.util_percent, g.index))]
    run_path.mkdir(parents=True, exist_ok=True)
    deadline = clock() + timeout
    while True:
        taken: list[tuple[int, int]] = []
        for index in order:
            fd = _try_lock(_gpu_lock_path(run_path, index))
            if fd is None:
                continue
            taken.append((index, fd))
            if len(taken) == count:
                break
        if len(taken) == count:
            for index, fd in taken:
                # Safe to rewrite now that we hold the lock: a note for people debugging who holds what.
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{owner} pid={os.getpid()}\n".encode(), 0)
            return GpuAllocation(
                [i for i, _ in taken], owner, [_gpu_lock_path(run_path, i) for i, _ in taken], [fd for _, fd in taken]
            )
        # Not enough: give back what we took, so two processes each wanting two of three GPUs cannot deadlock.
        for _, fd in taken:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        if clock() >= deadline:
            raise GpuAllocationTimeout(
                f"{owner}: only {len(taken)} of {count} GPU(s) free after {timeout:g}s "
                f"(locks in {run_path}/gpu*.lock)",
                run_path,
            )
        time.sleep(poll)


def gpus_for_process(
    resolved: dict,
    *,
    environ: dict[str, str] | None = None,
    nvml: Any | None = None,
    timeout: float = 30.0,
) -> tuple[list[int], GpuAllocation | None]:
    """Apply a resolved file's ``gpus`` before torch is imported; returns (indices, allocation to keep).

    ``[]``: no GPU (CUDA_VISIBLE_DEVICES=""); ``[0, 1]``: as rendered (the backend
    already set the variable; it is set again here so a hand-started process agrees);
    ``{"auto": N}``: ``allocate_gpus`` under the run dir's lock files. Keep the returned
    allocation alive for the life of the process, and report the indices in the status.
    """
    env = os.environ if environ is None else environ
    spec = resolved.get("gpus") or []
    if isinstance(spec, dict):
        alloc = allocate_gpus(int(spec["auto"]), resolved["paths"]["run_dir"], resolved.get("name", "process"),
                              timeout=timeout, nvml=nvml)
        env["CUDA_VISIBLE_DEVICES"] = alloc.cuda_visible_devices
        return list(alloc.indices), alloc
    indices = [int(i) for i in spec]
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in indices)
    return indices, None


# --------------------------------------------------------------------------- directories


def _ensure_dir(path: Path, uid: int | None, gid: int | None) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    st = path.stat()
    if st.st_uid == os.geteuid():
        # mkdir's mode is filtered by the umask; set it explicitly so a 0077 or 0022 umask gives the same result.
        os.chmod(path, DIR_MODE)
    if uid is not None and (st.st_uid != uid or (gid is not None and st.st_gid != gid)):
        os.chown(path, uid, -1 if gid is None else gid)


def prepare_process_dirs(resolved: dict) -> None:
    """Create tmp_dir, log_dir, checkpoint_dir (and run_dir) from a resolved per-process file, mode 0750.

    When running as root and the file names a ``user``, the process's own
    tmp_dir is given to that user (run/log/checkpoint dirs are shared by the
    stack and keep their owner unless newly created here).
    """
    paths = resolved.get("paths", {})
    uid = gid = None
    user = resolved.get("user")
    if user and os.geteuid() == 0:
        import pwd

        entry = pwd.getpwnam(user)
        uid, gid = entry.pw_uid, entry.pw_gid
    for key in ("run_dir", "log_dir", "checkpoint_dir"):
        if paths.get(key):
            p = Path(paths[key])
            existed = p.exists()
            _ensure_dir(p, None if existed else uid, None if existed else gid)
    if paths.get("tmp_dir"):
        _ensure_dir(Path(paths["tmp_dir"]), uid, gid)
