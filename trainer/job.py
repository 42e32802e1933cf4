"""The built-in job: an LSTM forecasting the next return of a synthetic, seeded, regime-switching price series.

It needs no data (so `make run` works anywhere) yet behaves like real training:
a DataLoader with worker processes, AdamW with warm-up + cosine decay, gradient
clipping, a held-out validation segment, checkpoints that resume exactly where
the last one stopped, and a loss that visibly falls within a minute on 2 CPU
cores. It is written against the same `Run` API a user's entry gets.

`params` it understands (all optional): window (32), hidden (32),
series_length (60000), val_fraction (0.2), warmup_steps (50),
lr_cycle_steps (3000), val_batches (4), clip_grad_norm (1.0),
nan_at_steps ([], fault injection: the loss of those steps becomes NaN).
"""

from __future__ import annotations

import ctypes
import math
import random
import signal
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from trainer.run import Run

# Regimes as (drift, volatility, autocorrelation of returns): a calm trend, a
# mean-reverting chop and a volatile momentum phase. The autocorrelation is what
# the model can learn, so the loss falls well below the variance of the target.
REGIMES = ((0.0004, 0.008, 0.7), (-0.0002, 0.010, -0.6), (0.0, 0.014, 0.5))
REGIME_STAY = 0.995  # probability of staying in a regime each step: regimes last ~200 steps


def synthetic_returns(length: int, seed: int) -> np.ndarray:
    """Standardised log returns of a regime-switching AR(1) price series; same seed, same series."""
    rng = np.random.default_rng(seed)
    out = np.empty(length, dtype=np.float64)
    regime, prev = 0, 0.0
    eps = rng.standard_normal(length)
    switch = rng.random(length)
    jumps = rng.integers(1, len(REGIMES), size=length)
    for t in range(length):
        if switch[t] > REGIME_STAY:
            regime = (regime + int(jumps[t])) % len(REGIMES)
        drift, vol, ar = REGIMES[regime]
        prev = drift + ar * prev + vol * eps[t]
        out[t] = prev
    return ((out - out.mean()) / out.std()).astype(np.float32)


class WindowBatches(Dataset):
    """Whole batches of (past `window` returns -> next return) from `series[start:end]`.

    An item is a batch, keyed by (epoch, index): the positions are drawn from a
    generator seeded by the key, so the data order is a pure function of the
    step and a resumed run sees exactly the batches it would have seen.
    """

    def __init__(self, series: np.ndarray, start: int, end: int, window: int, batch_size: int, seed: int) -> None:
        self.series = series
        self.lo = start + window  # first target index
        self.hi = end  # one past the last target index
        self.window = window
        self.batch_size = batch_size
        self.seed = seed
        self._offsets = np.arange(-window, 0)

    def __len__(self) -> int:
        return max(1, (self.hi - self.lo) // self.batch_size)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = key
        rng = np.random.default_rng((self.seed, epoch, index))
        targets = rng.integers(self.lo, self.hi, size=self.batch_size)
        return self.batch_at(targets)

    def batch_at(self, targets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs (B, window, 1) and targets (B, 1) for the given target indices."""
        x = self.series[targets[:, None] + self._offsets[None, :]]
        y = self.series[targets]
        return torch.from_numpy(x).unsqueeze(-1), torch.from_numpy(y).unsqueeze(-1)


class StepSampler(Sampler):
    """Endless (epoch, index) keys from global step `start`, this rank's share of each epoch."""

    def __init__(self, batches_per_epoch: int, start: int, rank: int = 0, world_size: int = 1) -> None:
        self.per_rank = max(1, batches_per_epoch // world_size)
        self.start = start
        self.rank = rank
        self.world_size = world_size

    def key(self, step: int) -> tuple[int, int]:
        """The batch key that global step `step` trains on."""
        epoch, i = divmod(step, self.per_rank)
        return epoch, i * self.world_size + self.rank

    def __iter__(self) -> Iterator[tuple[int, int]]:
        step = self.start
        while True:
            yield self.key(step)
            step += 1


def _worker_init(_worker_id: int) -> None:
    # supervisord (stopasgroup) and a terminal's Ctrl-C signal the whole process
    # group; a worker dying of that SIGTERM would make the DataLoader raise in the
    # trainer before it can checkpoint. Workers ignore it and are shut down by
    # the trainer instead.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    # If the trainer is SIGKILLed, die with it now rather than after the
    # DataLoader's 5 s parent check. PR_SET_PDEATHSIG = 1 (Linux only).
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class Forecaster(nn.Module):
    """LSTM over the window of past returns, a linear head for the next one."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size=1, hidden_size=hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def lr_lambda(warmup: int, cycle: int, floor: float = 0.1):
    """Linear warm-up for `warmup` steps, then cosine decay to `floor` x base over `cycle` steps, then flat."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, cycle - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


@dataclass
class JobParams:
    """The built-in job's `params`, with defaults."""

    window: int = 32
    hidden: int = 32
    series_length: int = 60000
    val_fraction: float = 0.2
    warmup_steps: int = 50
    lr_cycle_steps: int = 3000
    val_batches: int = 4
    clip_grad_norm: float = 1.0
    nan_at_steps: tuple[int, ...] = ()

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "JobParams":
        known = {k: v for k, v in config.items() if k in cls.__dataclass_fields__}
        if "nan_at_steps" in known:
            known["nan_at_steps"] = tuple(int(s) for s in known["nan_at_steps"])
        return cls(**known)


def rng_state() -> dict[str, Any]:
    """Every RNG the job touches, for an exact resume."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def validate(run: Run, model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float | None:
    """Mean loss on the held-out batches; None when a stop request cut it short."""
    loss_fn = nn.MSELoss()
    total = 0.0
    model.eval()
    try:
        with torch.no_grad():
            for x, y in batches:
                if run.stop_requested():  # a long validation must not delay a stop past stop.timeout
                    return None
                total += loss_fn(model(x.to(run.device)), y.to(run.device)).item()
    finally:
        model.train()
    return total / len(batches)


def main(run: Run) -> None:
    """Train until `max_steps` or a stop request; checkpoint on schedule and at the end."""
    s = run.settings
    p = JobParams.from_config(run.config)
    torch.manual_seed(s.seed + run.rank)
    np.random.seed(s.seed + run.rank)
    random.seed(s.seed + run.rank)

    series = synthetic_returns(p.series_length, s.seed)
    split = int(len(series) * (1 - p.val_fraction))
    train = WindowBatches(series, 0, split, p.window, s.batch_size, s.seed)
    val_set = WindowBatches(series, split, len(series), p.window, s.batch_size, s.seed + 1)
    val_batches = [val_set[(0, i)] for i in range(p.val_batches)]

    model: nn.Module = Forecaster(p.hidden).to(run.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.learning_rate, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(p.warmup_steps, p.lr_cycle_steps))

    step = epoch = 0
    state = run.load_checkpoint()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, epoch = int(state["step"]), int(state["epoch"])
        if state.get("world_size", 1) == run.world_size and "rng" in state:
            set_rng_state(state["rng"])

    net = model
    if run.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[run.device.index] if run.device.type == "cuda" else None)

    sampler = StepSampler(len(train), step, run.rank, run.world_size)
    loader = DataLoader(
        train,
        batch_size=None,  # items already are batches
        sampler=sampler,
        num_workers=s.num_workers,
        persistent_workers=s.num_workers > 0,
        worker_init_fn=_worker_init if s.num_workers > 0 else None,
        pin_memory=run.device.type == "cuda",
    )

    def snapshot() -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "epoch": epoch,
            "rng": rng_state(),
            "world_size": run.world_size,
        }

    loss_fn = nn.MSELoss()
    batches = iter(loader)
    try:
        while not run.should_stop():
            if s.max_steps is not None and step >= s.max_steps:
                break
            this_step = step + 1  # steps count from 1: "step N" is the N-th completed step
            with run.phase("data"):  # waiting for the DataLoader: the data-wait fraction (data_starved)
                x, y = next(batches)
            x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
            loss = loss_fn(net(x), y)
            if this_step in p.nan_at_steps:
                loss = loss * float("nan")
            value = loss.item()
            optimizer.zero_grad(set_to_none=True)
            apply = True
            if not math.isfinite(value):
                apply = run.nonfinite_loss(this_step, value) == "continue"
            grad_norm = None
            if apply:
                loss.backward()
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), p.clip_grad_norm))
                optimizer.step()
            scheduler.step()
            step = this_step
            epoch = step // sampler.per_rank
            metrics: dict[str, Any] = {"lr": scheduler.get_last_lr()[0], "epoch": epoch, "samples": len(x)}
            if grad_norm is not None:
                metrics["grad_norm"] = grad_norm
            if s.val_every_steps and step % s.val_every_steps == 0:
                with run.phase("validation"):
                    val = validate(run, model, val_batches)
                if val is not None:
                    metrics["val_loss"] = val
            run.report(step=step, loss=value, **metrics)
            if run.checkpoint_due(step):
                run.save_checkpoint(snapshot(), step)
        # Stopping (signal or max_steps): one last checkpoint so a restart loses nothing.
        if step > (run.checkpoint_step or 0):
            run.save_checkpoint(snapshot(), step)
    finally:
        # Shut the worker processes down now, not at interpreter exit.
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        del batches, loader
