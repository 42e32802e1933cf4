"""The trainer's ``torchrun`` settings: ranks per node, and what a multi-node job needs to meet.

Its own module so keel/config/model.py only imports it. A multi-node job is torch's
elastic launcher over a c10d rendezvous: every node runs one torchrun agent (under its
own keel), the agents meet at ``rdzv_endpoint`` (a TCP store hosted by the agent on that
host), and the rendezvous id keeps two jobs on the same endpoint apart. The timeouts are
torchrun's ``--rdzv-conf`` keys (torch.distributed.elastic.rendezvous.dynamic_rendezvous).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from keel.config.types import Duration, FieldProblem, Strict

__all__ = ["TorchrunSettings", "node_range"]


NNODES_RE = re.compile(r"^([1-9][0-9]*)(?::([1-9][0-9]*))?$")
NODE_RE = r"^[a-z0-9][a-z0-9_-]{0,39}$"
# host:port, host a name, an IPv4 address or a bracketed IPv6 address.
ENDPOINT_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?):([0-9]{1,5})$")


def node_range(nnodes: int | str) -> tuple[int, int]:
    """(min, max) nodes of `nnodes`: 2 -> (2, 2), "1:4" -> (1, 4). The one parser of the value."""
    if isinstance(nnodes, int):
        if nnodes < 1:
            raise ValueError(f"nnodes must be at least 1, got {nnodes}")
        return nnodes, nnodes
    m = NNODES_RE.match(nnodes.strip())
    if m is None:
        raise ValueError(f"nnodes must be a number or a range min:max (e.g. \"1:4\"), got {nnodes!r}")
    low = int(m.group(1))
    return low, int(m.group(2) or low)


class TorchrunSettings(Strict):
    """How torchrun launches the trainer's ranks (docs/deployment.md, "Multi-node")."""

    nproc_per_node: int = Field(2, ge=1, le=64, description="Worker processes per node (one per GPU on GPU hosts).")
    nnodes: int | str = Field(
        1, description='Nodes: a number, or an elastic range "min:max" (keel reads an unquoted 1:4 as the range, not a YAML 1.1 base-60 number); 1 uses --standalone rendezvous.'
    )
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl on GPU, gloo on CPU.")
    rdzv_backend: Literal["c10d"] = Field("c10d", description="Multi-node rendezvous backend: c10d (a TCP store hosted by the endpoint's agent).")
    rdzv_endpoint: str | None = Field(None, description="Multi-node: host:port every node's agent meets at (the first node of the job hosts it).")
    rdzv_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]{1,128}$", description="Multi-node job id; none: <project>-<environment>-<release>, so two jobs or releases never join each other."
    )
    node: str | None = Field(None, pattern=NODE_RE, description="This node's name in status file names (trainer.<node>.r<local rank>); none: the host's short name.")
    max_restarts: int = Field(3, ge=0, le=1000, description="Multi-node: times torchrun restarts every node's ranks at a new rendezvous (resuming from the last checkpoint) before the agent gives up.")
    join_timeout: Duration = Field(600.0, description="Multi-node: how long a rendezvous waits for the minimum number of nodes before the agent fails.")
    last_call_timeout: Duration = Field(30.0, description="Multi-node elastic range: extra wait for more nodes once the minimum has joined.")
    close_timeout: Duration = Field(30.0, description="Multi-node: how long a closing rendezvous waits for the other nodes to notice.")
    shared_checkpoints: bool = Field(
        False, description="Multi-node: paths.checkpoint_dir is one shared directory on every node (required; checked at start)."
    )

    @model_validator(mode="after")
    def _multi_node_needs(self) -> "TorchrunSettings":
        try:
            low, high = node_range(self.nnodes)
        except ValueError as e:
            raise FieldProblem("nnodes", str(e)) from None
        if low > high:
            raise FieldProblem("nnodes", f"nnodes range {self.nnodes!r}: min must not exceed max")
        if high == 1:
            return self
        if self.rdzv_endpoint is None:
            raise FieldProblem("rdzv_endpoint", "a multi-node job needs rdzv_endpoint (host:port of the node that hosts the rendezvous)")
        m = ENDPOINT_RE.match(self.rdzv_endpoint)
        if m is None or not 0 < int(m.group(3)) < 65536:
            raise FieldProblem("rdzv_endpoint", f"rdzv_endpoint must be host:port, got {self.rdzv_endpoint!r}")
        if not self.shared_checkpoints:
            raise FieldProblem(
                "shared_checkpoints",
                "a multi-node job resumes on whichever node becomes rank 0: put paths.checkpoint_dir on a shared path and set shared_checkpoints: true",
            )
        return self

    @property
    def multi_node(self) -> bool:
        return node_range(self.nnodes)[1] > 1
