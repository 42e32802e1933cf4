"""The watchdog's incident recorder: capture on a worker thread, the restart waits for it or its deadline.

``Watchdog._judge_and_act`` asks ``hold(w, verdict, sample, action)`` just before it
restarts or gives up on a process. For a hung, frozen or over-limit verdict the first
call starts a capture thread and answers True ("not yet": the watchdog acts on a later
poll); later polls answer True until the bundle is written or ``capture_timeout`` has
passed, then False, and the restart/give-up event carries the bundle's path
(``event_fields``). The poll loop never waits on a capture, so other processes are
judged on time while one is captured.

The capture itself (``capture``) is plain sequential I/O with one real-time deadline:
stacks of the process and of each child (py-spy, else faulthandler), its status
snapshot, metrics and log tails, a resource sample; then ``write_incident``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import psutil

from keel.render.contract import ContractError, Incidents, StackFile, StackProcess, load_process_file
from keel.status.paths import metrics_path
from keel.watch.incidents import Incident, incident_id, stuck_words, tail_jsonl, tail_lines, write_incident
from keel.watch.stacks import ProcessStacks, capture_faulthandler, capture_py_spy, find_py_spy

__all__ = ["CAPTURED_RULES", "IncidentRecorder", "capture", "settings_from_stack"]

log = logging.getLogger("keel.watch.recorder")

# The verdicts whose restart/give-up is preceded by an incident: the process is there to look at.
CAPTURED_RULES = frozenset({"heartbeat_stale", "progress_stale", "rss_over_limit", "gpu_memory_over_limit"})
_WRITE_RESERVE = 0.15  # of the timeout, kept for writing the bundle after the stacks


def settings_from_stack(stack: StackFile) -> Incidents | None:
    """The ``incidents`` block of the stack's watchdog resolved file; None without a (readable) watchdog file."""
    for proc in stack.processes.values():
        if proc.kind == "watchdog":
            try:
                block = load_process_file(proc.config_file).watchdog
            except ContractError as exc:
                log.warning("incidents disabled: %s", exc, extra={"event": "incidents_disabled"})
                return None
            return block.incidents if block is not None else None
    return None


@dataclass(frozen=True)
class Request:
    """What the poll thread hands the capture thread (copied: the worker shares nothing mutable)."""

    process: str
    config: StackProcess
    pid: int
    verdict: dict[str, Any]
    action: str
    status: list[dict[str, Any]]
    sample: dict[str, Any]


def _status_json(statuses: list[Any]) -> list[dict[str, Any]]:
    return [s.model_dump(mode="json") if hasattr(s, "model_dump") else {"error": f"{type(s).__name__}: {s}"}
            for s in statuses]


def _sample_json(sample: Any, pid: int) -> dict[str, Any]:
    if sample is None:
        return {}
    tree = sample.processes.get(pid)
    return {"tree": asdict(tree) if tree is not None else None,
            "gpus": [asdict(g) for g in sample.gpus], "gpu_error": sample.gpu_error,
            "host": asdict(sample.host)}


def _proc_detail(p: psutil.Process) -> dict[str, Any]:
    """RSS, CPU times, open files and threads of one process; what psutil cannot read is left out."""
    out: dict[str, Any] = {"pid": p.pid}
    with p.oneshot():
        for key, get in (("status", p.status), ("rss_bytes", lambda: p.memory_info().rss),
                         ("cpu_user_s", lambda: p.cpu_times().user), ("cpu_system_s", lambda: p.cpu_times().system),
                         ("num_threads", p.num_threads), ("num_fds", p.num_fds),
                         ("open_files", lambda: len(p.open_files())), ("cmdline", lambda: " ".join(p.cmdline())[:300])):
            try:
                out[key] = get()
            except (psutil.Error, OSError):
                pass
    return out


def capture(req: Request, settings: Incidents, run_dir: Path, *, wall: float,
            clock: Callable[[], float] = time.monotonic) -> Incident:
    """Gather one incident within ``settings.capture_timeout`` (real time). Never raises for a gone process."""
    start = clock()
    stack_deadline = start + settings.capture_timeout * (1 - _WRITE_RESERVE)
    inc = Incident(id=incident_id(wall, req.process), process=req.process, pid=req.pid, wall=wall,
                   verdict=req.verdict, action=req.action, status=req.status, log_file=req.config.log_file)
    exe = find_py_spy(settings.py_spy)
    if exe is None:
        inc.notes.append(f"py-spy not found ({settings.py_spy!r}): stacks from the trainer's faulthandler dump")
    try:
        root = psutil.Process(req.pid)
        family = [root, *root.children(recursive=True)]
    except psutil.Error as exc:
        family = []
        inc.notes.append(f"pid {req.pid} is gone: {exc}")
    details = []
    for p in family:
        detail = _proc_detail(p)
        details.append(detail)
        frozen = detail.get("status") == psutil.STATUS_STOPPED
        ps = ProcessStacks(pid=p.pid, role="process" if p.pid == req.pid else "child",
                           cmdline=detail.get("cmdline", ""), state=str(detail.get("status", "")))
        if exe is not None:
            threads, err = capture_py_spy(exe, p.pid, stack_deadline - clock(), frozen=frozen)
            if err is None:
                ps.method, ps.threads = "py-spy", threads
            else:
                ps.errors.append(err)
        if not ps.threads:
            try:
                created = p.create_time()
            except psutil.Error:
                created = None
            threads, err = capture_faulthandler(run_dir, p.pid, created, stack_deadline - clock(), frozen=frozen)
            if err is None:
                ps.method, ps.threads = "faulthandler", threads
            else:
                ps.errors.append(err)
        inc.stacks.append(ps)
        if clock() >= stack_deadline:
            inc.complete = False
            inc.notes.append(f"capture deadline ({settings.capture_timeout:g}s) reached after {len(inc.stacks)} "
                             f"of {len(family)} processes")
            break
    inc.resources = {**req.sample, "processes": details}
    for name in req.config.status_names:
        inc.metrics.extend(tail_jsonl(metrics_path(run_dir, name), settings.metrics_records))
    inc.log = tail_lines(req.config.log_file, settings.log_lines)
    inc.capture_seconds = clock() - start
    return inc


@dataclass
class _Pending:
    pid: int
    deadline: float
    thread: threading.Thread | None = None
    path: Path | None = None
    error: str | None = None
    summary: str = ""


class IncidentRecorder:
    """Per process at most one capture in flight; ``hold`` is called from the poll thread only."""

    def __init__(self, settings: Incidents | None, run_dir: Path, *, emit: Callable[..., Any],
                 wall: Callable[[], float] = time.time, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.run_dir = run_dir
        self._emit = emit
        self._wall = wall
        self._clock = clock  # real time: the capture's subprocesses run in real time, whatever the poll clock
        self._pending: dict[str, _Pending] = {}
        self._ready: dict[str, dict[str, Any]] = {}

    @classmethod
    def for_watchdog(cls, wd: Any) -> IncidentRecorder:
        """The recorder of a ``Watchdog``: its settings' ``incidents`` block, events through ``wd.emit``."""
        return cls(wd.settings.incidents, wd.settings.run_dir, emit=wd.emit)

    def hold(self, w: Any, v: Any, sample: Any, action: str) -> bool:
        """True: wait (a capture for ``w`` is running and its deadline is ahead). False: act now."""
        s = self.settings
        pid = w.pid
        if s is None or not s.enabled or v.rule not in CAPTURED_RULES or pid is None:
            return False
        p = self._pending.get(w.name)
        if p is not None and p.pid != pid:  # a capture of an earlier incarnation: its bundle stays on disk
            del self._pending[w.name]
            p = None
        if p is None:
            req = Request(w.name, w.config, pid, {"level": v.level.value, "rule": v.rule, "reason": v.reason},
                          action, _status_json(w.statuses), _sample_json(sample, pid))
            p = _Pending(pid, self._clock() + s.capture_timeout)
            p.thread = threading.Thread(target=self._run, args=(req, p), name=f"keel-incident-{w.name}", daemon=True)
            self._pending[w.name] = p
            p.thread.start()
            return True
        if p.thread is not None and p.thread.is_alive() and self._clock() < p.deadline:
            return True
        del self._pending[w.name]
        if p.path is not None:
            self._ready[w.name] = {"incident": str(p.path)}
            self._emit(process=w.name, action="incident", reason=p.summary, verdict=v, pid=pid, incident=str(p.path))
        else:
            why = p.error or f"capture still running after {s.capture_timeout:g}s"
            self._ready[w.name] = {"incident": None, "incident_error": why}
            self._emit(process=w.name, action="incident_failed", reason=why, verdict=v, pid=pid)
        return False

    def settle(self, name: str, rule: str) -> None:
        """After each verdict: a capture pending for ``name`` whose hang is over (the rule is no longer one
        that captures) is dropped, so a later hang gets fresh stacks, not this stale bundle."""
        if rule not in CAPTURED_RULES:
            self._pending.pop(name, None)

    def event_fields(self, name: str) -> dict[str, Any]:
        """``{"incident": path}`` for the restart/give-up event of ``name`` (once), or {} without an incident."""
        return self._ready.pop(name, {})

    def _run(self, req: Request, p: _Pending) -> None:
        assert self.settings is not None
        try:
            inc = capture(req, self.settings, self.run_dir, wall=self._wall())
            p.path = write_incident(self.run_dir, inc, self.settings.keep)
            p.summary = describe(inc)
        except Exception as exc:  # noqa: BLE001 - a failed capture must not stop the restart
            log.exception("incident capture failed for %s", req.process)
            p.error = f"incident capture failed: {type(exc).__name__}: {exc}"


def describe(inc: Incident) -> str:
    """One line for the event: where it was stuck, and how the stacks were got."""
    where = stuck_words(inc.summary()["stuck"])
    methods = sorted({s.method for s in inc.stacks if s.method}) or ["none"]
    return f"incident {inc.id}: {where}; stacks via {'/'.join(methods)} in {inc.capture_seconds:.2f}s"


def capture_on_demand(stack: StackFile, process: str, pid: int, statuses: list[Any], sample: Any) -> Path:
    """``bin/launch incident ENV PROCESS``: one bundle now, synchronously, without a kill; its directory."""
    run_dir = Path(stack.paths.run_dir)
    settings = settings_from_stack(stack)
    if settings is None:
        raise LookupError("no watchdog in this stack (or its resolved file is unreadable): no incident settings")
    req = Request(process, stack.processes[process], pid, {"level": "on_demand", "rule": "on_demand",
                  "reason": "requested by an operator"}, "on_demand", _status_json(statuses), _sample_json(sample, pid))
    inc = capture(req, settings, run_dir, wall=time.time())
    return write_incident(run_dir, inc, settings.keep)
