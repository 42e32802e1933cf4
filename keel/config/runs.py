"""The trainer's ``runs`` settings: how many past runs' summaries and metrics are kept on disk.

Its own module so keel/config/model.py only gains the field line. The defaults are small
enough never to fill a disk: 20 runs and 512 MiB together, whichever is reached first (docs/dashboard.md,
"Runs: how they are kept and pruned").
"""

from __future__ import annotations

from pydantic import Field

from keel.config.types import Size, Strict

__all__ = ["RunRetention"]


class RunRetention(Strict):
    """Past runs kept under ``<run_dir>/runs/<trainer>/`` (the live run is never pruned)."""

    keep: int = Field(20, ge=1, le=10_000, description="Runs kept, the live one included; the oldest past runs are deleted first.")
    max_bytes: Size = Field(
        512 * 1024 * 1024,
        description="Bytes all kept runs may take together (summaries and metrics); past runs are deleted oldest first until they fit.",
    )
