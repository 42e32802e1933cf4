"""Multi-node start-up check: every node must see the same checkpoint directory.

torchrun's elastic restart brings the job back at a new rendezvous where any node may
become rank 0, and every rank resumes from the latest checkpoint it sees. That only
works when `paths.checkpoint_dir` is one shared directory (docs/deployment.md,
"Multi-node"). Checked at start, once the process group is up: rank 0 writes a marker
with a fresh token, broadcasts the token, and every rank reads the marker back. All
ranks gather the verdicts, so every rank fails with the same one-line error instead of
one failing and the others hanging in the next collective.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from keel.fs.atomic import atomic_write_text

MARKER = ".keel-shared-checkpoints"

__all__ = ["MARKER", "check_shared_checkpoints", "unshared_message"]


def unshared_message(checkpoint_dir: Path, missing: list[tuple[int, str]]) -> str:
    """The error for ranks (global rank, node) that do not see rank 0's marker."""
    who = ", ".join(f"rank {rank} on node {node}" for rank, node in missing)
    return (
        f"checkpoint_dir {checkpoint_dir} is not shared between the nodes of this job: {who} "
        f"does not see rank 0's {MARKER}; put paths.checkpoint_dir on a path every node mounts "
        f'(docs/deployment.md, "Multi-node")'
    )


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return None


def check_shared_checkpoints(checkpoint_dir: Path, rank: int, node: str, job_id: str) -> None:
    """Raise RuntimeError on every rank unless every rank sees rank 0's marker. A collective."""
    import torch.distributed as dist

    marker = Path(checkpoint_dir) / MARKER
    token = [None]
    if rank == 0:
        token[0] = f"{job_id} {uuid.uuid4().hex}"
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, token[0] + "\n")
    dist.broadcast_object_list(token, src=0)  # rank 0 wrote the marker before it broadcast
    seen = _read(marker) == token[0]
    verdicts: list = [None] * dist.get_world_size()
    dist.all_gather_object(verdicts, (rank, node, seen))
    missing = sorted((r, n) for r, n, ok in verdicts if not ok)
    if missing:
        raise RuntimeError(unshared_message(Path(checkpoint_dir), missing))


def check_at_start(torchrun, info, checkpoint_dir: Path) -> None:
    """The trainer's start-up hook: the check above for a multi-node job, nothing otherwise.

    `torchrun` is the resolved file's torchrun block (keel.render.contract.Torchrun).
    """
    if info is None or not torchrun.multi_node:
        return
    check_shared_checkpoints(checkpoint_dir, info.rank, torchrun.node, torchrun.rdzv_id)
