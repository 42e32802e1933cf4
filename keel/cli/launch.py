"""`bin/launch`: bring a stack up or down, restart a process, show status, follow a log.

    bin/launch up dev [--foreground]   # render, start supervisord (or the systemd target), wait healthy, print URL
    bin/launch down dev                # graceful stop, then supervisord; exit 0 only when nothing is left
    bin/launch restart dev trainer
    bin/launch status dev [--json]
    bin/launch logs dev trainer [-f]

Every command works from keel.json (rendered by `up`) through keel.control.backends, so
the supervisord and systemd backends share this code.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from keel.cli.render_config import build_root, make_dirs, render_environment, stack_of, supervisorctl
from keel.config.load import ConfigError

SUPERVISORD = str(Path(sys.executable).parent / "supervisord")


class LaunchError(RuntimeError):
    """A launch step failed; the message says what and how to fix it."""


def say(message: str) -> None:
    print(message, flush=True)


# -- rendering ------------------------------------------------------------------------------------


def render_env(env: str, config_dir: Path | None, overrides: list[str], backend: str | None = None) -> dict[str, Any]:
    """Validate and render like bin/render-config; return keel.json. A bad config raises ConfigError, writes nothing."""
    from keel.render.writer import write_files

    _, _, files, build_dir = render_environment(env, config_dir, overrides, backend)
    write_files(files, build_dir)
    stack = stack_of(files)
    make_dirs(stack, list(stack["processes"]))
    return stack


def stack_path(env: str) -> Path:
    return build_root() / env / "keel.json"


# -- processes of this stack, wherever they are ---------------------------------------------------


def stack_processes(stack: dict[str, Any]) -> list[psutil.Process]:
    """Every live process started for this stack: found by the KEEL_CONFIG its backend put in its
    environment (children such as DataLoader workers and torchrun ranks inherit it)."""
    build_dir = stack["paths"]["build_dir"].rstrip("/") + "/"
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            value = proc.environ().get("KEEL_CONFIG", "")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if value.startswith(build_dir) and proc.pid != os.getpid():
            found.append(proc)
    return found


def supervisord_pid(stack: dict[str, Any]) -> int | None:
    """The pid in our pidfile, if that process is a live supervisord (not a reused pid)."""
    try:
        pid = int(Path(stack["control"]["pidfile"]).read_text().strip())
        proc = psutil.Process(pid)
        if proc.status() != psutil.STATUS_ZOMBIE and "supervisord" in " ".join(proc.cmdline()):
            return pid
    except (OSError, ValueError, psutil.Error):
        pass
    return None


def orphans(stack: dict[str, Any]) -> list[psutil.Process]:
    """Stack processes with no live supervisord above them (left by a SIGKILLed supervisord)."""
    if stack["backend"] != "supervisord" or stack["control"]["mode"] != "standalone":
        return []
    sup = supervisord_pid(stack)
    result = []
    for proc in stack_processes(stack):
        try:
            ancestors = {p.pid for p in proc.parents()}
        except psutil.Error:
            continue
        if sup is None or sup not in ancestors:
            result.append(proc)
    return result


def kill_processes(procs: list[psutil.Process], timeout: float = 10.0) -> None:
    """SIGTERM, wait, then SIGKILL what is left; returns when all are gone (zombies count as gone)."""
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


# -- waiting for health ---------------------------------------------------------------------------


def wait_healthy(stack: dict[str, Any], timeout: float, quiet: bool = False) -> tuple[bool, list]:
    from keel.control.backends import backend_for
    from keel.host.resources import ResourceSampler
    from keel.stack.view import all_healthy, collect
    from keel.status.files import StatusReader

    backend = backend_for(stack, timeout=10.0)
    reader, sampler = StatusReader(stack["paths"]["run_dir"]), ResourceSampler()
    deadline = time.monotonic() + timeout
    last_line = ""
    while True:
        views = collect(stack, backend, reader=reader, sampler=sampler)
        if all_healthy(views):
            return True, views
        line = "waiting: " + ", ".join(f"{v.name} {v.health}" + (f" ({v.reason})" if v.health != "ok" else "") for v in views)
        if line != last_line and not quiet:
            say(line)
            last_line = line
        if time.monotonic() >= deadline:
            return False, views
        time.sleep(1.0)


# -- commands ------------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    say(f"==> rendering {args.env}")
    try:
        stack = render_env(args.env, args.config_dir, args.overrides, args.backend)
    except ConfigError as exc:
        print(f"launch: {exc}", file=sys.stderr)
        return 2
    backend = stack["backend"]
    if backend == "systemd":
        return _up_systemd(stack, args)
    if stack["control"]["mode"] == "include":
        return _up_include(stack, args)
    return _up_standalone(stack, args)


def _supervisorctl(stack: dict[str, Any], *args: str) -> subprocess.CompletedProcess:
    return supervisorctl(stack["control"]["socket"], *args)


def _up_standalone(stack: dict[str, Any], args: argparse.Namespace) -> int:
    conf = stack["control"]["config"]
    sup = supervisord_pid(stack)
    if sup is not None:
        done = _supervisorctl(stack, "update")
        changed = [line for line in done.stdout.splitlines() if line.strip()]
        _supervisorctl(stack, "start", "all")
        if changed:
            say("==> supervisord already running (pid %d); applied config changes: %s" % (sup, "; ".join(changed)))
        else:
            say(f"==> already up: supervisord pid {sup}, nothing changed")
    else:
        left = orphans(stack)
        if left:
            say(f"==> cleaning up after a crashed supervisord: {len(left)} orphaned processes "
                f"({', '.join(str(p.pid) for p in left)})")
            kill_processes(left)
        for stale in (stack["control"]["socket"], stack["control"]["pidfile"]):
            if os.path.exists(stale):
                say(f"==> removing stale {stale}")
                os.unlink(stale)
        if args.foreground:
            return _foreground(stack, conf, args)
        say(f"==> starting supervisord ({conf})")
        done = subprocess.run([SUPERVISORD, "-c", conf], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            print(f"launch: supervisord failed to start: {(done.stdout + done.stderr).strip()}", file=sys.stderr)
            return 1
    return _finish_up(stack, args)


def _finish_up(stack: dict[str, Any], args: argparse.Namespace) -> int:
    if args.no_wait:
        say(f"dashboard: {stack['dashboard_url']}")
        return 0
    say(f"==> waiting for every process to be healthy (up to {args.timeout:g}s)")
    ok, views = wait_healthy(stack, args.timeout)
    if not ok:
        print("launch: not healthy after %gs:" % args.timeout, file=sys.stderr)
        for v in views:
            if v.health != "ok":
                print(f"  {v.name}: {v.health}: {v.reason}", file=sys.stderr)
        print(f"  see: bin/status {stack['environment']}, bin/launch logs {stack['environment']} <process>", file=sys.stderr)
        return 1
    say(f"==> {stack['project']} ({stack['environment']}) is up: " + ", ".join(v.name for v in views))
    if stack.get("dashboard_url"):
        say(f"dashboard: {stack['dashboard_url']}")
    say(f"stop it with: bin/launch down {stack['environment']}   (or make stop)")
    return 0


def _foreground(stack: dict[str, Any], conf: str, args: argparse.Namespace) -> int:
    """supervisord in front (-n): Ctrl-C or SIGTERM stops the stack gracefully, then returns."""
    say(f"==> starting supervisord in the foreground ({conf}); Ctrl-C stops everything")
    proc = subprocess.Popen([SUPERVISORD, "-n", "-c", conf])

    def forward(signum: int, _frame: Any) -> None:
        proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    if _finish_up(stack, args) != 0:
        proc.send_signal(signal.SIGTERM)
    return proc.wait()


def _up_include(stack: dict[str, Any], args: argparse.Namespace) -> int:
    if not os.path.exists(stack["control"]["socket"]):
        print(f"launch: the host supervisord ({stack['control']['socket']}) is not running; start it "
              "(systemctl start supervisor) and run this again", file=sys.stderr)
        return 1
    programs = [p["program"] for p in stack["processes"].values()]
    for step in (["reread"], ["update", *programs], ["start", *programs]):
        done = _supervisorctl(stack, *step)
        if done.returncode != 0 and step[0] != "start":
            print(f"launch: supervisorctl {' '.join(step)}: {(done.stdout + done.stderr).strip()}", file=sys.stderr)
            return 1
    return _finish_up(stack, args)


def _up_systemd(stack: dict[str, Any], args: argparse.Namespace) -> int:
    from keel.fs.atomic import atomic_write_text

    unit_dir = Path(stack["control"]["unit_dir"])
    build_units = Path(stack["paths"]["build_dir"]) / "systemd"
    for unit in sorted(build_units.iterdir()):
        target = unit_dir / unit.name
        text = unit.read_text()
        if not target.exists() or target.read_text() != text:
            atomic_write_text(target, text, 0o644)
            say(f"==> installed {target}")
    for step in (["daemon-reload"], ["enable", stack["control"]["target"]], ["restart", stack["control"]["target"]]):
        done = subprocess.run(["systemctl", *step], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            print(f"launch: systemctl {' '.join(step)}: {(done.stdout + done.stderr).strip()}", file=sys.stderr)
            return 1
    return _finish_up(stack, args)


def cmd_down(args: argparse.Namespace) -> int:
    from keel.stack.view import StackFileError, load_stack

    try:
        stack = load_stack(stack_path(args.env))
    except StackFileError as exc:
        print(f"launch: {exc}", file=sys.stderr)
        return 2
    if stack["backend"] == "systemd":
        done = subprocess.run(["systemctl", "stop", stack["control"]["target"]], capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            print(f"launch: systemctl stop: {(done.stdout + done.stderr).strip()}", file=sys.stderr)
            return 1
        say(f"==> stopped {stack['control']['target']}")
        return 0
    programs = [p["program"] for p in stack["processes"].values()]
    if stack["control"]["mode"] == "include":
        _supervisorctl(stack, "stop", *programs)
    else:
        sup = supervisord_pid(stack)
        if sup is not None:
            say(f"==> stopping {', '.join(programs)} (each gets its stop timeout)")
            _supervisorctl(stack, "stop", "all")
            say(f"==> shutting down supervisord (pid {sup})")
            _supervisorctl(stack, "shutdown")
            try:
                psutil.Process(sup).wait(timeout=60)
            except psutil.TimeoutExpired:
                print(f"launch: supervisord (pid {sup}) did not exit within 60s", file=sys.stderr)
                return 1
            except psutil.NoSuchProcess:
                pass
        else:
            say("==> supervisord is not running")
    deadline = time.monotonic() + 10
    left = stack_processes(stack)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = stack_processes(stack)
    if left:
        print("launch: still running: " + ", ".join(f"{p.pid} ({' '.join(p.cmdline()[:3])})" for p in left)
              + f"\n  kill them, or run: bin/launch up {args.env} (cleans orphans) then down", file=sys.stderr)
        return 1
    say("==> down: no process of the stack is left")
    return 0


def _backend(env: str):
    from keel.control.backends import backend_for
    from keel.stack.view import load_stack

    stack = load_stack(stack_path(env))
    return stack, backend_for(stack)


def cmd_restart(args: argparse.Namespace) -> int:
    from keel.control.backends import ControlError
    from keel.stack.view import StackFileError

    try:
        stack, backend = _backend(args.env)
        names = [args.process] if args.process else list(stack["processes"])
        for name in names:
            if name not in stack["processes"]:
                raise LaunchError(f"no process {name!r} in {args.env}; known: {', '.join(stack['processes'])}")
            say(f"==> restarting {name}")
            backend.restart(name)
    except (StackFileError, ControlError, LaunchError) as exc:
        print(f"launch: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from keel.cli.logview import follow_log
    from keel.stack.view import StackFileError, load_stack

    try:
        stack = load_stack(stack_path(args.env))
    except StackFileError as exc:
        print(f"launch: {exc}", file=sys.stderr)
        return 2
    proc = stack["processes"].get(args.process)
    if proc is None:
        print(f"launch: no process {args.process!r}; known: {', '.join(stack['processes'])}", file=sys.stderr)
        return 2
    if stack["backend"] == "systemd":
        argv = ["journalctl", "-u", proc["unit"], "-n", str(args.lines), "-o", "cat"] + (["-f"] if args.follow else [])
        return subprocess.call(argv)
    return follow_log(Path(proc["log_file"]), lines=args.lines, follow=args.follow, raw=args.raw)


def cmd_status(args: argparse.Namespace) -> int:
    from keel.cli import status as statuscmd

    return statuscmd.main([args.env] + (["--json"] if args.json else []) + (["--watch"] if args.watch else []))


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
