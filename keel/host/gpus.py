"""Reading the GPUs through NVML, which is optional: no driver means no GPU metrics, never a crash.

- ``Nvml`` initialises NVML once, lazily, and remembers why it is unusable:
  no driver (``nvmlInit`` raises ``NVMLError_LibraryNotFound``), a missing
  ``pynvml`` or any other ``NVMLError`` becomes ``error`` ("no GPU metrics: ...").
- ``sample_gpus(nvml)`` reads every GPU (``GpuSample``) and the GPU memory of every
  pid; a GPU that fails mid-sample is skipped and named in the error, the others kept.
- ``query_gpus()`` reads what ``auto:N`` allocation ranks GPUs by (``GpuUsage``).

The NVML module is injectable (``nvml=``) so tests can replay nvidia-ml-py's own
error classes without a GPU; by default ``pynvml`` is imported on first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

__all__ = ["GpuSample", "GpuUsage", "Nvml", "NvmlUnusable", "load_nvml", "query_gpus", "sample_gpus"]


@dataclass(frozen=True)
class GpuSample:
    """One GPU at one poll. Fields the board does not support (utilisation on MIG, power) are None."""

    index: int
    name: str
    util_percent: float | None
    memory_used: int
    memory_total: int
    temperature_c: float | None
    power_w: float | None


@dataclass(frozen=True)
class GpuUsage:
    """What ``auto:N`` allocation ranks a GPU by."""

    index: int
    memory_used: int
    util_percent: float


class NvmlUnusable(RuntimeError):
    """NVML cannot be used on this host (no driver, no library, NVML failed); the message says why."""


def load_nvml() -> ModuleType:
    """Import nvidia-ml-py's ``pynvml`` (lazily: importing it costs ~50 ms and most hosts here have no GPU)."""
    import pynvml

    return pynvml


class Nvml:
    """NVML initialised once, lazily; remembers why it is unusable instead of retrying every poll."""

    def __init__(self, nvml: Any | None = None, loader: Callable[[], Any] = load_nvml) -> None:
        self._mod = nvml
        self._loader = loader
        self._ready = False
        self.error: str | None = None

    def get(self) -> Any | None:
        """The initialised module, or None (and ``error`` set) when NVML is unusable."""
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


def sample_gpus(nvml: Any) -> tuple[list[GpuSample], dict[int, int], str | None]:
    """Every GPU, the memory of every pid on them (pid -> bytes) and an error, or None when all GPUs answered.

    A failing GPU is skipped and named in the error ("GPU metrics incomplete: GPU 1: ...");
    when no GPU could be read at all the error starts with "no GPU metrics".
    """
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
    if not errors:
        return gpus, per_pid, None
    detail = "; ".join(errors)
    return gpus, per_pid, (f"GPU metrics incomplete: {detail}" if gpus else f"no GPU metrics: {detail}")


def query_gpus(nvml: Any | None = None) -> list[GpuUsage]:
    """Index, used memory and utilisation of every GPU. Raises NvmlUnusable when NVML cannot be used."""
    holder = Nvml(nvml)
    mod = holder.get()
    if mod is None:
        raise NvmlUnusable(holder.error or "no GPU metrics")
    try:
        out = []
        for index in range(mod.nvmlDeviceGetCount()):
            handle = mod.nvmlDeviceGetHandleByIndex(index)
            used = int(mod.nvmlDeviceGetMemoryInfo(handle).used)
            util = _optional(lambda: float(mod.nvmlDeviceGetUtilizationRates(handle).gpu), mod)
            out.append(GpuUsage(index, used, util if util is not None else 0.0))
        return out
    except mod.NVMLError as exc:
        raise NvmlUnusable(f"NVML failed: {exc}") from exc
    finally:
        holder.shutdown()
