"""A stack's processes as the OS sees them, wherever they are: found by the KEEL_CONFIG their
backend put in their environment (children such as DataLoader workers and torchrun ranks inherit
it), so that orphans of a SIGKILLed supervisord are found too."""

from __future__ import annotations

import os
import time
from pathlib import Path
import psutil

from keel.render.contract import StackFile


def stack_processes(stack: StackFile) -> list[psutil.Process]:
    """Every live process started for this stack (zombies count as gone; never this process)."""
    build_dir = stack.paths.build_dir.rstrip("/") + "/"
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


def supervisord_pid(stack: StackFile) -> int | None:
    """The pid in our pidfile, if that process is a live supervisord (not a reused pid)."""
    try:
        pid = int(Path(stack.control.pidfile).read_text().strip())
        proc = psutil.Process(pid)
        if proc.status() != psutil.STATUS_ZOMBIE and "supervisord" in " ".join(proc.cmdline()):
            return pid
    except (OSError, ValueError, psutil.Error):
        pass
    return None


def orphans(stack: StackFile) -> list[psutil.Process]:
    """Stack processes with no live supervisord above them (left by a SIGKILLed standalone supervisord)."""
    if stack.control.backend != "supervisord" or stack.control.mode != "standalone":
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


def wait_process_gone(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` has exited; False when it is still there after ``timeout`` seconds."""
    try:
        psutil.Process(pid).wait(timeout=timeout)
    except psutil.TimeoutExpired:
        return False
    except psutil.NoSuchProcess:
        pass
    return True


def wait_stack_gone(stack: StackFile, timeout: float) -> list[psutil.Process]:
    """Wait until no process of the stack is left; what is still there after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    left = stack_processes(stack)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = stack_processes(stack)
    return left
