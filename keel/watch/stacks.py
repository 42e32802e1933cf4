"""Python stacks of a process tree: py-spy first, the trainer's faulthandler dump second.

Pure parsing (``parse_py_spy``, ``parse_faulthandler``, ``order_threads``, ``format_stacks``)
apart from the two capture functions, which run a bounded subprocess or send one
signal and read one file. Nothing here blocks past the deadline it is given.

Why two ways: py-spy reads the interpreter's memory from outside (ptrace), so it works
on a process stuck in C code or SIGSTOPped (a stopped process cannot be
ptrace-suspended, so a frozen one is read with ``--nonblocking``: it is not
running, so the read is consistent anyway). faulthandler needs the
process to run its signal handler: it answers a hung process, never a frozen one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from keel.status.paths import STACKDUMP_HEADER_RE, stackdump_path

__all__ = ["Frame", "ProcessStacks", "Thread", "capture_faulthandler", "capture_py_spy", "find_py_spy",
           "format_stacks", "order_threads", "parse_faulthandler", "parse_py_spy", "stuck_thread"]

_FH_THREAD = re.compile(r"^(Current thread|Thread) (0x[0-9a-f]+) \(most recent call first\):$")
_FH_FRAME = re.compile(r'^\s+File "(.*)", line (\d+) in (.*)$')


@dataclass(frozen=True)
class Frame:
    function: str
    file: str
    line: int

    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Thread:
    """One thread's stack, innermost frame first."""

    pid: int
    thread_id: str
    name: str
    frames: tuple[Frame, ...]
    active: bool | None = None  # py-spy: running (not idle) when sampled; faulthandler: unknown
    owns_gil: bool | None = None


@dataclass
class ProcessStacks:
    """The stacks of one pid, how they were got, or why there are none."""

    pid: int
    role: str  # "process" (the supervised pid) or "child"
    cmdline: str = ""
    state: str = ""  # psutil status: running, sleeping, stopped, ...
    method: str | None = None  # "py-spy" | "faulthandler" | None
    threads: list[Thread] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# -- parsing ------------------------------------------------------------------------------------


def parse_py_spy(text: str) -> list[Thread]:
    """``py-spy dump --json`` output → threads (innermost frame first, as py-spy lists them). ValueError if not it."""
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError("py-spy --json output is not a list of threads")
    threads = []
    for t in data:
        frames = tuple(Frame(str(f.get("name", "?")), str(f.get("filename") or f.get("short_filename") or "?"),
                             int(f.get("line") or 0)) for f in t.get("frames", []))
        threads.append(Thread(pid=int(t["pid"]), thread_id=str(t.get("os_thread_id") or t.get("thread_id")),
                              name=str(t.get("thread_name") or ""), frames=frames,
                              active=t.get("active"), owns_gil=t.get("owns_gil")))
    return threads


def parse_faulthandler(text: str, pid: int) -> list[Thread]:
    """faulthandler's ``dump_traceback(all_threads=True)`` text → threads. Unparsable lines are skipped."""
    threads: list[Thread] = []
    current: tuple[str, str] | None = None
    frames: list[Frame] = []

    def close() -> None:
        if current is not None:
            label, tid = current
            threads.append(Thread(pid=pid, thread_id=tid, name="(signal handler's thread)" if label == "Current thread" else "",
                                  frames=tuple(frames)))

    for line in text.splitlines():
        m = _FH_THREAD.match(line)
        if m:
            close()
            current, frames = (m.group(1), m.group(2)), []
            continue
        f = _FH_FRAME.match(line)
        if f and current is not None:
            frames.append(Frame(f.group(3), f.group(1), int(f.group(2))))
    close()
    return threads


_STDLIB = (os.path.dirname(os.__file__),)
# Threads keel itself runs in every process (heartbeat, reporter): never the stuck one.
_KEEL_THREAD = re.compile(r"^keel[-_]")


def _thread_rank(t: Thread, root: int) -> tuple:
    idle_keel = bool(_KEEL_THREAD.match(t.name))
    # faulthandler names no thread: the main thread is the one running a module's code (<module>).
    main = t.name == "MainThread" or any(f.function == "<module>" for f in t.frames)
    return (t.pid != root, idle_keel, not main, not t.frames)


def order_threads(threads: list[Thread], root: int) -> list[Thread]:
    """The likely stuck thread first: the supervised process's, its MainThread, keel's own threads last."""
    return sorted(threads, key=lambda t: _thread_rank(t, root))


def stuck_thread(stacks: list[ProcessStacks]) -> Thread | None:
    """The thread an operator should read first (``order_threads``' first), or None without stacks."""
    root = next((s.pid for s in stacks if s.role == "process"), 0)
    threads = order_threads([t for s in stacks for t in s.threads], root)
    return threads[0] if threads else None


def user_frame(t: Thread) -> Frame | None:
    """The innermost frame outside the standard library (where the user's code waits), else the innermost."""
    for f in t.frames:
        if not f.file.startswith(_STDLIB):
            return f
    return t.frames[0] if t.frames else None


def format_stacks(stacks: list[ProcessStacks]) -> str:
    """stacks.txt: the stuck thread first, then every process's threads, each frame as ``function (file:line)``."""
    out: list[str] = []
    first = stuck_thread(stacks)
    if first is not None:
        out.append(f"== likely stuck: pid {first.pid} thread {first.name or first.thread_id}")
        out.extend(f"    {f.function} ({f.where()})" for f in first.frames)
        out.append("")
    for s in stacks:
        head = f"== pid {s.pid} ({s.role}, {s.state or '?'}) via {s.method or 'nothing'}: {s.cmdline}"
        out.append(head)
        out.extend(f"   ! {e}" for e in s.errors)
        root = next((x.pid for x in stacks if x.role == "process"), s.pid)
        for t in order_threads(s.threads, root):
            out.append(f"  Thread {t.thread_id} {t.name!r}" + ("" if t.active is None else (" active" if t.active else " idle")))
            out.extend(f"    {f.function} ({f.where()})" for f in t.frames)
        out.append("")
    return "\n".join(out)


# -- capture ------------------------------------------------------------------------------------


def find_py_spy(setting: str) -> str | None:
    """The py-spy executable: a path as given, or a name on PATH or beside this interpreter (a venv's bin)."""
    if os.sep in setting:
        return setting if os.access(setting, os.X_OK) and os.path.isfile(setting) else None
    found = shutil.which(setting)
    if found:
        return found
    beside = Path(sys.executable).parent / setting  # supervisord's PATH rarely has the venv's bin
    return str(beside) if os.access(beside, os.X_OK) else None


def capture_py_spy(exe: str, pid: int, timeout: float, *, frozen: bool) -> tuple[list[Thread], str | None]:
    """``py-spy dump --json`` of one pid within ``timeout`` seconds: (threads, None) or ([], why not)."""
    args = [exe, "dump", "--pid", str(pid), "--json", "--full-filenames"]
    if frozen:  # ptrace cannot suspend a stopped process, and there is nothing to suspend
        args.append("--nonblocking")
    if timeout <= 0:
        return [], "no time left before the capture deadline"
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return [], f"py-spy timed out after {timeout:.2f}s"
    except OSError as exc:
        return [], f"cannot run py-spy: {exc}"
    if done.returncode != 0:
        return [], f"py-spy exited {done.returncode}: {(done.stderr or done.stdout).strip().splitlines()[0:1]}"
    try:
        return parse_py_spy(done.stdout), None
    except (ValueError, KeyError, TypeError) as exc:
        return [], f"unreadable py-spy output: {exc}"


def capture_faulthandler(run_dir: Path, pid: int, create_time: float | None, timeout: float, *, frozen: bool,
                         clock: Callable[[], float] = time.monotonic,
                         sleep: Callable[[float], None] = time.sleep) -> tuple[list[Thread], str | None]:
    """Signal a registered process to dump its stacks (trainer/stackdump.py) and read them within ``timeout``."""
    path = stackdump_path(run_dir, pid)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            header = f.readline().strip()
            f.seek(0, os.SEEK_END)
            offset = f.tell()
    except OSError:
        return [], f"no faulthandler registration ({path} missing: not a keel trainer, or it is still starting)"
    m = STACKDUMP_HEADER_RE.match(header)
    if not m or int(m.group(1)) != pid:
        return [], f"{path}: not a stackdump header: {header[:80]!r}"
    if create_time is not None and create_time > float(m.group(3)) + 1.0:
        return [], f"{path} is from an earlier process with pid {pid}; not signalled"
    if frozen:
        return [], "frozen (SIGSTOPped): a stopped process cannot run the faulthandler signal handler; not signalled"
    try:
        os.kill(pid, int(m.group(2)))
    except OSError as exc:
        return [], f"cannot signal {pid}: {exc}"
    deadline = clock() + timeout
    last_size, text = offset, ""
    while clock() < deadline:
        sleep(0.05)
        try:
            size = path.stat().st_size
        except OSError:
            break
        if size > offset and size == last_size:  # grew, then stopped growing: the dump is complete
            with open(path, encoding="utf-8", errors="replace") as f:
                f.seek(offset)
                text = f.read()
            break
        last_size = size
    if not text:
        return [], f"no faulthandler output within {timeout:.2f}s (signal {m.group(2)} sent)"
    return parse_faulthandler(text, pid), None

