"""Runs from the trainer's side: the config digest, new run or resume, and the run archive writer.

A run is one training trajectory, named by a run id. A start that finds no checkpoint
is a new run; a start that finds one of its own run's checkpoints resumes that run
(the id is stored in the checkpoint). A checkpoint belongs to its run: one written under
another config digest (or before digests existed) is never loaded. It is moved to
`<checkpoint_dir>/superseded/<run_id>/` (kept, not loaded) and a new run starts, with a
`new_run` event and log line naming the old run, the reason and where its checkpoints went.
Every start writes where its run began into the metrics stream (and so the run's archive): a
`new_run` record, or a `resume` record at the checkpoint's step (dashboard.curves draws those).

The config digest covers what shapes the checkpoint's contents, so that loading it is
either impossible or a different experiment:

    entry   the training code (none means the built-in job, trainer.job:main)
    params  free-form: for the built-in job they shape the model (hidden, window, ...);
            for a plug-in keel cannot know which keys matter, so all of them count
    seed    the data order and initialisation: a resume with another seed is another experiment

Not in it: batch_size and learning_rate (a resume with a new batch size or rate continues
the run; note the built-in job restores its optimizer and schedule, lr included, from the
checkpoint), max_steps, every interval, threads, num_workers, val_every_steps, on_nan, the
launcher and world size (the built-in job resumes across world sizes).

Nothing here raises out of training: a failed archive write is logged once and training
goes on (the archive is a record, the checkpoint is the truth).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from keel.status import runs as archive_files
from keel.status.runs import NEW_RUN_EVENT, RESUME_EVENT, RunSummary, Tally

BUILTIN_ENTRY = "trainer.job:main"
DIGEST_KEYS = ("entry", "params", "seed")
# Records buffered before the run is known (new or resumed); a run is decided within one step.
EARLY_RECORDS = 1000
# run.json is rewritten at most this often while records arrive (and at every checkpoint and the end).
SUMMARY_EVERY_S = 5.0

log = logging.getLogger("keel.trainer.runs")


def digest_inputs(settings: Any) -> dict[str, Any]:
    """The settings the config digest covers (see the module doc for why these)."""
    return {"entry": settings.entry or BUILTIN_ENTRY, "params": dict(settings.params), "seed": int(settings.seed)}


def config_digest(inputs: Mapping[str, Any]) -> str:
    """12 hex digits of SHA-256 over the canonical JSON of `inputs` (key order does not matter)."""
    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Choice:
    """New run or resume, for the checkpoint found at start (`previous`: the run it belongs to)."""

    resume: bool
    previous: str | None
    reason: str


def choose(wrapped: Mapping[str, Any] | None, digest: str) -> Choice:
    """Resume only a checkpoint written under the same config digest."""
    if wrapped is None:
        return Choice(False, None, "no checkpoint to resume")
    previous = wrapped.get("run_id")
    previous = str(previous) if previous is not None else None
    stored = wrapped.get("config_digest")
    if stored is None:
        # Written before digests: which entry wrote it is unknown, and loading another entry's
        # state is the crash loop this module exists to prevent.
        return Choice(False, previous, "the checkpoint has no config digest (written by an older keel)")
    if stored != digest:
        return Choice(False, previous, f"config changed (digest {stored} -> {digest}: entry, params or seed)")
    return Choice(True, previous, "same config digest")


def new_run_id() -> str:
    """A short random id for a new run; a resumed run keeps the id stored in its checkpoint."""
    return uuid.uuid4().hex[:12]


class RunArchive:
    """Writes one trainer's runs under `<run_dir>/runs/<trainer>/` (keel.status.runs); rank 0 only."""

    def __init__(
        self,
        run_dir: str | Path,
        trainer: str,
        *,
        keep: int,
        max_bytes: int,
        inputs: Mapping[str, Any],
        digest: str,
        wall: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = archive_files.runs_root(run_dir, trainer)
        self.trainer = trainer
        self.keep = keep
        self.max_bytes = max_bytes
        self.inputs = dict(inputs)
        self.digest = digest
        self._wall = wall
        self._clock = clock
        self.summary: RunSummary | None = None
        self._tally = Tally()
        self._last_write = float("-inf")

    def open(self, run_id: str, *, resumed: bool, step: int) -> None:
        """Start (or, on a resume, continue) run `run_id`; close other runs left `running`; prune."""
        now = self._wall()
        self.root.mkdir(parents=True, exist_ok=True)
        old = archive_files.read_summary(self.root / run_id / archive_files.SUMMARY_FILE) if resumed else None
        for other in archive_files.list_runs(self.root):
            if other.id != run_id and other.end == "running":  # its trainer died without a word
                archive_files.write_summary(self.root, other.model_copy(update={"end": "interrupted", "ended": other.updated}))
        if old is not None:
            # Recount from the records, not the summary: a SIGKILL leaves run.json behind its metrics.
            self._tally = Tally().add(r for r in archive_files.read_metrics(self.root, run_id) if _upto(r, step))
            self.summary = old.model_copy(update={
                "end": "running", "ended": None, "error": None, "resumes": old.resumes + 1, "updated": now,
            })
        else:
            self._tally = Tally()
            self.summary = RunSummary(
                id=run_id, trainer=self.trainer, started=now, updated=now,
                config_digest=self.digest, config=self.inputs, steps=step,
            )
        self._write()
        removed = archive_files.prune(self.root, keep=self.keep, max_bytes=self.max_bytes, live=run_id)
        if removed.removed:
            log.info("pruned %d old run(s)", len(removed.removed),
                     extra={"event": "runs_pruned", "runs": removed.removed, "freed_bytes": removed.freed_bytes})

    def append(self, records: list[dict]) -> None:
        """Add records to the run's metrics (until the byte budget is spent) and to its tally."""
        s = self.summary
        if s is None or not records:
            return
        self._tally.add(records)
        if not s.metrics_truncated:
            if s.metrics_bytes >= self.max_bytes:
                log.warning("run %s outgrew runs.max_bytes; its later metrics are not archived", s.id,
                            extra={"event": "run_metrics_truncated", "run_id": s.id})
                self.summary = s.model_copy(update={"metrics_truncated": True})
            else:
                written = archive_files.append_metrics(self.root, s.id, records)
                self.summary = s.model_copy(update={"metrics_bytes": s.metrics_bytes + written})
        if self._clock() - self._last_write >= SUMMARY_EVERY_S:
            self._write()

    def checkpoint(self) -> None:
        """A checkpoint was saved: bring run.json up to date."""
        if self.summary is not None:
            self._write()

    def close(self, end: str, error: str | None = None) -> None:
        """The run ended (`completed`, `stopped` or `failed`)."""
        if self.summary is None:
            return
        self.summary = self.summary.model_copy(update={"end": end, "error": error, "ended": self._wall()})
        self._write()
        self.summary = None

    def _write(self) -> None:
        assert self.summary is not None
        self.summary = self.summary.model_copy(update={**self._tally.fields(), "updated": self._wall()})
        archive_files.write_summary(self.root, self.summary)
        self._last_write = self._clock()


def _upto(record: dict, step: int) -> bool:
    s = record.get("step")
    return not isinstance(s, int) or s <= step


class RunLedger:
    """What `trainer.run.Run` asks about runs: the digest, new vs resume, and the archive hooks."""

    def __init__(self, settings: Any, *, store: Any, archive: RunArchive | None = None,
                 logger: logging.Logger | None = None) -> None:
        self.inputs = digest_inputs(settings)
        self.digest = config_digest(self.inputs)
        self.archive = archive
        self._store = store
        self._log = logger or log
        self.started = False
        self.run_id: str | None = None  # the run being trained, once chosen (``accept``/``ensure_started``)
        self._early: list[dict] = []
        self._failed = False

    def accept(self, run: Any, loaded: Any) -> bool:
        """True: resume from `loaded` (a trainer.checkpoint.Loaded or None). False: a new run starts."""
        choice = choose(loaded.state if loaded is not None else None, self.digest)
        if choice.resume:
            run_id = choice.previous or run.run_id
            self._begin(run, run_id, resumed=True, step=int(loaded.state.get("step", loaded.step)))
            return True
        if loaded is None:
            self._begin(run, run.run_id, resumed=False, step=0, reason=choice.reason)
            return False
        where = self._store.set_aside(choice.previous or "unknown") if run.is_main else None
        self._begin(run, run.run_id, resumed=False, step=0, reason=choice.reason, warn=True,
                    previous_run_id=choice.previous, checkpoints_moved_to=str(where) if where else None)
        return False

    def ensure_started(self, run: Any) -> None:
        """The entry trains without loading a checkpoint: that is a new run."""
        if not self.started:
            self._begin(run, run.run_id, resumed=False, step=0, reason="the entry loads no checkpoint")

    def records(self, records: list[dict]) -> None:
        """Records on their way to the metrics file: archived too (buffered until the run is known)."""
        if not self.started:
            self._early.extend(records[: max(0, EARLY_RECORDS - len(self._early))])
            return
        self._safely(lambda a: a.append(records))

    def saved(self, run: Any) -> None:
        self.ensure_started(run)
        self._safely(lambda a: a.checkpoint())

    def end(self, how: str, error: str | None = None) -> None:
        """The trainer is exiting: `completed`, `stopped` or `failed`."""
        if self.started:
            self._safely(lambda a: a.close(how, error))

    def _begin(self, run: Any, run_id: str, *, resumed: bool, step: int, warn: bool = False,
               **why: Any) -> None:
        """Open the run in the archive, then say in the metrics stream where it began: a `resume` record
        at the checkpoint's step (the page draws a restart there, however clean), or a `new_run` record
        (the page starts the curves afresh: the run before is another run, not this one's lost work).
        `warn`: a checkpoint of another run was set aside (`why` says which and where it went)."""
        self.started = True
        self.run_id = run_id
        word = "resumed run" if resumed else "new run"
        self._log.info("%s %s (config digest %s)", word, run_id, self.digest,
                       extra={"event": "run", "run_id": run_id, "resumed": resumed, "config_digest": self.digest})
        self._safely(lambda a: a.open(run_id, resumed=resumed, step=step))
        early, self._early = self._early, []
        if early:
            self._safely(lambda a: a.append(early))
        if resumed:
            run.record(RESUME_EVENT, step=step, run_id=run_id)
        elif warn:
            run.event(NEW_RUN_EVENT, level=logging.WARNING, step=step, run_id=run_id, **why)
        else:
            run.record(NEW_RUN_EVENT, step=step, run_id=run_id, **why)

    def _safely(self, action: Callable[[RunArchive], None]) -> None:
        if self.archive is None:
            return
        try:
            action(self.archive)
        except (OSError, ValueError) as e:
            if not self._failed:  # once: a full disk must not flood the log
                self._failed = True
                self._log.warning("run archive write failed: %s", e, extra={"event": "run_archive_failed"})
