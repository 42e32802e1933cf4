"""`bin/launch`: bring a stack up or down, apply a rendered config, restart a process, show status, follow a log.

    bin/launch up dev [--foreground]   # render, start supervisord (or the systemd target), wait healthy, print URL
    bin/launch apply dev               # make the rendered build/dev/ take effect; start what is stopped (Ansible)
    bin/launch down dev                # graceful stop, then supervisord; exit 0 only when nothing is left
    bin/launch restart dev trainer
    bin/launch status dev [--json]
    bin/launch logs dev trainer [-f]
    bin/launch incidents dev [--show ID]  # incident bundles (stacks before a restart); incident dev trainer: one now

Every command acts through the stack's ControlBackend (keel.control.factory.backend_for on
keel.json), so supervisord (standalone or include) and systemd share this code; what the stack
is and where its processes are comes from keel.stack.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from keel.config.load import ConfigError
from keel.control.base import ControlBackend, ControlError
from keel.control.factory import backend_for
from keel.control.supervisord import SUPERVISORD
from keel.render.contract import ContractError, StackFile
from keel.stack.paths import CODE_DIR, load_rendered_stack
from keel.stack.processes import kill_processes, orphans, supervisord_pid, wait_process_gone, wait_stack_gone


class LaunchError(RuntimeError):
    """A launch step failed; the message says what and how to fix it."""


def say(message: str) -> None:
    print(message, flush=True)


def fail(message: str) -> None:
    print(f"launch: {message}", file=sys.stderr)


def _standalone(stack: StackFile) -> bool:
    return stack.control.backend == "supervisord" and stack.control.mode == "standalone"


def _clean_before_start(stack: StackFile) -> None:
    """A standalone supervisord that is not running: kill what a crashed one left, remove its stale files."""
    left = orphans(stack)
    if left:
        say(f"==> cleaning up after a crashed supervisord: {len(left)} orphaned processes "
            f"({', '.join(str(p.pid) for p in left)})")
        kill_processes(left)
    for stale in (stack.control.socket, stack.control.pidfile):
        if os.path.exists(stale):
            say(f"==> removing stale {stale}")
            os.unlink(stale)


def _apply(stack: StackFile, backend: ControlBackend) -> list[str]:
    """Apply the rendered config and start what is stopped; the changes, one line each. Raises ControlError."""
    if _standalone(stack) and supervisord_pid(stack) is None:
        _clean_before_start(stack)
    changes = backend.apply()
    try:
        changes += [f"{name}: started" for name in backend.start_all()]
    except ControlError as exc:  # one that cannot start is the health check's to explain
        say(f"==> not every process could be started: {exc}")
    return changes


# -- commands ------------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    from keel.stack.install import install_systemd_units
    from keel.stack.rendering import render_and_write

    say(f"==> rendering {args.env}")
    try:
        stack = render_and_write(args.env, args.config_dir, args.overrides, args.backend)
    except ConfigError as exc:
        fail(str(exc))
        return 2
    backend = backend_for(stack)
    try:
        if stack.control.backend == "systemd":
            for path in install_systemd_units(stack):
                say(f"==> installed {path}")
        elif _standalone(stack):
            sup = supervisord_pid(stack)
            if sup is None and args.foreground:
                _clean_before_start(stack)
                return _foreground(stack, args)
            if sup is None:
                say(f"==> starting supervisord ({stack.control.config})")
            changes = _apply(stack, backend)
            if sup is not None:
                say(f"==> supervisord already running (pid {sup}); applied config changes: {'; '.join(changes)}"
                    if changes else f"==> already up: supervisord pid {sup}, nothing changed")
            return _finish_up(stack, args)
        for line in _apply(stack, backend):
            say(f"==> {line}")
    except (ControlError, OSError) as exc:
        fail(str(exc))
        return 1
    return _finish_up(stack, args)


def _finish_up(stack: StackFile, args: argparse.Namespace) -> int:
    from keel.stack.waiting import wait_healthy

    if args.no_wait:
        say(f"dashboard: {stack.dashboard_url}")
        return 0
    say(f"==> waiting for every process to be healthy (up to {args.timeout:g}s)")
    ok, views = wait_healthy(stack, args.timeout, on_change=say)
    if not ok:
        fail("not healthy after %gs:" % args.timeout)
        for v in views:
            if v.health != "ok":
                print(f"  {v.name}: {v.health}: {v.reason}", file=sys.stderr)
        print(f"  see: bin/status {stack.environment}, bin/launch logs {stack.environment} <process>", file=sys.stderr)
        return 1
    say(f"==> {stack.project} ({stack.environment}) is up: " + ", ".join(v.name for v in views))
    if stack.dashboard_url:
        say(f"dashboard: {stack.dashboard_url}")
    say(f"stop it with: bin/launch down {stack.environment}   (or make stop)")
    return 0


def _foreground(stack: StackFile, args: argparse.Namespace) -> int:
    """supervisord in front (-n): Ctrl-C or SIGTERM stops the stack gracefully, then returns."""
    conf = stack.control.config
    say(f"==> starting supervisord in the foreground ({conf}); Ctrl-C stops everything")
    proc = subprocess.Popen([SUPERVISORD, "-n", "-c", conf])

    def forward(signum: int, _frame: Any) -> None:
        proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    if _finish_up(stack, args) != 0:
        proc.send_signal(signal.SIGTERM)
    return proc.wait()


def cmd_apply(args: argparse.Namespace) -> int:
    """What the Ansible role runs after installing a release: one `changed:` line per change, or `unchanged`."""
    try:
        stack = load_rendered_stack(args.env)
    except ContractError as exc:
        fail(str(exc))
        return 2
    try:
        changes = _apply(stack, backend_for(stack))
    except ControlError as exc:
        fail(str(exc))
        return 1
    for line in changes:
        say(f"changed: {line}")
    if not changes:
        say(f"unchanged: {stack.project} ({stack.environment}) runs the rendered config")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    try:
        stack = load_rendered_stack(args.env)
    except ContractError as exc:
        fail(str(exc))
        return 2
    backend = backend_for(stack)
    names = ", ".join(stack.processes)
    try:
        if _standalone(stack):
            sup = supervisord_pid(stack)
            if sup is None:
                say("==> supervisord is not running")
            else:
                say(f"==> stopping {names} (each gets its stop timeout)")
                backend.stop_all()
                say(f"==> shutting down supervisord (pid {sup})")
                backend.shutdown()
                if not wait_process_gone(sup, 60):
                    fail(f"supervisord (pid {sup}) did not exit within 60s")
                    return 1
        else:
            say(f"==> stopping {names} (each gets its stop timeout)")
            backend.shutdown()
    except ControlError as exc:
        fail(str(exc))
        return 1
    left = wait_stack_gone(stack, 10)
    if left:
        fail("still running: " + ", ".join(f"{p.pid} ({' '.join(p.cmdline()[:3])})" for p in left)
             + f"\n  kill them, or run: bin/launch up {args.env} (cleans orphans) then down")
        return 1
    say("==> down: no process of the stack is left")
    return 0


def cmd_restart(args: argparse.Namespace) -> int:
    try:
        stack = load_rendered_stack(args.env)
        backend = backend_for(stack)
        names = [args.process] if args.process else list(stack.processes)
        for name in names:
            if name not in stack.processes:
                raise LaunchError(f"no process {name!r} in {args.env}; known: {', '.join(stack.processes)}")
            say(f"==> restarting {name}")
            backend.restart(name)
    except (ContractError, ControlError, LaunchError) as exc:
        fail(str(exc))
        return 1
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from keel.stack.logview import follow_log

    try:
        stack = load_rendered_stack(args.env)
    except ContractError as exc:
        fail(str(exc))
        return 2
    proc = stack.processes.get(args.process)
    if proc is None:
        fail(f"no process {args.process!r}; known: {', '.join(stack.processes)}")
        return 2
    if stack.control.backend == "systemd":
        argv = ["journalctl", "-u", proc.unit, "-n", str(args.lines), "-o", "cat"] + (["-f"] if args.follow else [])
        return subprocess.call(argv)
    return follow_log(Path(proc.log_file), lines=args.lines, follow=args.follow, raw=args.raw)


def cmd_status(args: argparse.Namespace) -> int:
    """bin/status itself, run in this process's place (an entry point is not a library to import)."""
    argv = [sys.executable, "-P", "-m", "keel.cli.status", args.env] + (["--json"] if args.json else []) \
        + (["--watch"] if args.watch else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(CODE_DIR), os.environ.get("PYTHONPATH")]))}
    sys.stdout.flush()
    os.execve(sys.executable, argv, env)
    return 0  # pragma: no cover (execve does not return)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch", description="Bring a keel stack up or down and look at it.")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="render, start, wait until healthy, print the dashboard URL")
    up.add_argument("env")
    up.add_argument("--foreground", action="store_true", help="keep supervisord in front; Ctrl-C stops everything")
    up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for health (default 120)")
    up.add_argument("--no-wait", action="store_true", help="do not wait for health")
    up.add_argument("--backend", choices=("supervisord", "systemd"))
    up.add_argument("--config-dir", type=Path)
    up.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    up.set_defaults(func=cmd_up)

    apply = sub.add_parser("apply", help="make the rendered build/ENV take effect (only changed processes restart) "
                                         "and start what is stopped; renders nothing")
    apply.add_argument("env")
    apply.set_defaults(func=cmd_apply)

    down = sub.add_parser("down", help="stop every process gracefully, then supervisord")
    down.add_argument("env")
    down.set_defaults(func=cmd_down)

    restart = sub.add_parser("restart", help="restart one process (or all)")
    restart.add_argument("env")
    restart.add_argument("process", nargs="?")
    restart.set_defaults(func=cmd_restart)

    status = sub.add_parser("status", help="the same table as bin/status")
    status.add_argument("env")
    status.add_argument("--json", action="store_true")
    status.add_argument("--watch", action="store_true")
    status.set_defaults(func=cmd_status)

    logs = sub.add_parser("logs", help="show (and follow) one process's log, JSON pretty-printed")
    logs.add_argument("env")
    logs.add_argument("process")
    logs.add_argument("-f", "--follow", action="store_true")
    logs.add_argument("-n", "--lines", type=int, default=40)
    logs.add_argument("--raw", action="store_true", help="print JSON lines as they are")
    logs.set_defaults(func=cmd_logs)
    from keel.stack.incidents import add_incident_commands  # incidents ENV [--show ID], incident ENV PROCESS

    add_incident_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
