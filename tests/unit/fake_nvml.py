"""A stand-in for nvidia-ml-py's ``pynvml`` with the real module's error classes (there is no GPU here).

Tests (and the allocation scripts they start) pass ``FakeNvml(...)`` as ``nvml=`` to
keel.host.gpus, keel.host.sampling and keel.host.gpu_allocation.
"""

from __future__ import annotations

from dataclasses import dataclass

import pynvml

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
        self._check("nvmlDeviceGetName", h)
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
