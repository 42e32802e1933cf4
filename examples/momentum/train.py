"""A momentum signal learned by a linear model: the smallest complete keel trainer plug-in.

Configure it with::

    processes:
      trainer:
        kind: trainer
        entry: "examples.momentum.train:main"
        params: {lookback: 20, lr: 0.01, steps_per_epoch: 100}

The trainer calls `main(run)`; everything keel-specific goes through `run`:
the device, `run.config` (the `params` above), reporting, stopping and
checkpoints. The same function runs unchanged under torchrun.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def make_data(n: int, lookback: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns with persistent momentum; inputs are the last `lookback` returns, the target the next."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n + lookback, generator=g)
    returns = torch.zeros_like(noise)
    for t in range(1, len(noise)):
        returns[t] = 0.6 * returns[t - 1] + noise[t]
    windows = returns.unfold(0, lookback, 1)[:-1]
    return windows, returns[lookback:].unsqueeze(1)


def main(run: Any) -> None:
    """Train until stopped (SIGTERM) or `max_steps`, resuming from the last checkpoint."""
    cfg = run.config
    lookback = int(cfg.get("lookback", 20))
    x, y = make_data(int(cfg.get("samples", 4096)), lookback, seed=run.settings.seed)
    x, y = x.to(run.device), y.to(run.device)
    torch.manual_seed(run.settings.seed)  # the same seed, the same initial weights: runs that can be compared
    model = nn.Linear(lookback, 1).to(run.device)
    opt = torch.optim.SGD(model.parameters(), lr=float(cfg.get("lr", 0.01)), momentum=0.9)
    batch = int(cfg.get("batch_size", 128))
    max_steps = run.settings.max_steps

    step = 0
    state = run.load_checkpoint()  # None on the first start
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        run.logger.info("momentum example resumed at step %d", step)

    g = torch.Generator().manual_seed(step)
    while not run.should_stop():  # once per step, on every rank
        if max_steps is not None and step >= max_steps:
            break
        idx = torch.randint(0, len(x), (batch,), generator=g).to(run.device)
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        # Every step: cheap, keel throttles what it writes.
        run.report(step=step, loss=loss.item(), samples=batch, lr=opt.param_groups[0]["lr"])
        if run.checkpoint_due(step):
            run.save_checkpoint({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, step)
    # Stopping: save once more so a restart continues from here.
    run.save_checkpoint({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, step)
