"""A stand-in worker for watchdog tests: a real process that reports through keel's status layer.

    python tests/integration/standin_worker.py --mode MODE [--run-dir DIR] [--name NAME] ...

Modes:
  ok      heartbeat thread + a progress step every --step seconds; SIGUSR1 makes the loop hang from then on
  hang    like ok for --hang-after seconds, then the loop blocks; the heartbeat thread keeps beating
  leak    like ok, and each step keeps --leak-mb more MiB of touched memory
  crash   exits 1 at once (a crash loop under supervisord); with --crash-after N: reports, then exits 1 after N s
  silent  runs but never writes a status
  sink    never writes a status; appends every catchable signal it receives to --signal-log

SIGTERM: state=stopped, exit 0; with --ignore-sigterm it is ignored and the run then never ends by itself
(a torchrun agent in its rendezvous: only SIGKILL ends it). --run-dir and --name default to KEEL_CONFIG's
run_dir and KEEL_PROCESS.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: make `keel` importable


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["ok", "hang", "leak", "crash", "silent", "sink"], default="ok")
    p.add_argument("--run-dir")
    p.add_argument("--name", default=os.environ.get("KEEL_PROCESS", "worker"))
    p.add_argument("--heartbeat-interval", type=float, default=0.5)
    p.add_argument("--step", type=float, default=0.2)
    p.add_argument("--hang-after", type=float, default=1.0)
    p.add_argument("--leak-mb", type=float, default=8.0)
    p.add_argument("--crash-after", type=float, default=0.0)
    p.add_argument("--signal-log")
    p.add_argument("--ignore-sigterm", action="store_true")
    args = p.parse_args(argv)
    if args.run_dir is None:
        cfg = os.environ.get("KEEL_CONFIG")
        if not cfg:
            p.error("--run-dir or KEEL_CONFIG is required")
        args.run_dir = json.loads(Path(cfg).read_text())["paths"]["run_dir"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    stop = threading.Event()

    if args.mode == "crash" and not args.crash_after:
        print("crashing on purpose", file=sys.stderr)
        return 1

    if args.mode == "sink":
        log = Path(args.signal_log)

        def record(signum: int, _frame: object) -> None:
            with log.open("a") as f:
                f.write(f"{signal.Signals(signum).name}\n")
            if signum == signal.SIGTERM:
                stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCONT, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, record)
        log.touch()
        while not stop.wait(0.1):
            pass
        return 0

    # Imported only now, so that --mode crash exits within milliseconds (before supervisord's startsecs).
    from keel.status.models import State
    from keel.status.reporter import ProcessReporter

    hang_now = threading.Event()
    # ignoring: the loop stops stepping (and crashing) as if stuck, while the heartbeat thread beats on
    signal.signal(signal.SIGTERM, (lambda *_: hang_now.set()) if args.ignore_sigterm else (lambda *_: stop.set()))
    signal.signal(signal.SIGUSR1, lambda *_: hang_now.set())
    if args.mode == "silent":
        while not stop.wait(0.1):
            pass
        return 0

    rep = ProcessReporter(args.run_dir, args.name, "command", heartbeat_interval=args.heartbeat_interval)
    rep.start(payload={"step": 0, "mode": args.mode})
    rep.set_state(State.RUNNING)
    started = time.monotonic()
    hoard: list[bytearray] = []
    step = 0
    while not stop.wait(args.step):
        if args.mode == "crash" and time.monotonic() - started > args.crash_after and not hang_now.is_set():
            print("crashing on purpose", file=sys.stderr)
            return 1
        if hang_now.is_set() or (args.mode == "hang" and time.monotonic() - started > args.hang_after):
            # The loop is stuck (a deadlock in user code) while the heartbeat thread still runs.
            while not stop.wait(0.1):
                pass
            break
        if args.mode == "leak":
            chunk = bytearray(int(args.leak_mb * 2**20))
            for i in range(0, len(chunk), 4096):  # touch every page so it counts in RSS
                chunk[i] = 1
            hoard.append(chunk)
        step += 1
        rep.progress(step=step, loss=1.0 / step)
    rep.close(State.STOPPED)
    return 0


if __name__ == "__main__":
    sys.exit(main())
