"""torchrun support and device selection: who am I, which backend, which device, stop together.

`detect` and `choose_backend`/`select_device` are pure (environment and facts
in, decision out) so the selection logic is tested without a GPU; the rest are
thin calls into torch.distributed. torch is imported inside those functions
only: the entry point calls `detect` before CUDA_VISIBLE_DEVICES is final, and
torch must not be imported before that.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a torchrun job."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect(environ: Mapping[str, str]) -> DistInfo | None:
    """The torchrun rank from RANK/WORLD_SIZE/LOCAL_RANK, or None when not launched by torchrun."""
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        return None
    rank = int(environ["RANK"])
    return DistInfo(
        rank=rank,
        world_size=int(environ["WORLD_SIZE"]),
        local_rank=int(environ.get("LOCAL_RANK", rank)),
    )


def die_with_agent() -> None:
    """A torchrun worker dies with its agent (Linux PR_SET_PDEATHSIG), so a SIGKILLed agent leaves no rank.

    torchrun starts its workers in their own session, so the backend's kill of the agent's
    process group (supervisord's killasgroup, systemd's KillMode) does not reach them; a rank
    blocked in a collective with a node that went away would then outlive its stack. Where the
    call is not available (not Linux) nothing changes.
    """
    import ctypes
    import os
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) != 0:  # 1: PR_SET_PDEATHSIG
            return
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the agent died before the call: do not run on as an orphan
        os._exit(1)


def choose_backend(requested: str, cuda: bool) -> str:
    """`auto` is NCCL on CUDA and gloo on CPU; anything else is taken as given."""
    if requested == "auto":
        return "nccl" if cuda else "gloo"
    return requested


def select_device(cuda_available: bool, gpus_assigned: bool, local_rank: int = 0) -> str:
    """`cuda:<local_rank>` when CUDA works and the config gave this process GPUs, else `cpu`.

    CUDA_VISIBLE_DEVICES already narrows the visible GPUs to ours, so index
    0 (or the torchrun local rank) is our first assigned GPU.
    """
    if cuda_available and gpus_assigned:
        return f"cuda:{local_rank}"
    return "cpu"


def memory_fraction(fraction: float | None, limit_bytes: int | None, total_bytes: int) -> float | None:
    """The allocator fraction for a `gpu_memory` limit: the configured fraction, else bytes / total (max 1)."""
    if fraction is not None:
        return fraction
    if limit_bytes is None:
        return None
    return min(1.0, limit_bytes / total_bytes)


def apply_memory_limit(device: "torch.device", fraction: float | None, limit_bytes: int | None) -> float | None:
    """Cap this process's CUDA caching allocator; returns the fraction applied (None on CPU or no limit)."""
    if device.type != "cuda" or (fraction is None and limit_bytes is None):
        return None
    import torch

    total = torch.cuda.get_device_properties(device).total_memory
    applied = memory_fraction(fraction, limit_bytes, total)
    torch.cuda.set_per_process_memory_fraction(applied, device)
    return applied


def init(info: DistInfo, backend: str, device: "torch.device", timeout_s: float = 120.0) -> None:
    """Join the process group torchrun set up (env:// rendezvous)."""
    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=_dt.timedelta(seconds=timeout_s))


def any_rank(flag: bool, device: "torch.device") -> bool:
    """True on every rank when it is True on any rank (all-reduce MAX); all ranks must call it together."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def shared_run_id(run_id: str) -> str:
    """Rank 0's run id on every rank under torchrun (a no-op without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return run_id
    box = [run_id]
    dist.broadcast_object_list(box, src=0)
    return str(box[0])


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group, if joined."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
