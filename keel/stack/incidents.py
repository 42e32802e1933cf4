"""`bin/launch incidents ENV [--show ID]`, `bin/launch incident ENV PROCESS`, and bin/status's pointer line.

The bundles' layout is keel.watch.incidents'; this module only lists, prints and asks
for one on demand (keel.watch.recorder.capture_on_demand, the same capture the
watchdog runs before a restart, without the restart).
"""

from __future__ import annotations

import argparse
import sys
from typing import IO, Any

from keel.render.contract import ContractError, StackFile
from keel.stack.paths import load_rendered_stack
from keel.watch.incidents import list_incidents, load_incident, newest_incident, stuck_words

__all__ = ["add_incident_commands", "format_incident", "latest_incident", "latest_line"]


def latest_incident(stack: StackFile) -> dict[str, Any] | None:
    """The newest incident's summary (with its ``path``), or None."""
    return newest_incident(stack.paths.run_dir)


def _where(summary: dict[str, Any]) -> str:
    return stuck_words(summary.get("stuck"))


def _fail(message: str, code: int) -> int:
    print(f"launch: {message}", file=sys.stderr)
    return code


def _stack(env: str) -> StackFile | int:
    """The rendered stack of ``env``, or exit code 2 after saying why."""
    try:
        return load_rendered_stack(env)
    except ContractError as exc:
        return _fail(str(exc), 2)


def latest_line(stack: StackFile) -> str | None:
    """bin/status's line: ``latest incident: <id> (<process>, <rule>, <action>): stuck in f (file:line) -> path``."""
    s = latest_incident(stack)
    if s is None:
        return None
    if "error" in s:
        return f"latest incident: {s['id']}: {s['error']} ({s['path']})"
    return (f"latest incident: {s['id']} ({s.get('process')}, {s.get('verdict', {}).get('rule')}, {s.get('action')}): "
            f"{_where(s)}; bin/launch incidents {stack.environment} --show {s['id']}")


def format_list(found: list[dict[str, Any]]) -> str:
    rows = [("ID", "PROCESS", "RULE", "ACTION", "WHERE")]
    for s in found:
        rows.append((s.get("id", "?"), str(s.get("process", "?")), str((s.get("verdict") or {}).get("rule", "?")),
                     str(s.get("action", "?")), s["error"] if "error" in s else _where(s)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(widths[i]) for i, c in enumerate(r[:4])) + "  " + r[4] for r in rows)


def format_incident(summary: dict[str, Any], files: dict[str, str]) -> str:
    """Header, then the stacks (the stuck thread first), then the log tail: the line it hung on comes early."""
    v = summary.get("verdict") or {}
    head = [
        f"incident {summary.get('id')}  ({summary.get('path')})",
        f"process {summary.get('process')} pid {summary.get('pid')} at {summary.get('time')}",
        f"verdict {v.get('level')} {v.get('rule')}: {v.get('reason')}",
        f"action {summary.get('action')}; captured in {summary.get('capture_seconds')}s"
        + ("" if summary.get("complete", True) else " (INCOMPLETE: deadline reached)"),
        *[f"note: {n}" for n in summary.get("notes", [])],
    ]
    log_tail = files.get("log.txt", "").splitlines()[-20:]
    return "\n".join(head) + "\n\n" + files.get("stacks.txt", "(no stacks.txt)").rstrip() + "\n\n" + \
        "== last log lines (log.txt has more)\n" + "\n".join(log_tail) + "\n"


def cmd_incidents(args: argparse.Namespace, out: IO[str] = sys.stdout) -> int:
    stack = _stack(args.env)
    if isinstance(stack, int):
        return stack
    if args.show is None:
        found = list_incidents(stack.paths.run_dir)
        out.write(format_list(found) + "\n" if found else f"no incidents in {stack.paths.run_dir}/incidents\n")
        return 0
    try:
        summary, files = load_incident(stack.paths.run_dir, args.show)
    except LookupError as exc:
        return _fail(str(exc), 1)
    out.write(format_incident(summary, files))
    return 0


def cmd_incident(args: argparse.Namespace, out: IO[str] = sys.stdout) -> int:
    """Capture one incident of PROCESS now (stacks, logs, metrics, resources); nothing is killed or restarted."""
    from keel.control.base import ControlError
    from keel.control.factory import backend_for
    from keel.host.sampling import ResourceSampler
    from keel.status.reader import StatusReader
    from keel.watch.recorder import capture_on_demand

    stack = _stack(args.env)
    if isinstance(stack, int):
        return stack
    proc = stack.processes.get(args.process)
    if proc is None:
        return _fail(f"no process {args.process!r}; known: {', '.join(stack.processes)}", 2)
    reader = StatusReader(stack.paths.run_dir)
    statuses = [reader.read(n) for n in proc.status_names]
    try:
        info = backend_for(stack, timeout=10.0).status().get(args.process)
    except ControlError:
        info = None
    pid = (info.pid if info is not None and info.pid else None) or next((s.pid for s in statuses if s), None)
    if not pid:
        return _fail(f"{args.process} is not running (no pid from the backend or its status)", 1)
    sampler = ResourceSampler()
    try:
        path = capture_on_demand(stack, args.process, pid, statuses, sampler.sample([pid]))
    except LookupError as exc:
        return _fail(str(exc), 1)
    finally:
        sampler.close()
    out.write(f"incident written: {path}\n")
    summary, files = load_incident(stack.paths.run_dir, path.name)
    out.write(format_incident(summary, files))
    return 0


def add_incident_commands(sub: Any) -> None:
    """Register ``incidents`` and ``incident`` on bin/launch's subparsers."""
    p = sub.add_parser("incidents", help="list the incident bundles, or print one (--show ID, or --show latest)")
    p.add_argument("env")
    p.add_argument("--show", metavar="ID", help="an incident id (or a unique prefix, or 'latest')")
    p.set_defaults(func=cmd_incidents)
    p = sub.add_parser("incident", help="capture an incident of PROCESS now, without killing it")
    p.add_argument("env")
    p.add_argument("process")
    p.set_defaults(func=cmd_incident)
