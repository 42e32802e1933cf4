"""Benchmark: how fast the watchdog detects and recovers frozen, hung and crashed workers, and what it costs.

Run:  .venv/bin/python bench/watchdog_bench.py [--reps 5] [--out bench/results/watchdog.json]
Writes bench/results/watchdog.json and prints a table.

Two stacks rendered by bin/render-config in the same run, each under its own supervisord:

- "watchdog": stand-in workers (tests/integration/standin_worker.py) plus keel's watchdog;
- "supervisord alone": the same workers, no watchdog (the baseline: supervisord restarts
  a process that exits, never one that is frozen or hung: reported as "never").

Faults, one worker per repetition: SIGSTOP (frozen: heartbeat stops), SIGUSR1 (the
worker's loop hangs, its heartbeat thread keeps beating), SIGKILL (a crash).
detect = the watchdog's first unhealthy event for that worker, from the fault;
restarted = supervisord shows a new pid for it; reporting = the new pid's status says running.

Then the watchdog's CPU watching 16 workers, at the dev poll interval (2 s).

Incidents (``--incidents-only`` runs just these): a worker's loop is hung (SIGUSR1) among 3
healthy ones; hang -> incident = from the fault to the bundle's rename; capture = its
``capture_seconds``; poll gap = the largest gap between the watchdog's published polls
while the capture ran (with py-spy made 2 s slow on purpose, so the capture spans polls),
against the poll interval: the loop must not wait for a capture.

Targets (ratios and bounds within this run):
    hang: restarted     <= progress_timeout + poll_interval + 2 s   (a new process spawned)
    SIGSTOP: restarted  <= heartbeat_timeout + poll_interval + 2 s
("reporting" adds the new process's own start-up, Python imports included, to "restarted".)
    watchdog CPU      <= 1 % of one core, 16 processes watched
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402

from keel.status.models import ProcessStatus, State  # noqa: E402
from keel.host.dirs import prepare_process_dirs  # noqa: E402
from keel.status.reader import StatusReader  # noqa: E402

PY = sys.executable
WORKER = f"{PY} {REPO}/tests/integration/standin_worker.py --mode ok"
# Grace 5 s: a restarted worker on a loaded 2-core box may need seconds to import and report.
HB_TIMEOUT, PROGRESS_TIMEOUT, GRACE, POLL = 2.0, 3.0, 5.0, 0.5
NEVER_AFTER = 3 * (PROGRESS_TIMEOUT + POLL)  # the baseline's wait before reporting "never"


def worker(step: float = 0.2, hb: float = 0.5) -> dict:
    return {
        "kind": "command",
        "command": f"{WORKER} --step {step} --heartbeat-interval {hb}",
        "health": {"heartbeat_interval": f"{hb}s", "heartbeat_timeout": f"{HB_TIMEOUT}s",
                   "progress_timeout": f"{PROGRESS_TIMEOUT}s", "startup_grace": f"{GRACE}s"},
        "restart": {"policy": "always", "backoff_initial": "0.1s", "backoff_max": "0.5s", "max_restarts": 100,
                    "window": "10m"},
        "stop": {"timeout": "2s"},
        "startsecs": "1s",
    }


class Stack:
    """A rendered stack in a short /tmp dir under its own supervisord."""

    def __init__(self, processes: dict, poll: float | None, watchdog: dict | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="kb", dir="/tmp"))
        self.run_dir = self.dir / "run"
        (self.dir / "cfg").mkdir()
        procs = dict(processes)
        if poll is not None:
            procs["watchdog"] = {"kind": "watchdog", "poll_interval": f"{poll}s", "stable_after": "10m",
                                 "stop": {"timeout": "5s"}, **(watchdog or {})}
        base = {"project": "kb", "paths": {"root": str(self.dir), "run_dir": str(self.run_dir),
                                           "log_dir": str(self.dir / "log"), "checkpoint_dir": str(self.dir / "ck")},
                "processes": procs}
        (self.dir / "cfg" / "base.yaml").write_text(json.dumps(base))
        (self.dir / "cfg" / "bench.yaml").write_text("{}\n")
        subprocess.run([str(REPO / "bin" / "render-config"), "bench", "--config-dir", str(self.dir / "cfg"),
                        "--out", str(self.dir / "build"), "-q"], check=True, timeout=60)
        self.keel = json.loads((self.dir / "build" / "keel.json").read_text())
        for p in self.keel["processes"].values():
            prepare_process_dirs(json.loads(Path(p["config_file"]).read_text()))
        self.proc = subprocess.Popen([str(Path(PY).parent / "supervisord"), "-n", "-c",
                                      str(self.dir / "build" / "supervisord.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.reader = StatusReader(self.run_dir)
        try:
            if not wait(lambda: self._up(), 20):
                raise RuntimeError(f"supervisord did not start; see {self.dir}/log/supervisord.log")
        except BaseException:
            self.close()
            raise

    @property
    def rpc(self) -> xmlrpc.client.ServerProxy:
        # A fresh connection per call: supervisor's transport stays broken after a failed request.
        from supervisor.xmlrpc import SupervisorTransport

        return xmlrpc.client.ServerProxy(
            "http://127.0.0.1", transport=SupervisorTransport(None, None, f"unix://{self.keel['control']['socket']}"))

    def _up(self) -> bool:
        try:
            return self.rpc.supervisor.getState()["statename"] == "RUNNING"
        except (OSError, xmlrpc.client.Error, http.client.HTTPException):
            return False

    def backend_pid(self, name: str) -> int | None:
        i = self.rpc.supervisor.getProcessInfo(self.keel["processes"][name]["program"])
        return i["pid"] if i["statename"] == "RUNNING" else None

    def reporting(self, name: str) -> ProcessStatus | None:
        """The status, if it is from the process supervisord runs now and says running."""
        st = self.reader.read(name)
        if isinstance(st, ProcessStatus) and st.state is State.RUNNING and st.pid == self.backend_pid(name):
            return st
        return None

    def events(self) -> list[dict]:
        path = self.run_dir / "watchdog.events.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def wait(pred, timeout: float, interval: float = 0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    return None


FAULTS = {"sigstop": signal.SIGSTOP, "hang": signal.SIGUSR1, "crash": signal.SIGKILL}


def inject(stack: Stack, name: str, fault: str, cap: float) -> dict:
    """Inject the fault into `name` (running past its startup grace), time detection and recovery."""
    st = wait(lambda: (x := stack.reporting(name)) and time.monotonic() - x.heartbeat_mono < 1.0 and x, 30)
    assert st is not None, f"{name} never reported"
    pid = st.pid
    t0 = time.monotonic()
    os.kill(pid, FAULTS[fault])
    restarted: list[float] = []

    def back() -> ProcessStatus | None:
        if not restarted:
            i = stack.rpc.supervisor.getProcessInfo(stack.keel["processes"][name]["program"])
            if i["pid"] and i["pid"] != pid:
                restarted.append(time.monotonic() - t0)
        s = stack.reporting(name)
        return s if s is not None and s.pid != pid else None

    new = wait(back, cap, interval=0.02)
    recover = time.monotonic() - t0 if new else None
    detect = None
    for e in stack.events():
        if e.get("process") == name and e.get("verdict") == "unhealthy" and e.get("mono", 0) >= t0:
            detect = e["mono"] - t0
            break
    if new is None:  # leave no frozen worker behind for the next fault
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    return {"detect_s": detect, "restart_s": restarted[0] if restarted else None, "recover_s": recover}


def median(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if len(vals) == len(xs) and vals else None


def run_latency(with_watchdog: bool, reps: int) -> dict:
    names = {f: [f"{f[0]}{i}" for i in range(reps)] for f in FAULTS}
    stack = Stack({n: worker() for ns in names.values() for n in ns}, POLL if with_watchdog else None)
    out: dict[str, dict] = {}
    try:
        all_names = [n for ns in names.values() for n in ns]
        wait(lambda: all(stack.reporting(n) for n in all_names), 60, interval=0.5)
        time.sleep(GRACE + POLL)  # every worker past its startup grace
        results: dict[str, list[dict]] = {}
        if not with_watchdog:  # nothing will restart frozen or hung workers: fault them all at once, wait once
            import concurrent.futures as cf

            jobs = [(f, n) for f in ("sigstop", "hang") for n in names[f]]
            with cf.ThreadPoolExecutor(len(jobs)) as ex:
                done = list(ex.map(lambda job: inject(stack, job[1], job[0], NEVER_AFTER), jobs))
            for (f, _), r in zip(jobs, done):
                results.setdefault(f, []).append(r)
        for fault, ns in names.items():
            runs = results.get(fault) or [inject(stack, n, fault, 30.0) for n in ns]
            out[fault] = {
                "detect_median_s": median([r["detect_s"] for r in runs]),
                "restart_median_s": median([r["restart_s"] for r in runs]),
                "recover_median_s": median([r["recover_s"] for r in runs]),
                "runs": runs,
            }
    finally:
        stack.close()
    return out


def run_cpu(n: int = 16, window: float = 12.0, poll: float = 2.0) -> dict:
    stack = Stack({f"c{i}": worker(step=1.0, hb=1.0) for i in range(n)}, poll)
    try:
        wait(lambda: all(stack.reporting(f"c{i}") for i in range(n)), 60, interval=0.5)
        wd = psutil.Process(stack.backend_pid("watchdog"))
        time.sleep(2 * poll)
        c0, t0 = wd.cpu_times(), time.monotonic()
        time.sleep(window)
        c1, t1 = wd.cpu_times(), time.monotonic()
        used = (c1.user + c1.system) - (c0.user + c0.system)
        unhealthy = [e for e in stack.events() if e.get("verdict") == "unhealthy"]
        return {"processes": n, "poll_interval_s": poll, "window_s": round(t1 - t0, 2),
                "cpu_percent_of_one_core": 100.0 * used / (t1 - t0), "cpu_ms_per_poll": 1000.0 * used / ((t1 - t0) / poll),
                "unhealthy_events": len(unhealthy)}
    finally:
        stack.close()


def run_incidents(reps: int, py_spy_delay: float) -> dict:
    """Hang one worker of four ``reps`` times; time to the incident, capture time, poll gaps during it."""
    import threading

    from keel.watch.incidents import newest_incident

    tmp = Path(tempfile.mkdtemp(prefix="kbi", dir="/tmp"))
    py_spy = str(Path(PY).parent / "py-spy")
    if py_spy_delay:
        wrapper = tmp / "slow-py-spy"
        wrapper.write_text(f"#!/bin/sh\nsleep {py_spy_delay}\nexec {py_spy} \"$@\"\n")
        wrapper.chmod(0o755)
        py_spy = str(wrapper)
    stack = Stack({f"w{i}": worker() for i in range(4)}, POLL, {"incidents": {"py_spy": py_spy, "capture_timeout": "8s"}})
    polls: list[float] = []
    stop = threading.Event()

    def record() -> None:
        seen = None
        while not stop.is_set():
            st = stack.reader.read("watchdog")
            lp = st.payload.last_poll.timestamp() if st and st.payload is not None and st.payload.last_poll else None
            if lp is not None and lp != seen:
                polls.append(lp)
                seen = lp
            stop.wait(0.02)

    th = threading.Thread(target=record, daemon=True)
    th.start()
    to_incident, capture, gaps = [], [], []
    try:
        for _ in range(reps):
            st = wait(lambda: stack.reporting("w0"), 30)
            if not st:
                continue
            before = (newest_incident(stack.run_dir) or {}).get("id")
            t0 = time.time()
            os.kill(st.pid, signal.SIGUSR1)
            new = wait(lambda: [i for i in [newest_incident(stack.run_dir)] if i and i["id"] != before], 30)
            if not new:
                continue
            inc = new[0]
            to_incident.append(Path(inc["path"]).stat().st_mtime - t0)
            capture.append(inc["capture_seconds"])
            from datetime import datetime

            start = datetime.fromisoformat(inc["time"].replace("Z", "+00:00")).timestamp()
            end = start + inc["capture_seconds"]
            window = [p for p in polls if start - 2 * POLL <= p <= end + 2 * POLL]
            inside = [b - a for a, b in zip(window, window[1:]) if b >= start and a <= end]
            gaps.append(max(inside) if inside else None)
            wait(lambda: (now := stack.reporting("w0")) is not None and now.pid != st.pid, 30)
    finally:
        stop.set()
        th.join(5)
        stack.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"py_spy_delay_s": py_spy_delay, "reps": len(capture),
            "hang_to_incident_median_s": median(to_incident), "capture_median_s": median(capture),
            "max_poll_gap_during_capture_s": max([g for g in gaps if g is not None], default=None),
            "poll_interval_s": POLL, "progress_timeout_s": PROGRESS_TIMEOUT}


def print_incidents(rows: list[dict]) -> None:
    print(f"incidents (median of {rows[0]['reps']}; progress_timeout {PROGRESS_TIMEOUT:g}s, poll {POLL:g}s):")
    for r in rows:
        print(f"  py-spy delay {r['py_spy_delay_s']:g}s: hang -> incident {fmt(r['hang_to_incident_median_s'])}s, "
              f"capture {fmt(r['capture_median_s'])}s, max poll gap during capture "
              f"{fmt(r['max_poll_gap_during_capture_s'])}s")


def fmt(x: float | None) -> str:
    return "never" if x is None else f"{x:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "watchdog.json"))
    ap.add_argument("--incidents-only", action="store_true", help="only the incident figures")
    args = ap.parse_args(argv)
    if args.incidents_only:
        rows = [run_incidents(args.reps, 0.0), run_incidents(args.reps, 2.0)]
        print_incidents(rows)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).with_name("watchdog_incidents.json").write_text(json.dumps(rows, indent=2) + "\n")
        return 0

    settings = {"heartbeat_timeout_s": HB_TIMEOUT, "progress_timeout_s": PROGRESS_TIMEOUT, "startup_grace_s": GRACE,
                "poll_interval_s": POLL, "heartbeat_interval_s": 0.5, "never_after_s": NEVER_AFTER, "reps": args.reps}
    phases: dict[str, float] = {}
    t = time.monotonic()
    watched = run_latency(True, args.reps)
    phases["watchdog latency"], t = time.monotonic() - t, time.monotonic()
    alone = run_latency(False, args.reps)
    phases["supervisord-alone latency"], t = time.monotonic() - t, time.monotonic()
    cpu = run_cpu()
    phases["cpu"] = time.monotonic() - t

    targets = {
        "hang: restarted (s)": (watched["hang"]["restart_median_s"], PROGRESS_TIMEOUT + POLL + 2.0),
        "SIGSTOP: restarted (s)": (watched["sigstop"]["restart_median_s"], HB_TIMEOUT + POLL + 2.0),
        "watchdog CPU, % of one core": (cpu["cpu_percent_of_one_core"], 1.0),
    }
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"settings: heartbeat_timeout {HB_TIMEOUT:g}s, progress_timeout {PROGRESS_TIMEOUT:g}s, "
          f"poll_interval {POLL:g}s, startup_grace {GRACE:g}s; median of {args.reps}")
    print("detect: first unhealthy event; restarted: a new pid spawned; reporting: the new pid's status says running")
    print(f"{'fault':8} | {'watchdog: detect':>16} {'restarted':>10} {'reporting':>10} | "
          f"{'supervisord alone: restarted':>28} {'reporting':>10}")
    for fault in FAULTS:
        d = watched[fault]["detect_median_s"]
        print(f"{fault:8} | {('n/a (exit)' if fault == 'crash' and d is None else fmt(d)):>16} "
              f"{fmt(watched[fault]['restart_median_s']):>10} {fmt(watched[fault]['recover_median_s']):>10} | "
              f"{fmt(alone[fault]['restart_median_s']):>28} {fmt(alone[fault]['recover_median_s']):>10}")
    print(f"\nwatchdog CPU watching {cpu['processes']} processes at poll {cpu['poll_interval_s']:g}s: "
          f"{cpu['cpu_percent_of_one_core']:.2f}% of one core ({cpu['cpu_ms_per_poll']:.1f} ms CPU per poll)")
    print("phases (s): " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items()))
    print()
    ok_all = True
    for k, (v, target) in targets.items():
        ok = v is not None and v <= target
        ok_all &= ok
        print(f"{k:32} {fmt(v):>8}  target <= {target:<5g} {'OK' if ok else 'MISSED'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": settings, "watchdog": watched, "supervisord_alone": alone, "cpu": cpu, "phases_s": phases, "loadavg_end": os.getloadavg()[0],
                               "targets": {k: {"value": v, "target": t, "ok": v is not None and v <= t}
                                           for k, (v, t) in targets.items()}}, indent=2) + "\n")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
