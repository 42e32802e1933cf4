"""Big arrays go back to the system when freed (glibc's mmap threshold, fixed at 1 MiB).

glibc serves an allocation over its mmap threshold with a mapping of its own, unmapped when freed; but
the threshold starts at 128 KiB and rises to the size of each such block freed, up to 32 MiB. The
dashboard frees 8-16 MiB numpy arrays all the time (a metric column read in, the curves of a
1,000,000-row stream made again), so after the first few they came from the heap, and the heap's
high-water mark stayed: the longrun bench's dashboard held 315 MiB at its end, 237 MiB with the
threshold fixed (bench/longrun_bench.py, 1,000,000 points, 3 tabs). Setting it also turns glibc's
raising of it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # malloc.h
MMAP_THRESHOLD = 1 << 20


def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD; False where there is no glibc ``mallopt`` (musl)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
