"""Fault injection for bench/isolation_bench.py: the dashboard's per-session callback, monkeypatched.

`install(run_dir)` wraps `dashboard.page.SessionView.update` (the periodic callback
every browser session runs) before any session exists. The wrapper does nothing
until the bench drops a trigger file, `<run_dir>/isolation-fault.json`, which
the first callback to see it consumes (unlinks), so a dashboard restarted by
supervisord comes back clean. Faults (the JSON's "fault"):

    raise  {"seconds": S}    every callback raises RuntimeError for S seconds
                             (outside the page's own try/except, into Bokeh's callback machinery)
    block  {"seconds": S}    one callback busy-loops in pure Python for S seconds (holds the GIL
                             as a heavy computation does; a time.sleep would release it)
    leak   {"chunk_bytes": C, "cap_bytes": N}
                             every callback keeps another C bytes (pages touched, so RSS grows)
                             until RSS is N above what it was at the trigger; then it holds it

The same wrapper serves both set-ups: `python -m bench.isolation_faults` is the
dashboard under supervisord (keel's way: reads KEEL_CONFIG like `python -m dashboard`),
and bench/isolation_oldway.py calls `install` inside the training process.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

TRIGGER = "isolation-fault.json"
_PAGE = os.sysconf("SC_PAGE_SIZE")

_state: dict[str, Any] = {"fault": None, "until": 0.0, "seconds": 0.0, "chunk": 0, "cap": 0, "kept": []}


def rss_bytes() -> int:
    """This process's resident set size, from /proc (cheap enough for every callback)."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


def _touched(n: int) -> bytearray:
    buf = bytearray(n)  # zero pages from mmap: not resident until written
    buf[::_PAGE] = b"\x01" * len(range(0, n, _PAGE))
    return buf


def _poll(trigger: Path) -> None:
    try:
        raw = trigger.read_bytes()
        trigger.unlink()
    except FileNotFoundError:
        return
    spec = json.loads(raw)
    fault = spec["fault"]
    _state["fault"] = fault
    if fault == "raise":
        _state["until"] = time.monotonic() + float(spec["seconds"])
    elif fault == "block":
        _state["seconds"] = float(spec["seconds"])
    elif fault == "leak":
        _state["chunk"] = int(spec["chunk_bytes"])
        _state["cap"] = rss_bytes() + int(spec["cap_bytes"])
    print(f"isolation-fault: injected {spec}", file=sys.stderr, flush=True)


def install(run_dir: str | os.PathLike) -> None:
    """Wrap SessionView.update; call before the Bokeh server creates any session."""
    from dashboard.page import SessionView

    trigger = Path(run_dir) / TRIGGER
    original = SessionView.update

    def update(self: Any) -> None:
        if trigger.exists():
            _poll(trigger)
        fault = _state["fault"]
        if fault == "raise":
            if time.monotonic() < _state["until"]:
                raise RuntimeError("isolation bench: injected fault in the dashboard callback")
            _state["fault"] = None
        elif fault == "block":
            _state["fault"] = None  # one callback blocks, once
            end = time.monotonic() + _state["seconds"]
            x = 0
            while time.monotonic() < end:
                for i in range(2000):
                    x += i
        elif fault == "leak":
            if rss_bytes() < _state["cap"]:
                _state["kept"].append(_touched(_state["chunk"]))
        return original(self)

    SessionView.update = update  # type: ignore[method-assign]


def main() -> int:
    """`python -m bench.isolation_faults [--config F]`: `python -m dashboard` with the wrapper installed."""
    config = os.environ.get("KEEL_CONFIG")
    if "--config" in sys.argv:
        config = sys.argv[sys.argv.index("--config") + 1]
    if not config:
        print("isolation_faults: KEEL_CONFIG or --config is required", file=sys.stderr)
        return 2
    with open(config, encoding="utf-8") as f:
        run_dir = json.load(f)["paths"]["run_dir"]
    install(run_dir)
    from dashboard.server import main as dashboard_main

    return dashboard_main(["--config", config])


if __name__ == "__main__":
    sys.exit(main())
