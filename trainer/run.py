"""`Run`: what a training function (built-in or a user's `entry`) gets from the trainer.

A training function is `main(run: Run) -> None`. It trains on `run.device`,
reads its settings from `run.config`, calls `run.report(step=..., loss=...)`
after every step, `run.should_stop()` at every step boundary, and
`run.save_checkpoint(state)` / `run.load_checkpoint()` to survive restarts.
See docs/trainer.md for a complete example.

Reporting is cheap by construction: `report` only updates memory and compares
two monotonic timestamps; the status snapshot and the metrics file are written
at most every `report.status_interval` / `report.metrics_interval` seconds,
one summary record per metrics interval, in one append.

Reporting never stops training: a failed status or metrics write (a full disk,
say) does not raise out of `report` or `event`; the reporter counts it, retries
it, and keeps the metrics records in memory until they can be written (see
keel.status.degrade and docs/status-protocol.md, "When a write fails").
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from keel.status.models import State

from trainer import signals
from trainer.checkpoint import CheckpointStore
from trainer.phases import PhaseTimer
from trainer.runs import RunLedger, new_run_id
from trainer.sdnotify import Notifier
from trainer.settings import TrainerSettings

CHECKPOINT_FORMAT = 1


class NonFiniteLoss(RuntimeError):
    """Raised out of the training function when the loss is NaN/inf and `on_nan` is `stop`."""

    def __init__(self, step: int, loss: float) -> None:
        super().__init__(f"loss is {loss} at step {step} (on_nan=stop)")
        self.step = step
        self.loss = loss


class Run:
    """One training run as seen by the training function. Build it with `trainer.__main__`, not by hand."""

    def __init__(
        self,
        settings: TrainerSettings,
        *,
        reporter: Any,
        store: CheckpointStore,
        stop: signals.StopFlag,
        notifier: Notifier,
        device: Any,
        logger: logging.Logger,
        rank: int = 0,
        world_size: int = 1,
        any_rank: Callable[[bool], bool] | None = None,
        gpu_memory: Callable[[], int | None] | None = None,
        run_id: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        ledger: RunLedger | None = None,
    ) -> None:
        self.settings = settings
        self.device = device
        #: The `params` section of the trainer's config, free-form.
        self.config: dict[str, Any] = settings.params
        self.checkpoint_dir: Path = settings.checkpoint_dir
        self.logger = logger
        self.rank = rank
        self.world_size = world_size
        self.run_id = run_id or new_run_id()
        #: New run or resume, the config digest, the run archive (trainer/runs.py).
        self.ledger = ledger or RunLedger(settings, store=store)
        self._reporter = reporter
        self._store = store
        self._stop = stop
        self._notifier = notifier
        self._any_rank = any_rank
        self._gpu_memory = gpu_memory
        self._clock = clock
        self._phases = PhaseTimer(clock())  # phases and the data-wait fraction (trainer/phases.py)
        self._stopping = False
        self._running = False
        self._nan_seen_step: int | None = None

        self.step = 0
        self.checkpoint_step: int | None = None
        self._last_ckpt_time = clock()
        self._last_ckpt_step = 0
        now = clock()
        self._last_status = float("-inf")
        self._last_metrics = now
        self._pending: list[dict] = []
        # Accumulated between two metrics records (a record summarises the steps since the last one).
        self._acc_steps = 0
        self._acc_loss = 0.0
        self._acc_loss_n = 0
        self._acc_samples = 0
        self._acc_start = now
        self._last: dict[str, Any] = {}
        self._rate_samples = 0
        self._rate_start = now
        self._samples_per_s: float | None = None
        self._steps_per_s: float | None = None
        self._rate_steps = 0

    # -- the plug-in API -------------------------------------------------

    @property
    def is_main(self) -> bool:
        """True on the process that writes checkpoints (rank 0)."""
        return self.rank == 0

    def should_stop(self) -> bool:
        """True once SIGTERM/SIGINT arrived (on any rank). Call once per step, on every rank."""
        local = self._stop.is_set()
        stop = self._any_rank(local) if self._any_rank is not None else local
        if stop and not self._stopping:
            self.begin_stopping("stop requested")
        return stop

    def stop_requested(self) -> bool:
        """This process's stop flag alone (no collective): safe to poll inside validation or eval loops."""
        return self._stop.is_set()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a stretch of the loop as phase `name` (`data`: waiting for a batch; `validation`, ...).

        The watchdog's `progress_timeout: auto` judges a hang against this phase's own history, and
        time inside `data` is the data-wait fraction of the `data_starved` warning. Phases nest."""
        now = self._clock()
        self._phases.enter(name, now)
        if self._phases.publish_now(name):  # a long (or new) phase is published at once; short ones ride along
            self._reporter.update_payload(**self._phases.payload())
        try:
            yield
        finally:
            self._phases.exit(self._clock())
            if self._phases.publish_now(name):
                self._reporter.update_payload(**self._phases.payload())

    def report(self, step: int, loss: float | None = None, **metrics: Any) -> None:
        """Record that `step` completed. `samples=` (items in this step) drives samples/s; other
        keywords (lr, grad_norm, val_loss, ...) go to the metrics file. Cheap: call it every step."""
        now = self._clock()
        self.step = step
        self._phases.step_done(now)
        if not self._running:
            self._start_running(now)
        if loss is not None:
            loss = float(loss)
            if not math.isfinite(loss) and self._nan_seen_step != step:
                self.nonfinite_loss(step, loss)
        samples = int(metrics.pop("samples", 0) or 0)
        self._acc_steps += 1
        self._acc_samples += samples
        self._rate_samples += samples
        self._rate_steps += 1
        if loss is not None and math.isfinite(loss):
            self._acc_loss += loss
            self._acc_loss_n += 1
        if loss is not None:
            self._last["loss"] = loss
        self._last.update(metrics)
        if "val_loss" in metrics:
            # Validation results are rare and precious: always their own record.
            self._pending.append({"step": step, "val_loss": metrics["val_loss"], "t": time.time()})
        # WATCHDOG=1 only from here: a completed step is the proof of life systemd should see.
        self._notifier.watchdog()
        interval = self.settings.report.metrics_interval
        if now - self._last_metrics >= interval:
            self._emit_record(now)
            self._last_metrics = now
            self._flush_metrics()
        if now - self._last_status >= self.settings.report.status_interval:
            self._write_status(now)

    def nonfinite_loss(self, step: int, loss: float) -> str:
        """Apply `on_nan` to a NaN/inf loss at `step`: records an event and returns the policy
        (`skip`: do not apply this step; `continue`: apply it). With `stop` it raises `NonFiniteLoss`."""
        self._nan_seen_step = step
        policy = self.settings.on_nan
        self.event("nonfinite_loss", step=step, loss=str(loss), action=policy, level=logging.WARNING)
        if policy == "stop":
            raise NonFiniteLoss(step, loss)
        return policy

    def event(self, name: str, level: int = logging.INFO, **fields: Any) -> None:
        """Log an event and write it to the metrics file at once (`{"event": name, ...}`)."""
        self.logger.log(level, name, extra={"event": name, **fields})
        self.record(name, **fields)

    def record(self, name: str, **fields: Any) -> None:
        """Write an event record to the metrics file at once, with no log line of its own (for an event
        whose log line says more than its name)."""
        self._pending.append({"event": name, "t": time.time(), **fields})
        self._flush_metrics()

    def checkpoint_due(self, step: int) -> bool:
        """True when `checkpoint.every_steps` or `checkpoint.every_seconds` has passed since the last save."""
        ck = self.settings.checkpoint
        if step <= self._last_ckpt_step:
            return False
        if ck.every_steps and step - self._last_ckpt_step >= ck.every_steps:
            return True
        return bool(ck.every_seconds) and self._clock() - self._last_ckpt_time >= ck.every_seconds

    def save_checkpoint(self, state: dict[str, Any], step: int | None = None) -> Path | None:
        """Save `state` (anything torch.save takes) as the checkpoint for `step` (default: the last
        reported step). Only rank 0 writes; other ranks return None."""
        step = self.step if step is None else step
        self._last_ckpt_time = self._clock()
        self._last_ckpt_step = step
        if not self.is_main:
            return None
        self.ledger.ensure_started(self)
        wrapped = {"format": CHECKPOINT_FORMAT, "run_id": self.run_id, "config_digest": self.ledger.digest,
                   "step": step, "state": state}
        wrapped["phases"] = self._phases.to_dict()  # the auto timeout's history resumes with the run
        with self.phase("checkpoint"):
            path = self._store.save(step, wrapped)
        self.checkpoint_step = step
        self.ledger.saved(self)
        self.logger.info("checkpoint saved", extra={"event": "checkpoint", "step": step, "path": str(path)})
        self._pending.append({"event": "checkpoint", "t": time.time(), "step": step})  # a marker on the curves
        self._reporter.update_payload(checkpoint_step=step)
        return path

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The state of the newest valid checkpoint, or None on a fresh start. Adopts its run_id and step."""
        loaded = self._store.load_latest()
        if not self.ledger.accept(self, loaded):  # none, or another run's: set aside, a new run starts
            return None
        wrapped = loaded.state
        self.run_id = self.ledger.run_id  # chosen once, by the ledger (a resume keeps its checkpoint's run)
        self.step = self._last_ckpt_step = int(wrapped.get("step", loaded.step))
        self.checkpoint_step = self.step
        self._phases.load(wrapped.get("phases"))
        self._last_ckpt_time = self._clock()
        self.logger.info(
            "resumed from checkpoint",
            extra={"event": "resume", "step": self.step, "path": str(loaded.path)},
        )
        self._reporter.update_payload(run_id=self.run_id, step=self.step, checkpoint_step=self.step,
                                      **self._phases.payload())
        return wrapped.get("state")

    # -- used by the entry point ----------------------------------------

    def flush(self) -> None:
        """Write what is pending: a final metrics record and the status snapshot."""
        now = self._clock()
        if self._acc_steps:
            self._emit_record(now)
        self._flush_metrics()
        if self._rate_steps:
            self._write_status(now)

    @property
    def stopping(self) -> bool:
        """True once the run moved to state=stopping."""
        return self._stopping

    def set_state(self, state: State, error: str | None = None) -> None:
        """Publish a state transition and log it (event "state")."""
        self._reporter.set_state(state, error)
        self.logger.info("state %s", state.value, extra={"event": "state", "state": state.value, "step": self.step})

    def _start_running(self, now: float) -> None:
        # The first completed step ends start-up: state=running, and READY=1 for systemd.
        self._running = True
        self.ledger.ensure_started(self)
        # Rates count from the first step, not from the (slow) model and data set-up.
        self._acc_start = self._rate_start = self._last_metrics = now
        if self._last_ckpt_step == 0:
            self._last_ckpt_time = self._acc_start  # the checkpoint clock starts with training, too
        self.set_state(State.RUNNING)
        self._notifier.ready()

    def begin_stopping(self, reason: str = "training finished") -> None:
        """Enter state=stopping (once): ignore further stop signals, tell systemd STOPPING=1."""
        if self._stopping:
            return
        self._stopping = True
        # From here on a further SIGTERM means nothing new; ignoring it keeps the final checkpoint whole.
        signals.ignore_stop_signals()
        self.logger.info(reason, extra={"event": "stopping", "step": self.step, "reason": reason})
        self._notifier.stopping()
        self.set_state(State.STOPPING)

    def _emit_record(self, now: float) -> None:
        elapsed = max(now - self._acc_start, 1e-9)
        record: dict[str, Any] = {"step": self.step, "t": time.time()}
        if self._acc_loss_n:
            record["loss"] = self._acc_loss / self._acc_loss_n
        elif "loss" in self._last:
            record["loss"] = self._last["loss"]  # only non-finite losses since the last record
        for k, v in self._last.items():
            if k not in ("loss", "val_loss"):
                record[k] = v
        if self._acc_samples:
            record["samples_per_s"] = self._acc_samples / elapsed
        record["steps_per_s"] = self._acc_steps / elapsed
        if self._gpu_memory is not None:
            record["gpu_memory_bytes"] = self._gpu_memory()
        self._pending.append(record)
        self._acc_steps = self._acc_loss_n = self._acc_samples = 0
        self._acc_loss = 0.0
        self._acc_start = now

    def _flush_metrics(self) -> None:
        if self._pending:
            self.ledger.records(self._pending)
            self._reporter.metrics(self._pending)
            self._pending = []

    def _write_status(self, now: float) -> None:
        elapsed = now - self._rate_start
        if elapsed > 0 and self._rate_steps:
            self._steps_per_s = self._rate_steps / elapsed
            self._samples_per_s = self._rate_samples / elapsed if self._rate_samples else None
        self._rate_start, self._rate_steps, self._rate_samples = now, 0, 0
        max_steps = self.settings.max_steps
        eta = None
        if max_steps and self._steps_per_s:
            eta = max(0, max_steps - self.step) / self._steps_per_s
        payload: dict[str, Any] = {
            "step": self.step,
            "epoch": int(self._last.get("epoch", 0)),
            "loss": self._last.get("loss"),
            "lr": self._last.get("lr"),
            "samples_per_s": self._samples_per_s,
            "eta_s": eta,
        }
        if "val_loss" in self._last:
            payload["val_loss"] = self._last["val_loss"]
        if self._gpu_memory is not None:
            payload["gpu_memory_bytes"] = self._gpu_memory()
        payload.update(self._phases.payload())
        self._reporter.progress(**payload)
        self._last_status = now
