"""dashboard.malloc: glibc's mmap threshold fixed (the seam: glibc's mallopt, here; musl has none)."""

from __future__ import annotations

import ctypes.util

from dashboard import malloc


def test_the_threshold_is_fixed_where_glibc_is_and_skipped_without_a_libc(monkeypatch):
    assert malloc.fix_mmap_threshold() is True  # this machine's libc is glibc: mallopt said yes
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert malloc.fix_mmap_threshold() is False
