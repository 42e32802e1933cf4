"""The old way keel replaces, for bench/isolation_bench.py: the dashboard inside the training process.

    python -m bench.isolation_oldway --trainer-config T.json --dashboard-config D.json [--faults]

One process: a daemon thread runs an asyncio loop with the same Bokeh server,
page and collector as `python -m dashboard` (dashboard.server.build_server,
dashboard.document.make_doc, dashboard.collector.Collector, its own status
reporter included), and the main thread runs the trainer exactly as
`python -m trainer` does (trainer.__main__.main: signals, status, checkpoints,
the built-in model). They share one interpreter, one GIL and, when pinned,
one CPU. `--faults` installs bench/isolation_faults.py's callback wrapper.

Exit: the trainer's exit code (SIGTERM stops it cleanly, as in keel); the
dashboard thread dies with the process.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading
from typing import Any


def _serve(cfg: Any, ready: threading.Event, failure: list[BaseException]) -> None:
    from bokeh.core.validation import silence
    from bokeh.core.validation.warnings import MISSING_RENDERERS

    from dashboard.collector import Collector
    from dashboard.server import build_server
    from keel.status.reporter import ProcessReporter

    silence(MISSING_RENDERERS, True)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)

    def reporter() -> ProcessReporter:
        return ProcessReporter(cfg.run_dir, cfg.name, "dashboard", durability=cfg.durability,  # type: ignore[arg-type]
                               heartbeat_interval=cfg.heartbeat_interval)

    async def start() -> Any:
        collector = Collector(cfg, reporter_factory=reporter)
        server = build_server(cfg, collector)
        server.start()
        return server

    try:
        server = loop.run_until_complete(start())
    except BaseException as exc:  # noqa: BLE001 - reported to the main thread
        failure.append(exc)
        ready.set()
        return
    logging.getLogger("bench.oldway").info("in-process dashboard on port %s", server.port)
    ready.set()
    loop.run_forever()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.isolation_oldway", description=__doc__.splitlines()[0])
    ap.add_argument("--trainer-config", required=True)
    ap.add_argument("--dashboard-config", required=True)
    ap.add_argument("--faults", action="store_true", help="install bench/isolation_faults.py's wrapper")
    args = ap.parse_args(argv)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

    from dashboard.config import load_config

    cfg = load_config(args.dashboard_config)
    if args.faults:
        from bench.isolation_faults import install

        install(cfg.run_dir)
    ready, failure = threading.Event(), []  # type: ignore[var-annotated]
    thread = threading.Thread(target=_serve, args=(cfg, ready, failure), name="dashboard", daemon=True)
    thread.start()
    ready.wait(60)
    if failure:
        print(f"oldway: dashboard failed to start: {failure[0]!r}", file=sys.stderr)
        return 1

    from trainer.__main__ import main as trainer_main

    rc = trainer_main(["--config", args.trainer_config])
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)  # the loop thread would otherwise be torn down mid-callback at interpreter exit


if __name__ == "__main__":
    sys.exit(main())
