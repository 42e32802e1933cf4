"""Whether the run dir can take a status write at all: a full or read-only filesystem.

The status channel degrades instead of killing (keel.status.reporter): while the run dir's
filesystem is full or remounted read-only, a healthy process's heartbeats cannot reach its
status file. The watchdog asks this before it reads a stale heartbeat as "frozen", so a full
disk never turns into a restart of a trainer that is still training.
"""

from __future__ import annotations

import os

# Below this many free bytes a status snapshot (<= 64 KiB) or a metrics line may not fit.
LOW_FREE_BYTES = 256 << 10


def status_channel_blocked(run_dir: str | os.PathLike) -> str | None:
    """Why writes to `run_dir` cannot succeed now ("run dir full: 12 KiB free", "run dir read-only"), or None."""
    try:
        st = os.statvfs(run_dir)
    except OSError:
        return None  # a missing run dir is judged by the missing status files, not here
    if st.f_flag & os.ST_RDONLY:
        return f"run dir {os.fspath(run_dir)} is read-only"
    free = st.f_bavail * st.f_frsize
    if free < LOW_FREE_BYTES:
        return f"run dir {os.fspath(run_dir)} is full ({free >> 10} KiB free)"
    return None
