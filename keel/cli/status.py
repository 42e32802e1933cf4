"""`bin/status <env>`: one line per process: state, health verdict, pid, uptime, restarts, step, loss, ages, GPUs.

Health and restarts are the watchdog's (what it published in its status); when
it is not reporting, the header says so and the verdicts are judged here with
the same rules (keel.stack.view).

    bin/status dev            # a table (colours on a TTY)
    bin/status dev --json     # for scripts and the Ansible health gate
    bin/status dev --watch    # refresh every 2 s
    bin/status dev --wait 60  # wait until healthy (or 60 s), then print
    bin/status dev --runs     # the trainers' runs, newest first (--json too); exit 0

Exit code: 0 when every process is healthy, 1 when one is not, 2 when the stack
was never rendered or its backend cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from keel.render.contract import ContractError
from keel.stack.paths import load_rendered_stack

_COLOURS = {"ok": "\033[32m", "starting": "\033[36m", "degraded": "\033[33m", "unhealthy": "\033[31m", "stopped": "\033[2m"}


def _age(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 120:
        return f"{value:.0f}s"
    if value < 7200:
        return f"{value / 60:.0f}m"
    return f"{value / 3600:.1f}h"


def _num(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _why(v) -> str:
    """The verdict's reason (when not ok), the last action, and failed status writes (the channel degrades)."""
    parts = [] if v.health == "ok" else [v.reason]
    if v.last_action and v.health != "ok":
        parts.append(f"last action: {v.last_action} ({v.last_action_reason})")
    if v.end_reason and (v.health != "ok" or v.pid is None):  # how its last run ended (docs/watchdog.md, "End states")
        parts.append(f"last end: {v.end_reason}")
    if v.write_failures:
        parts.append(f"{v.write_failures} status write(s) failed, last: {v.last_write_error or '?'}")
    return "; ".join(p for p in parts if p)


def not_reporting(views) -> str | None:
    """Why the watchdog's verdicts are not shown (judged here instead), or None when they are."""
    return next((v.judged_by[len("local: "):] for v in views
                 if v.kind != "watchdog" and v.judged_by.startswith("local: ")), None)


def table(views, colour: bool) -> str:
    header = ("PROCESS", "STATE", "HEALTH", "PID", "UPTIME", "RESTARTS", "STEP", "LOSS", "HEARTBEAT", "PROGRESS", "GPU", "WHY")
    rows = [header]
    for v in views:
        rows.append((
            v.name, v.state, v.health, _num(v.pid), _age(v.uptime_s), _num(v.restarts), _num(v.step), _num(v.loss),
            _age(v.heartbeat_age_s), _age(v.progress_age_s), ",".join(map(str, v.gpus)) or "-", _why(v),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = []
    for index, row in enumerate(rows):
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + [row[-1]]
        line = "  ".join(cells).rstrip()
        if colour and index and row[2] in _COLOURS:
            line = line.replace(row[2].ljust(widths[2]), f"{_COLOURS[row[2]]}{row[2].ljust(widths[2])}\033[0m", 1)
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="status", description="The state and health of every process of a stack.")
    parser.add_argument("env")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--watch", action="store_true", help="refresh every --interval seconds until Ctrl-C")
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="poll until every process is healthy or SECONDS pass (exit 0 or 1)")
    parser.add_argument("--runs", action="store_true", help="list the trainers' runs (kept under <run_dir>/runs)")
    args = parser.parse_args(argv)

    from keel.control.factory import backend_for
    from keel.host.sampling import ResourceSampler
    from keel.stack.view import all_healthy, collect
    from keel.stack.incidents import latest_incident, latest_line
    from keel.status.reader import StatusReader

    try:
        stack = load_rendered_stack(args.env)
    except ContractError as exc:  # not rendered, unreadable, or off the contract: names the file (and the key)
        print(f"status: {exc}", file=sys.stderr)
        return 2
    if args.runs:
        from keel.status.runs import list_runs_of, runs_table

        found = list_runs_of(stack.paths.run_dir, [n for n, p in stack.processes.items() if p.kind == "trainer"])
        print(json.dumps([s.model_dump(mode="json") for s in found]) if args.json else runs_table(found), flush=True)
        return 0
    backend = backend_for(stack, timeout=10.0)
    reader, sampler = StatusReader(stack.paths.run_dir), ResourceSampler()
    colour = sys.stdout.isatty() and not args.json
    deadline = time.monotonic() + args.wait
    try:
        while True:
            views = collect(stack, backend, reader=reader, sampler=sampler)
            healthy = all_healthy(views)
            if not healthy and time.monotonic() < deadline:
                time.sleep(1.0)
                continue
            if args.json:
                print(json.dumps({
                    "project": stack.project, "environment": stack.environment, "backend": stack.backend,
                    "healthy": healthy, "dashboard_url": stack.dashboard_url,
                    "watchdog_reporting": not_reporting(views) is None,
                    "processes": [v.to_json() for v in views],
                    "latest_incident": (latest_incident(stack) or {}).get("path"),
                }), flush=True)
            else:
                if args.watch and colour:
                    print("\033[2J\033[H", end="")
                silent = not_reporting(views)
                print(f"{stack.project} ({stack.environment}, {stack.backend}): "
                      + ("healthy" if healthy else "NOT healthy")
                      + (f" ({silent}; verdicts judged here, restarts unknown)" if silent else ""))
                print(table(views, colour), flush=True)
                if (incident := latest_line(stack)) is not None:  # keel.stack.incidents
                    print(incident, flush=True)
            if not args.watch:
                if views and all(v.state == "UNKNOWN" for v in views):
                    return 2  # the backend itself cannot be reached
                return 0 if healthy else 1
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
