"""Time to a hung verdict for a loop of 20 ms steps: `progress_timeout: auto` (measured) vs a fixed 10 m (computed).

Measured: a thread trains in 20 ms steps with the trainer's real phase timer
(trainer.phases) and publishes through a real ProcessReporter (status file in a
temp run dir, rewritten every `STATUS_INTERVAL`, as `Run.report` does); after
`STALL_AFTER` s it stops reporting (a hang in phase train). The main thread polls
like the watchdog every `POLL` s: reads the status file with the real StatusReader
and applies the real threshold (keel.watch.phases.stuck_phase, health.auto
defaults k=10, floor=2s). Time from the stall to the verdict, per trial.

Computed: with a fixed progress_timeout of 10 m the verdict comes 600 s + up to one
poll after the last progress.

Run: flock /tmp/keel-cpu.lock .venv/bin/python bench/phase_bench.py [--trials 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from keel.config.phases import AutoTimeout as AutoDefaults  # noqa: E402
from keel.render.contract import AutoTimeout  # noqa: E402
from keel.status.models import ProcessStatus, TrainingStatus  # noqa: E402
from keel.status.reader import StatusReader  # noqa: E402
from keel.status.reporter import ProcessReporter  # noqa: E402
from keel.watch.phases import stuck_phase  # noqa: E402
from trainer.phases import PhaseTimer  # noqa: E402

STEP = 0.020
STALL_AFTER = 4.0
STATUS_INTERVAL = 1.0  # report.status_interval's default
POLL = 2.0  # the dev watchdog's poll_interval
FIXED = 600.0
AUTO = AutoTimeout(**AutoDefaults().model_dump())  # the shipped defaults (k 10, floor 2 s, ceiling 10 m)


def trial(run_dir: Path) -> tuple[float, float, str]:
    rep = ProcessReporter(run_dir, "trainer", "trainer", heartbeat_interval=0.5)
    rep.start(payload={"run_id": "bench"})
    stalled = threading.Event()
    stalled_at: list[float] = []

    def train() -> None:
        timer = PhaseTimer(time.monotonic())
        start = last_write = time.monotonic()
        step = 0
        while time.monotonic() - start < STALL_AFTER:
            timer.enter("data", time.monotonic())
            time.sleep(STEP * 0.1)
            timer.exit(time.monotonic())
            time.sleep(STEP * 0.9)
            step += 1
            now = time.monotonic()
            timer.step_done(now)
            if now - last_write >= STATUS_INTERVAL:
                rep.progress(step=step, **timer.payload())
                last_write = now
        stalled_at.append(time.monotonic())
        stalled.set()  # from here: no step, no report; the heartbeat thread keeps beating

    t = threading.Thread(target=train, daemon=True)
    t.start()
    reader = StatusReader(run_dir)
    next_poll = time.monotonic() + POLL
    try:
        while True:
            time.sleep(max(0.0, next_poll - time.monotonic()))
            next_poll += POLL
            st = reader.read("trainer")
            if not isinstance(st, ProcessStatus) or not isinstance(st.payload, TrainingStatus):
                continue
            stuck = stuck_phase(st.payload, AUTO, time.monotonic())
            if stuck is not None and stalled.is_set():
                return time.monotonic() - stalled_at[0], stuck.threshold.seconds, stuck.reason
            if stuck is not None:
                raise AssertionError(f"false verdict while training: {stuck.reason}")
    finally:
        t.join()
        rep.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=5)
    args = ap.parse_args(argv)
    results = []
    for i in range(args.trials):
        with tempfile.TemporaryDirectory() as d:
            results.append(trial(Path(d)))
        print(f"trial {i + 1}: hung verdict {results[-1][0]:.2f}s after the stall ({results[-1][2]})")
    lat = [r[0] for r in results]
    fixed_mean, fixed_max = FIXED + POLL / 2, FIXED + POLL
    print(f"settings: step {STEP * 1000:.0f} ms, status_interval {STATUS_INTERVAL:g}s, poll {POLL:g}s, "
          f"auto k={AUTO.k:g} floor={AUTO.floor:g}s")
    print(f"auto (measured): median {statistics.median(lat):.2f}s, max {max(lat):.2f}s over {len(lat)} trials")
    print(f"fixed 10m (computed): {fixed_mean:.0f}s mean, {fixed_max:.0f}s worst")
    print(f"ratio fixed/auto (median): {fixed_mean / statistics.median(lat):.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
