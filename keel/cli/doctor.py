"""`bin/doctor <env>`: check what keel needs, explain what is wrong and how to fix it.

Each check returns a Finding (ok, warn or fail, what it saw, how to fix it). The
exit code is 1 when any check fails, so scripts and CI can gate on it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from keel.render.contract import StackFile

OK, WARN, FAIL = "ok", "warn", "fail"
_MARK = {OK: "\033[32m✓\033[0m", WARN: "\033[33m!\033[0m", FAIL: "\033[31m✗\033[0m"}
_PLAIN = {OK: "ok  ", WARN: "warn", FAIL: "FAIL"}


@dataclass
class Finding:
    check: str
    level: str
    detail: str
    fix: str = ""


REQUIRED_MODULES = ("supervisor", "bokeh", "yaml", "jinja2", "psutil", "pydantic", "pythonjsonlogger", "pynvml", "prometheus_client")


def check_dependencies() -> Finding:
    missing = [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]
    if importlib.util.find_spec("torch") is None:
        missing.append("torch")
    if missing:
        return Finding("python deps", FAIL, f"missing: {', '.join(missing)}", "make venv  (or: .venv/bin/pip install -r requirements.txt)")
    return Finding("python deps", OK, f"all present in {sys.prefix}")


def check_config(env: str, config_dir: Path | None) -> tuple[Finding, Any]:
    from keel.config.load import ConfigError, load_config
    from keel.stack.paths import config_dir as default_config_dir

    try:
        loaded = load_config(env, default_config_dir(config_dir))
    except ConfigError as exc:
        return Finding("config", FAIL, str(exc), "fix the key named above, then bin/render-config " + env), None
    return Finding("config", OK, f"{env}: {len(loaded.config.processes)} processes, {loaded.config.backend}"), loaded


def check_rendered(env: str, config_dir: Path | None) -> Finding:
    from keel.config.load import ConfigError
    from keel.render.writer import diff_files
    from keel.stack.rendering import render_environment

    try:
        _, _, files, build_dir = render_environment(env, config_dir)
    except ConfigError as exc:
        return Finding("rendered files", FAIL, str(exc), "fix the value named above")
    if not (build_dir / "keel.json").exists():
        return Finding("rendered files", FAIL, f"{build_dir} not rendered", f"bin/render-config {env}")
    diff = diff_files(files, build_dir)
    if diff:
        changed = sorted({line[4:].split("\t")[0] for line in diff.splitlines() if line.startswith("+++ ")})
        return Finding("rendered files", WARN, f"out of date with configs/: {', '.join(changed)}",
                       f"bin/render-config {env}  (then bin/launch up {env} applies it)")
    return Finding("rendered files", OK, f"{build_dir} matches configs/")


def check_dirs(stack: StackFile) -> Finding:
    bad = []
    for key in ("run_dir", "log_dir", "checkpoint_dir"):
        path = Path(getattr(stack.paths, key))
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not os.access(probe, os.W_OK | os.X_OK):
            bad.append(f"{key} {path}")
    if bad:
        return Finding("dirs writable", FAIL, "cannot write: " + ", ".join(bad),
                       "create them with the right owner (the Ansible host role does this) or fix paths: in the config")
    return Finding("dirs writable", OK, "run, log and checkpoint dirs are writable")


def _port_owner(port: int) -> str | None:
    import psutil

    try:
        for conn in psutil.net_connections("inet"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
                return str(conn.pid)
    except psutil.AccessDenied:
        pass
    return None


def check_ports(stack: StackFile) -> Finding:
    from keel.stack.processes import stack_processes

    ours = {p.pid for p in stack_processes(stack)}
    busy = []
    for name, proc in stack.processes.items():
        port = proc.port
        if not port:
            continue
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
                continue
            except OSError:
                pass
        owner = _port_owner(port)
        if owner is None or int(owner) not in ours:
            busy.append(f"{port} ({name}) held by pid {owner or '?'}")
    if busy:
        return Finding("ports free", FAIL, "in use by another program: " + ", ".join(busy),
                       "stop that program, or move ours: bin/render-config ENV --set processes.dashboard.port=NNNN")
    return Finding("ports free", OK, "every configured port is free or held by this stack")


def check_gpus(stack: StackFile) -> Finding:
    from keel.host.sampling import ResourceSampler

    sampler = ResourceSampler()
    sample = sampler.sample([])
    sampler.close()
    wants = [n for n, p in stack.processes.items() if p.gpus]
    if sample.gpu_error:
        if wants:
            return Finding("GPU / NVML", FAIL, f"{', '.join(wants)} asks for GPUs but {sample.gpu_error}",
                           "install the NVIDIA driver (nvidia-smi must work), or set gpus: [] for a CPU run")
        return Finding("GPU / NVML", OK, f"no GPU metrics ({sample.gpu_error}); nothing asks for a GPU")
    return Finding("GPU / NVML", OK, f"{len(sample.gpus)} GPUs: " + ", ".join(f"{g.index}:{g.name}" for g in sample.gpus))


def check_supervisord(stack: StackFile) -> list[Finding]:
    from keel.control.base import ControlError
    from keel.control.factory import backend_for
    from keel.stack.processes import orphans, supervisord_pid

    if stack.control.backend != "supervisord":
        return [Finding("backend", OK, "systemd: see systemctl status " + stack.control.target)]
    findings = []
    sock, pidfile = stack.control.socket, stack.control.pidfile
    standalone = stack.control.mode == "standalone"
    pid = supervisord_pid(stack) if standalone else None
    if standalone and pid is None:
        stale = [p for p in (sock, pidfile) if os.path.exists(p)]
        if stale:
            findings.append(Finding("stale files", FAIL, f"left by a supervisord that is gone: {', '.join(stale)}",
                                    f"bin/launch up {stack.environment} removes them (or delete them by hand)"))
        else:
            findings.append(Finding("supervisord", WARN, "not running", f"bin/launch up {stack.environment}"))
    else:
        try:
            infos = backend_for(stack, timeout=5.0).status()
            findings.append(Finding("supervisord", OK, f"reachable at {sock}" + (f" (pid {pid})" if pid else "")
                                    + f"; {len(infos)} of {len(stack.processes)} programs known"))
        except ControlError as exc:
            findings.append(Finding("supervisord", FAIL, str(exc), "check the socket path and permissions (mode 0700: run as its owner)"))
    left = orphans(stack)
    if left:
        findings.append(Finding("orphans", FAIL,
                                f"{len(left)} stack processes without their supervisord: "
                                + ", ".join(f"{p.pid} {' '.join(p.cmdline()[1:4])}" for p in left),
                                f"bin/launch up {stack.environment} stops them first (or kill those pids)"))
    else:
        findings.append(Finding("orphans", OK, "none"))
    return findings


def check_clock(stack: StackFile) -> Finding:
    now = time.time()
    if now < 1_700_000_000:
        return Finding("clock", FAIL, f"wall clock reads {time.ctime(now)}", "enable NTP (timedatectl set-ntp true)")
    run_dir = Path(stack.paths.run_dir)
    future = []
    if run_dir.is_dir():
        for path in run_dir.glob("*.status.json"):
            try:
                if path.stat().st_mtime > now + 300:
                    future.append(path.name)
            except OSError:
                pass
    if future:
        return Finding("clock", WARN, f"files written in the future: {', '.join(future)} (the clock jumped back)",
                       "fix NTP; keel's health checks use the monotonic clock and are not affected")
    first, second = time.monotonic(), time.monotonic()
    if second < first:
        return Finding("clock", FAIL, "the monotonic clock went backwards", "report this kernel bug")
    return Finding("clock", OK, f"wall clock {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, monotonic clock sane")


def run_checks(env: str, config_dir: Path | None) -> list[Finding]:
    from keel.render.contract import ContractError
    from keel.stack.paths import load_rendered_stack

    findings = [check_dependencies()]
    config_finding, loaded = check_config(env, config_dir)
    findings.append(config_finding)
    if loaded is not None:
        findings.append(check_rendered(env, config_dir))
    try:
        stack = load_rendered_stack(env)
    except ContractError as exc:
        findings.append(Finding("stack", FAIL, str(exc), f"bin/render-config {env}"))
        return findings
    checks: list[Callable[[StackFile], Finding | list[Finding]]] = [check_dirs, check_ports, check_gpus, check_supervisord, check_clock]
    for check in checks:
        try:
            result = check(stack)
        except Exception as exc:  # a doctor that crashes helps nobody: report the check itself as failed
            result = Finding(check.__name__.removeprefix("check_"), FAIL, f"the check crashed: {exc!r}", "report this")
        findings.extend(result if isinstance(result, list) else [result])
    return findings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="doctor", description="Check what a keel stack needs and explain how to fix what is wrong.")
    parser.add_argument("env")
    parser.add_argument("--config-dir", type=Path)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    findings = run_checks(args.env, args.config_dir)
    if args.json:
        print(json.dumps([asdict(f) for f in findings], indent=2))
    else:
        marks = _MARK if sys.stdout.isatty() else _PLAIN
        for f in findings:
            print(f"{marks[f.level]} {f.check}: {f.detail}")
            if f.fix and f.level != OK:
                print(f"       fix: {f.fix}")
    failed = [f for f in findings if f.level == FAIL]
    if not args.json:
        print(f"\n{len(failed)} problem(s) found" if failed else "\nall checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
