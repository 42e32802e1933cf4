"""torchrun for the trainer: the resolved settings, the command line, and the ranks' status names.

Pure: settings and facts (project, environment, release, host name) in, values out.
One node (`nnodes: 1`) keeps `--standalone`; a multi-node job gets torchrun's elastic
flags over the c10d rendezvous. The rendezvous id defaults to
<project>-<environment>-<release>: every node of one job renders the same release, and
two jobs (or an old and a new release during an update) never join each other.
"""

from __future__ import annotations

import math
import re
from typing import Any

from keel.config.torchrun import TorchrunSettings, node_range

__all__ = ["resolve", "command", "status_names", "rank_status_name", "job_id", "node_name", "rdzv_conf"]


def rank_status_name(process: str, rank: int, node: str | None) -> str:
    """The status name of one rank, computed here only (the trainer writes it, keel.json lists it).

    One node: `trainer.rank<N>` (N the rank). Multi-node: `trainer.<node>.r<N>` with N the
    *local* rank: global ranks move between nodes at every rendezvous, while the local
    watchdog must know its own files in advance. The global rank is in the payload.
    """
    return f"{process}.rank{rank}" if node is None else f"{process}.{node}.r{rank}"


def job_id(project: str, env: str, release: str) -> str:
    """The default rendezvous id of a job."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"{project}-{env}-{release}")[:128]


def node_name(hostname: str) -> str:
    """A status-name-safe node name from a host name: its first label, lower case."""
    short = hostname.split(".", 1)[0].lower()
    name = re.sub(r"[^a-z0-9_-]", "-", short).strip("-")[:40]
    return name or "node"


def resolve(settings: TorchrunSettings, *, project: str, env: str, release: str, hostname: str) -> dict[str, Any]:
    """The `torchrun` block of trainer.json: the settings with the multi-node defaults filled in.

    A single-node job has no rendezvous id or node name (None): nothing depends on the host.
    """
    doc = settings.model_dump(mode="python")
    if settings.multi_node:
        doc["rdzv_id"] = settings.rdzv_id or job_id(project, env, release)
        doc["node"] = settings.node or node_name(hostname)
    else:
        doc["rdzv_id"] = None
        doc["node"] = None
    doc["multi_node"] = settings.multi_node
    return doc


def status_names(process: str, resolved: dict[str, Any]) -> list[str]:
    """One status file per local rank of this node (the local watchdog watches exactly these)."""
    return [rank_status_name(process, local, resolved["node"]) for local in range(resolved["nproc_per_node"])]


def _seconds(value: float) -> int:
    # torch reads the --rdzv-conf timeouts as whole seconds (RendezvousParameters.get_as_int).
    return max(1, math.ceil(value))


def rdzv_conf(resolved: dict[str, Any]) -> str:
    """torchrun's --rdzv-conf value: the rendezvous timeouts, in seconds."""
    keys = ("join_timeout", "last_call_timeout", "close_timeout")
    return ",".join(f"{key}={_seconds(resolved[key])}" for key in keys)


def command(torchrun: str, resolved: dict[str, Any], config_file: str) -> list[str]:
    """torchrun's argv for the trainer."""
    low, high = node_range(resolved["nnodes"])
    nnodes = str(low) if low == high else f"{low}:{high}"
    argv = [torchrun, "--nproc-per-node", str(resolved["nproc_per_node"]), "--nnodes", nnodes]
    if not resolved["multi_node"]:
        argv.append("--standalone")
    else:
        argv += [
            "--rdzv-backend", resolved["rdzv_backend"],
            "--rdzv-endpoint", resolved["rdzv_endpoint"],
            "--rdzv-id", resolved["rdzv_id"],
            "--rdzv-conf", rdzv_conf(resolved),
            "--max-restarts", str(resolved["max_restarts"]),
        ]  # fmt: skip
    return argv + ["-m", "trainer", "--config", config_file]
