"""``auto:N`` GPU allocation: the least-used free GPUs, one lock file per GPU in the run dir.

``allocate_gpus(count, run_dir, owner)`` ranks the host's GPUs (keel.host.gpus) and
takes them under ``<run_dir>/gpu<index>.lock`` with keel's one flock primitive
(keel.fs.lock.FileLock), so two processes starting at once never take the same GPU.
The locks are held for as long as the allocation is (the life of the process,
normally): the kernel drops them when the process dies.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from keel.fs.lock import FileLock, LockTimeout
from keel.host.gpus import NvmlUnusable, query_gpus

__all__ = [
    "GpuAllocation",
    "GpuAllocationError",
    "GpuAllocationTimeout",
    "NotEnoughGpus",
    "allocate_gpus",
    "gpu_lock_path",
    "gpus_for_process",
]


class GpuAllocationError(RuntimeError):
    """GPUs could not be allocated. ``run_dir`` is where the lock files live."""

    def __init__(self, message: str, run_dir: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.run_dir = run_dir


class NotEnoughGpus(GpuAllocationError):
    """Fewer GPUs exist on this host than were asked for (or there is no usable NVML at all)."""


class GpuAllocationTimeout(GpuAllocationError, TimeoutError):
    """Enough GPUs exist, but not enough were free (unlocked) within the timeout. ``busy`` names the held locks."""

    def __init__(self, message: str, run_dir: str | os.PathLike[str], busy: list[Path]) -> None:
        super().__init__(message, run_dir)
        self.busy = busy


def gpu_lock_path(run_dir: str | os.PathLike[str], index: int) -> Path:
    """The lock file that GPU ``index`` is taken under; a holder's note ("trainer pid=12") is inside."""
    return Path(run_dir) / f"gpu{index}.lock"


@dataclass
class GpuAllocation:
    """GPUs taken by one process. Hold it for the life of the process; ``release()`` (or exit) frees them."""

    indices: list[int]
    owner: str
    lock_paths: list[Path] = field(default_factory=list)
    _locks: list[FileLock] = field(default_factory=list, repr=False)

    @property
    def cuda_visible_devices(self) -> str:
        """The value for CUDA_VISIBLE_DEVICES: "2,0" (ordered by preference), or "" for none."""
        return ",".join(str(i) for i in self.indices)

    def release(self) -> None:
        """Unlock every GPU. The lock files stay: deleting a lock file races with a process about to lock it."""
        while self._locks:
            _unlock(self._locks.pop())

    def __enter__(self) -> GpuAllocation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _unlock(lock: FileLock) -> None:
    try:
        lock.release()
    finally:
        lock.close()


def _try_lock(path: Path) -> FileLock | None:
    """The lock on ``path`` if it was free this instant; None when another holder has it."""
    lock = FileLock(path, timeout=0.0)  # timeout 0: one non-blocking flock attempt
    try:
        lock.acquire()
    except LockTimeout:
        lock.close()
        return None
    return lock


def _write_note(path: Path, owner: str) -> None:
    """Who holds the GPU, for people debugging. Safe to truncate now: we hold the lock.

    A second descriptor of the file, closed again, does not drop our flock: flock
    locks belong to the lock's own open file description.
    """
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{owner} pid={os.getpid()}\n".encode(), 0)
    finally:
        os.close(fd)


def _holder_note(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip() or "holder unknown"
    except OSError:
        return "holder unknown"


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
    GpuAllocationTimeout, naming the held lock files and their holders, when the
    GPUs exist but stay taken for ``timeout`` seconds.
    """
    run_path = Path(run_dir)
    if count < 0:
        raise ValueError(f"GPU count must be >= 0, got {count}")
    if count == 0:
        return GpuAllocation([], owner)
    try:
        gpus = query_gpus(nvml)
    except NvmlUnusable as exc:
        raise NotEnoughGpus(f"{owner}: cannot allocate GPUs: {exc}", run_path) from exc
    if len(gpus) < count:
        raise NotEnoughGpus(f"{owner} asks for {count} GPU(s) (auto:{count}); this host has {len(gpus)}", run_path)
    order = [g.index for g in sorted(gpus, key=lambda g: (g.memory_used, g.util_percent, g.index))]
    run_path.mkdir(parents=True, exist_ok=True)
    deadline = clock() + timeout
    while True:
        taken: list[tuple[int, FileLock]] = []
        busy: list[Path] = []
        for index in order:
            lock = _try_lock(gpu_lock_path(run_path, index))
            if lock is None:
                busy.append(gpu_lock_path(run_path, index))
                continue
            taken.append((index, lock))
            if len(taken) == count:
                break
        if len(taken) == count:
            for index, lock in taken:
                _write_note(lock.path, owner)
            return GpuAllocation([i for i, _ in taken], owner, [lock.path for _, lock in taken],
                                 [lock for _, lock in taken])
        # Not enough: give back what we took, so two processes each wanting two of three GPUs cannot deadlock.
        for _, lock in taken:
            _unlock(lock)
        if clock() >= deadline:
            held = ", ".join(f"{p} ({_holder_note(p)})" for p in busy)
            raise GpuAllocationTimeout(
                f"{owner}: only {len(taken)} of {count} GPU(s) free after {timeout:g}s; held: {held}", run_path, busy
            )
        time.sleep(poll)  # polls the locks: flock cannot wait for "any N of these" at once


def gpus_for_process(
    resolved: dict,
    *,
    environ: dict[str, str] | None = None,
    nvml: Any | None = None,
    timeout: float = 30.0,
) -> tuple[list[int], GpuAllocation | None]:
    """Apply a resolved file's ``gpus`` (and, for ``auto``, its ``name`` and ``paths.run_dir``) before torch is
    imported; returns (indices, allocation to keep).

    ``[]``: no GPU (CUDA_VISIBLE_DEVICES=""); ``[0, 1]``: as rendered (the backend
    already set the variable; it is set again here so a hand-started process agrees);
    ``{"auto": N}``: ``allocate_gpus`` under the run dir's lock files. Keep the returned
    allocation alive for the life of the process, and report the indices in the status.
    """
    env = os.environ if environ is None else environ
    spec = resolved["gpus"]
    if isinstance(spec, dict):
        alloc = allocate_gpus(int(spec["auto"]), resolved["paths"]["run_dir"], resolved["name"], timeout=timeout, nvml=nvml)
        env["CUDA_VISIBLE_DEVICES"] = alloc.cuda_visible_devices
        return list(alloc.indices), alloc
    indices = [int(i) for i in spec]
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in indices)
    return indices, None
