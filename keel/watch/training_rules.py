"""Warnings about a trainer that runs but wastes its hardware: ``data_starved`` and ``gpu_idle``. Pure.

Both are DEGRADED verdicts (warnings): the watchdog never restarts for them, it
records them in its events and publishes them (bin/status, the page).

- ``data_starved``: the trainer's data-wait fraction (``TrainingStatus.data_wait_fraction``:
  time inside ``run.phase("data")`` / step time over its last steps, trainer.phases)
  stays above ``health.data_starved.fraction`` for ``polls`` polls in a row.
- ``gpu_idle``: a trainer that holds GPUs (``ProcessStatus.gpus``) reports state=running
  while NVML shows every one of them at or below ``health.gpu_idle.util_percent``
  for ``polls`` polls in a row. No GPU metrics: no verdict.

"In a row" is counted by the caller: ``PollCounters`` holds, per process, how many
consecutive previous polls each condition held, and resets on a new run (pid).
"""

from __future__ import annotations

from typing import Mapping

from keel.host.sampling import ResourceSample
from keel.render.contract import Health, StackProcess
from keel.status.models import ProcessStatus, State, TrainingStatus
from keel.status.results import ReadError

__all__ = ["ADVICE", "DATA_STARVED", "GPU_IDLE", "PollCounters", "conditions", "verdict_texts"]

DATA_STARVED = "data_starved"
GPU_IDLE = "gpu_idle"
ADVICE = ("raise num_workers, set pin_memory=True (CUDA), raise prefetch_factor, "
          "or move decoding/augmentation off the training process")


def starved(status: ProcessStatus, health: Health) -> float | None:
    """The wait fraction, when it is above the threshold now; else None."""
    p = status.payload
    if not isinstance(p, TrainingStatus) or status.state is not State.RUNNING or p.data_wait_fraction is None:
        return None
    return p.data_wait_fraction if p.data_wait_fraction > health.data_starved.fraction else None


def idle_gpus(status: ProcessStatus, sample: ResourceSample, health: Health) -> list[tuple[int, float]] | None:
    """(index, util %) of every GPU the trainer holds, when all are idle now; else None (busy, or no metrics)."""
    if status.kind != "trainer" or status.state is not State.RUNNING or not status.gpus or sample.gpu_error:
        return None
    by_index = {g.index: g for g in sample.gpus}
    held = [by_index.get(i) for i in status.gpus]
    if any(g is None or g.util_percent is None for g in held):
        return None  # a GPU NVML does not show (or cannot measure, MIG): no judgement
    if all(g.util_percent <= health.gpu_idle.util_percent for g in held):  # type: ignore[union-attr]
        return [(g.index, g.util_percent) for g in held]  # type: ignore[union-attr,misc]
    return None


def conditions(status: ProcessStatus | ReadError, sample: ResourceSample, health: Health) -> set[str]:
    """The rules whose condition holds in this poll (what ``PollCounters.update`` counts)."""
    if not isinstance(status, ProcessStatus):
        return set()
    held = set()
    if starved(status, health) is not None:
        held.add(DATA_STARVED)
    if idle_gpus(status, sample, health) is not None:
        held.add(GPU_IDLE)
    return held


def verdict_texts(status: ProcessStatus, sample: ResourceSample, health: Health,
                  previous: Mapping[str, int]) -> list[tuple[str, str]]:
    """(rule, reason) of each warning due now: its condition held this poll and the ``previous`` ones."""
    out = []
    fraction = starved(status, health)
    if fraction is not None:
        n, need = previous.get(DATA_STARVED, 0) + 1, health.data_starved.polls
        if n >= need:
            out.append((DATA_STARVED, f"waiting for data {fraction:.0%} of step time "
                        f"(> {health.data_starved.fraction:.0%} for {n} polls): {ADVICE}"))
    idle = idle_gpus(status, sample, health)
    if idle is not None:
        n, need = previous.get(GPU_IDLE, 0) + 1, health.gpu_idle.polls
        if n >= need:
            gpus = ", ".join(f"GPU {i} {u:.0f}%" for i, u in idle)
            out.append((GPU_IDLE, f"running but its GPUs are idle ({gpus} for {n} polls): "
                        "input-bound, stuck on the CPU side, or not using the device"))
    return out


class PollCounters:
    """Per process: consecutive polls each condition held, for the run (pid) it was counted on."""

    def __init__(self) -> None:
        self._counts: dict[str, dict[str, int]] = {}
        self._pid: dict[str, int | None] = {}

    def counts(self, name: str, pid: int | None) -> Mapping[str, int]:
        """The counts before this poll (empty for a new run)."""
        if self._pid.get(name) != pid:
            return {}
        return dict(self._counts.get(name, {}))

    def update(self, name: str, pid: int | None, statuses: list[ProcessStatus | ReadError],
               sample: ResourceSample, process: StackProcess) -> None:
        """Count this poll: a condition that holds on any status file goes up by one, any other goes to 0."""
        before = self.counts(name, pid)
        held = set().union(*(conditions(s, sample, process.health) for s in statuses)) if statuses else set()
        self._counts[name] = {rule: before.get(rule, 0) + 1 for rule in held}
        self._pid[name] = pid
