#!/usr/bin/env python3
"""The isolation benchmark: what running the dashboard in its own process buys the trainer.

Three set-ups, each a private environment in a tmp dir (own paths.root, ports):

  (a) alone  the trainer alone: `taskset -c 0 python -m trainer`
  (b) keel   the full stack via `bin/launch up`: supervisord, trainer (its command is
             `taskset -c 0 python -m trainer`), dashboard, watchdog, and 2 headless
             Chromium sessions on the dashboard; everything but the trainer on CPU 1
  (c) oldway the same Bokeh page served from a thread inside the training process
             (bench/isolation_oldway.py) pinned to CPU 0; 2 Chromium sessions on CPU 1

The trainer is the built-in model, 1 torch thread, 2 DataLoader workers (the dev
settings); its workers inherit CPU 0. This script, Playwright and Chromium run on CPU 1.

1. Throughput, paired: all three set-ups are started once; then rounds A B C A B C ...
   Only the set-up being measured runs: the others are frozen with SIGSTOP (whole
   process trees; keel's watchdog first), so each window has CPU 0 to one trainer.
   After SIGCONT a warm-up is discarded, then steps/s is measured from the trainer's
   own status file (step and progress_wall of its writes). Reported: median steps/s
   per set-up and the median over rounds of (b)/(a) and (c)/(a).
2. Latency, from the same (b) and (c) windows: for each status write (step N at
   progress_wall), the moment the page in Chromium first shows "step N"
   (an in-page recorder polls the rendered text every 20 ms; same host clock).
3. Faults, one at a time, in (b) then (c) (the other set-ups stopped): the dashboard's
   callback raises, blocks (busy loop), leaks memory until a limit kills it, or the
   dashboard is SIGKILLed. Steps lost = baseline rate (the seconds before) x window
   - steps done in the window. Memory limit: keel's watchdog with the dashboard's
   limits.memory = 1GiB in (b); in (c), where no separate process exists, the bench
   plays the limit (cgroup/OOM killer): SIGKILL when the process's RSS is 1 GiB over
   its RSS at the trigger for 3 polls 1 s apart, the watchdog's rule.

    .venv/bin/python bench/isolation_bench.py            # ~8.5 minutes here: 5 rounds, 30 s block
    .venv/bin/python bench/isolation_bench.py --quick    # ~6.5 minutes here: 3 rounds, 10 s block

Writes bench/results/isolation.json and prints markdown tables (README "Why separate processes").
Every process it starts is gone when it returns, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import psutil

from keel.stack.processes import kill_processes

REPO = Path(__file__).resolve().parent.parent
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
ENV = "iso"
TRAINER_CPU, OTHER_CPU = 0, 1
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
GiB = 1 << 30
LEAK_LIMIT = GiB  # (b): the dashboard's limits.memory; (c): 1 GiB over the RSS at the trigger
TARGET_B_OVER_A = 0.97

# Runs in every page before Bokeh loads: records [Date.now(), step] whenever the
# rendered "step N" of the training line changes. Bokeh 3 renders each model in a
# shadow root, so the search walks them.
RECORDER_JS = r"""
(() => {
  window.__keelSteps = [];
  let el = null, last = null;
  function find(root) {
    const hit = root.querySelector('.keel-training');
    if (hit) return hit;
    for (const n of root.querySelectorAll('*')) {
      if (n.shadowRoot) { const h = find(n.shadowRoot); if (h) return h; }
    }
    return null;
  }
  setInterval(() => {
    if (!el || !el.isConnected) el = find(document);
    if (!el) return;
    const text = (el.shadowRoot ? el.shadowRoot.textContent : el.textContent) || '';
    const m = /step (\d+)/.exec(text);
    if (m && m[1] !== last) { last = m[1]; window.__keelSteps.push([Date.now(), parseInt(m[1], 10)]); }
  }, 20);
})();
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    return s[min(len(s) - 1, max(0, int(round(q * len(s))) - 1))]


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# --------------------------------------------------------------------------- environments


def write_env(root: Path, port: int, *, keel_commands: bool) -> Path:
    """configs/base.yaml (the repo's) + configs/iso.yaml: the dev settings, own root and port.

    Health timeouts are 10 minutes because a set-up sits frozen (SIGSTOP) while the others are
    measured or while pages load; keel's watchdog must not count that as a hang (a restart
    would end the run). The memory rule (limits.memory) is what acts in the leak fault."""
    cfg = root / "configs"
    cfg.mkdir(parents=True)
    shutil.copy(REPO / "configs" / "base.yaml", cfg / "base.yaml")
    health = "      heartbeat_timeout: 10m\n      progress_timeout: 10m\n      startup_grace: 10m\n"
    trainer_cmd = f'    command: [taskset, -c, "{TRAINER_CPU}", {PY}, -m, trainer]\n' if keel_commands else ""
    dash_cmd = f"    command: [{PY}, -m, bench.isolation_faults]\n" if keel_commands else ""
    (cfg / f"{ENV}.yaml").write_text(
        f"# isolation bench: configs/dev.yaml's settings in a private root\n"
        f"paths:\n  root: {root}\n"
        f"processes:\n"
        f"  trainer:\n{trainer_cmd}"
        f"    gpus: []\n    num_workers: 2\n    checkpoint:\n      every_seconds: 10s\n"
        f"    health:\n{health}"
        f"    restart:\n      backoff_initial: 1s\n      backoff_max: 10s\n      max_restarts: 10\n      window: 10m\n"
        f"    stop:\n      timeout: 30s\n"
        f"  dashboard:\n{dash_cmd}"
        f"    port: {port}\n    limits:\n      memory: 1GiB\n"
        f"    health:\n{health}"
        f"    restart:\n      backoff_initial: 1s\n      backoff_max: 10s\n      max_restarts: 20\n      window: 10m\n"
        f"  watchdog:\n    poll_interval: 1s\n"
        f"    health:\n{health}"
    )
    return cfg


def keel_env(root: Path) -> dict[str, str]:
    return {**os.environ, "KEEL_BUILD_ROOT": str(root / "build")}


def render(root: Path) -> None:
    done = subprocess.run([str(REPO / "bin" / "render-config"), ENV, "--config-dir", str(root / "configs")],
                          capture_output=True, text=True, env=keel_env(root), timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"render-config failed: {done.stdout}{done.stderr}")


def process_env(root: Path, name: str) -> dict[str, str]:
    """What supervisord gives the trainer (keel/render/resolve.py), for the set-ups that run without it."""
    tmp = root / "var" / "run" / "tmp" / name
    tmp.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
    env.update(KEEL_PROCESS=name, KEEL_CONFIG=str(root / "build" / ENV / f"{name}.json"), PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO), TMPDIR=str(tmp), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return env


class StatusPoller(threading.Thread):
    """Every 50 ms, each set-up's trainer.status.json: step -> progress_wall, and the series."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="status-poller")
        self.paths: dict[str, Path] = {}
        self.series: dict[str, list[tuple[float, int]]] = {}
        self.pids: dict[str, int] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def watch(self, key: str, path: Path) -> None:
        with self.lock:
            self.paths[key] = path
            self.series.setdefault(key, [])

    def run(self) -> None:
        seen: dict[str, tuple[int, int]] = {}
        while not self.stop.wait(0.05):
            with self.lock:
                items = list(self.paths.items())
            for key, path in items:
                try:
                    st = os.stat(path)
                    stamp = (st.st_ino, st.st_mtime_ns)
                    if seen.get(key) == stamp:
                        continue
                    seen[key] = stamp
                    doc = json.loads(path.read_bytes())
                except (OSError, ValueError):
                    continue
                step = (doc.get("payload") or {}).get("step")
                pw = doc.get("progress_wall")
                if step is None or pw is None or doc.get("state") not in ("running", "stopping"):
                    continue
                t = datetime.fromisoformat(pw.replace("Z", "+00:00")).timestamp()
                with self.lock:
                    self.pids[key] = doc.get("pid")
                    s = self.series[key]
                    if not s or s[-1][1] != step:
                        s.append((t, int(step)))

    def get(self, key: str) -> list[tuple[float, int]]:
        with self.lock:
            return list(self.series.get(key, []))

    def rate(self, key: str, t0: float, t1: float) -> float | None:
        pts = [p for p in self.get(key) if t0 <= p[0] <= t1]
        if len(pts) < 2 or pts[-1][0] <= pts[0][0]:
            return None
        return (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])

    def step_at(self, key: str, t: float) -> float | None:
        """Piecewise-linear step at wall time t; after the last write, the last step (no extrapolation)."""
        pts = self.get(key)
        if not pts or t < pts[0][0]:
            return None
        for (ta, sa), (tb, sb) in zip(pts, pts[1:]):
            if ta <= t <= tb:
                return sa + (sb - sa) * (t - ta) / (tb - ta) if tb > ta else sb
        return float(pts[-1][1])

    def step_walls(self, key: str) -> dict[int, float]:
        return {s: t for t, s in self.get(key)}


class Setup:
    """One set-up: its root, how to start it, its process tree (to freeze, thaw and kill)."""

    def __init__(self, key: str, label: str, base: Path) -> None:
        self.key, self.label = key, label
        self.root = base / key
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.pages: list[Any] = []
        self.frozen = False
        self.logf: Any = None

    @property
    def run_dir(self) -> Path:
        return self.root / "var" / "run"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def prepare(self) -> None:
        write_env(self.root, self.port, keel_commands=self.key == "b")
        render(self.root)

    def start(self) -> None:
        raise NotImplementedError

    def tree(self) -> list[psutil.Process]:
        raise NotImplementedError

    def status_pid(self, name: str) -> int | None:
        """The pid in ``<name>.status.json`` when that process is alive (not a zombie), else None."""
        try:
            pid = json.loads((self.run_dir / f"{name}.status.json").read_bytes())["pid"]
            return pid if alive(psutil.Process(pid)) else None
        except (OSError, ValueError, KeyError, psutil.Error):
            return None

    def trainer_pid(self) -> int | None:
        return self.status_pid("trainer")

    def freeze(self) -> None:
        for p in self._order(self.tree()):
            try:
                p.send_signal(signal.SIGSTOP)
            except psutil.Error:
                pass
        self.frozen = True

    def thaw(self) -> None:
        for p in reversed(self._order(self.tree())):
            try:
                p.send_signal(signal.SIGCONT)
            except psutil.Error:
                pass
        self.frozen = False

    @staticmethod
    def _order(procs: list[psutil.Process]) -> list[psutil.Process]:
        """Freeze order: keel's watchdog first, supervisord next, then the rest (thaw: reversed)."""
        def rank(p: psutil.Process) -> int:
            try:
                cmd = " ".join(p.cmdline())
            except psutil.Error:
                return 3
            return 0 if "watchdog" in cmd else 1 if "supervisord" in cmd else 2
        return sorted(procs, key=rank)

    def kill_tree(self) -> None:
        procs = self.tree()
        for p in procs:
            try:
                p.send_signal(signal.SIGCONT)
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=10)

    def stop(self) -> None:
        """Graceful stop (SIGTERM, as supervisord would), then SIGKILL for what is left."""
        if self.frozen:
            self.thaw()
        procs = self.tree()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                pass
        self.kill_tree()
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        if self.logf:
            self.logf.close()
            self.logf = None


class Alone(Setup):
    def start(self) -> None:
        self.logf = open(self.root / "trainer.out", "ab")
        self.proc = subprocess.Popen(
            ["taskset", "-c", str(TRAINER_CPU), PY, "-m", "trainer", "--config", str(self.root / "build" / ENV / "trainer.json")],
            cwd=REPO, env=process_env(self.root, "trainer"), stdout=self.logf, stderr=subprocess.STDOUT)

    def tree(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        try:
            p = psutil.Process(self.proc.pid)
            return [p, *p.children(recursive=True)]
        except psutil.Error:
            return []


class OldWay(Alone):
    def start(self) -> None:
        self.logf = open(self.root / "oldway.out", "ab")
        b = self.root / "build" / ENV
        self.proc = subprocess.Popen(
            ["taskset", "-c", str(TRAINER_CPU), PY, "-m", "bench.isolation_oldway", "--trainer-config",
             str(b / "trainer.json"), "--dashboard-config", str(b / "dashboard.json"), "--faults"],
            cwd=REPO, env=process_env(self.root, "trainer"), stdout=self.logf, stderr=subprocess.STDOUT)

    def dashboard_pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None


class Keel(Setup):
    def launch(self, *args: str, timeout: float = 150) -> subprocess.CompletedProcess:
        return subprocess.run([str(REPO / "bin" / "launch"), *args], capture_output=True, text=True,
                              env=keel_env(self.root), timeout=timeout)

    def start(self) -> None:
        """`bin/launch up iso --foreground`: supervisord -n stays in this process's session, like the
        trainers of (a) and (c) (a daemonized one would be in a session, hence a scheduler autogroup,
        of its own; on a shared host that alone changed the trainer's CPU share several-fold)."""
        self.logf = open(self.root / "launch-up.out", "ab")
        self.proc = subprocess.Popen(
            [str(REPO / "bin" / "launch"), "up", ENV, "--config-dir", str(self.root / "configs"), "--foreground",
             "--timeout", "120"], env=keel_env(self.root), stdout=self.logf, stderr=subprocess.STDOUT)

    def supervisord(self) -> psutil.Process | None:
        try:
            p = psutil.Process(int((self.run_dir / "supervisord.pid").read_text()))
            return p if "supervisord" in " ".join(p.cmdline()) else None
        except (OSError, ValueError, psutil.Error):
            return None

    def tree(self) -> list[psutil.Process]:
        out: dict[int, psutil.Process] = {}
        if self.proc is not None:
            try:
                lp = psutil.Process(self.proc.pid)
                out[lp.pid] = lp
                for c in lp.children(recursive=True):
                    out[c.pid] = c
            except psutil.Error:
                pass
        sup = self.supervisord()
        if sup is not None:
            out[sup.pid] = sup
            for c in sup.children(recursive=True):
                out[c.pid] = c
        prefix = str(self.root / "build" / ENV) + "/"
        for p in psutil.process_iter(["pid"]):  # orphans of this stack, found by the KEEL_CONFIG keel gave them
            try:
                if p.pid not in out and p.environ().get("KEEL_CONFIG", "").startswith(prefix):
                    out[p.pid] = p
            except psutil.Error:
                pass
        return list(out.values())

    def dashboard_pid(self) -> int | None:
        return self.status_pid("dashboard")

    def stop(self) -> None:
        """SIGTERM to `bin/launch up --foreground` (it stops supervisord, which stops the stack), then SIGKILL what is left."""
        if self.frozen:
            self.thaw()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        self.kill_tree()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if self.logf:
            self.logf.close()
            self.logf = None


# --------------------------------------------------------------------------- browsers


def renice_children() -> None:
    """Chromium runs some renderers at nice 5 (background pages); on a busy host that alone made a
    page lag the server by a minute. Every page here is watched, so all run at this process's nice."""
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    for p in psutil.Process().children(recursive=True):
        try:
            if p.nice() > mine:
                p.nice(mine)
        except (psutil.Error, OSError):
            pass


class Browser:
    def __init__(self, profile: Path) -> None:
        from playwright.sync_api import sync_playwright

        self.pw = sync_playwright().start()
        self.ctx = self.pw.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 720})
        self.ctx.add_init_script(RECORDER_JS)
        self.offsets: dict[int, int] = {}  # id(page) -> records already taken
        self.records: dict[str, list[tuple[float, int, int]]] = {}  # set-up -> (seconds, step, page number)

    def open(self, setup: Setup, n: int = 2) -> None:
        """n sessions on the set-up's page. No waiting on the page's own scripts here: on a loaded
        machine a page evaluation can take tens of seconds, so the recorder is read once per phase."""
        for _ in range(n):
            page = self.ctx.new_page()
            page.goto(setup.url, wait_until="load", timeout=180_000)
            setup.pages.append(page)
        renice_children()
        time.sleep(5.0)  # the sessions' websockets and first documents

    def collect(self, setup: Setup) -> None:
        """Move the pages' new [ms, step] records into self.records[setup.key] (seconds)."""
        out = self.records.setdefault(setup.key, [])
        for i, page in enumerate(setup.pages):
            try:
                recs = page.evaluate("window.__keelSteps || []")
            except Exception:  # noqa: BLE001 - a closed page
                continue
            k = id(page)
            for ms, step in recs[self.offsets.get(k, 0):]:
                out.append((ms / 1000.0, step, i))
            self.offsets[k] = len(recs)

    def reload(self, setup: Setup) -> None:
        for page in setup.pages:
            self.offsets[id(page)] = 0
            page.reload(wait_until="load", timeout=180_000)
        renice_children()
        time.sleep(5.0)

    def page_shows_progress(self, setup: Setup, since: float) -> bool:
        self.collect(setup)
        return any(t >= since for t, _, _ in self.records.get(setup.key, []))

    def close(self) -> None:
        try:
            self.ctx.close()
        finally:
            self.pw.stop()


# --------------------------------------------------------------------------- the bench


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def affinity_report(setups: list[Setup]) -> dict[str, list]:
    """Which CPUs each process (all its threads) may use, to show the pinning held."""
    out: dict[str, list] = {}
    for s in setups:
        rows = []
        for p in s.tree():
            try:
                cpus = sorted({c for t in p.threads() for c in os.sched_getaffinity(t.id)})
                rows.append([p.pid, " ".join(p.cmdline()[1:4])[:60], cpus])
            except (psutil.Error, OSError):
                pass
        out[s.key] = rows
    return out


def http_ok(url: str, timeout: float = 10.0) -> bool:
    """The server answers: a static asset (a GET of the page itself would open a Bokeh session)."""
    try:
        with urllib.request.urlopen(url + "static/js/bokeh.min.js", timeout=timeout) as r:
            return r.status == 200
    except Exception:  # noqa: BLE001
        return False


def run_bench(args: argparse.Namespace, base: Path, setups: dict[str, Setup], browser_box: list) -> dict:
    a, b, c = setups["a"], setups["b"], setups["c"]
    poller = StatusPoller()
    poller.start()
    try:
        return _run(args, base, a, b, c, poller, browser_box)
    finally:
        poller.stop.set()


def _run(args, base, a: Setup, b: Keel, c: OldWay, poller: StatusPoller, browser_box: list) -> dict:
    result: dict[str, Any] = {"quick": args.quick, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "host": platform.node(), "cpus": os.cpu_count(),
                              "loadavg_start": os.getloadavg(), "python": platform.python_version()}
    import torch  # noqa: F401 - only for the version string; the trainers import their own
    result["torch"] = torch.__version__
    import bokeh
    result["bokeh"] = bokeh.__version__

    log("rendering three private environments")
    for s in (a, b, c):
        s.prepare()
        poller.watch(s.key, s.run_dir / "trainer.status.json")

    # Start one at a time (a trainer's start-up is CPU-heavy), freezing each once it trains.
    log("starting (a) the trainer alone")
    a.start()
    wait_for(lambda: poller.get("a"), 120, "(a) to train")
    a.freeze()
    log("starting (b) the keel stack: bin/launch up")
    b.start()
    wait_for(lambda: poller.get("b"), 120, "(b) to train")
    log("starting (c) the old way")
    b.freeze()
    c.start()
    wait_for(lambda: poller.get("c"), 120, "(c) to train")
    wait_for(lambda: http_ok(c.url), 60, "(c)'s page")
    log("opening 2 Chromium sessions on (c) and 2 on (b)")
    browser = Browser(base / "chromium-profile")
    browser_box.append(browser)
    browser.open(c)
    c.freeze()
    b.thaw()
    wait_for(lambda: http_ok(b.url), 60, "(b)'s page")
    browser.open(b)
    result["affinity"] = affinity_report([a, b, c])
    b.freeze()

    # ---- 1 + 2: paired throughput windows, latency from the same windows
    rounds = args.rounds or (3 if args.quick else 5)
    warm, window = (2.0, 6.0) if args.quick else (2.0, 8.0)
    windows: dict[str, list[dict]] = {"a": [], "b": [], "c": []}
    for r in range(rounds):
        for s in (a, b, c):
            s.thaw()
            time.sleep(warm)
            t0 = time.time()
            time.sleep(window)
            t1 = time.time()
            time.sleep(1.2)  # the status write after t1, so the window's last write is in
            s.freeze()
            rate = poller.rate(s.key, t0, t1)
            windows[s.key].append({"round": r, "t0": t0, "t1": t1, "steps_per_s": rate})
            log(f"round {r + 1}/{rounds} ({s.key}) {s.label}: {rate:.2f} steps/s" if rate else
                f"round {r + 1}/{rounds} ({s.key}): no rate")
    for s in (b, c):
        browser.collect(s)
    result["throughput"] = throughput_summary(windows)
    result["latency"] = {s.key: latency_summary(browser.records.get(s.key, []), poller.step_walls(s.key),
                                                windows[s.key]) for s in (b, c)}

    # ---- 3: faults
    a.stop()
    block_s = 10.0 if args.quick else 30.0
    faults = [
        ("raise", {"fault": "raise", "seconds": 10.0}, 10.0),
        ("block", {"fault": "block", "seconds": block_s}, block_s + 5.0),
        ("leak", {"fault": "leak", "chunk_bytes": 128 << 20, "cap_bytes": int(1.25 * GiB)}, 25.0),
        ("sigkill", None, 10.0),
    ]
    result["block_seconds"] = block_s
    fault_rows: list[dict] = []
    b.thaw()
    for name, spec, w in faults:
        fault_rows.append(inject(b, name, spec, w, poller, browser))
    b.stop()
    c.thaw()
    for name, spec, w in faults:
        if name == "leak":
            continue
        fault_rows.append(inject(c, name, spec, w, poller, browser))
    # the SIGKILL ended (c): a fresh one for the leak
    c.stop()
    c.pages.clear()
    shutil.rmtree(c.root / "var", ignore_errors=True)
    c.port = free_port()  # the old port may linger in TIME_WAIT; the page URL follows
    write_port(c)
    poller.series["c"] = []
    c.start()
    wait_for(lambda: poller.get("c"), 120, "(c) to train again")
    wait_for(lambda: http_ok(c.url), 60, "(c)'s page")
    browser.open(c)
    name, spec, w = faults[2]
    fault_rows.append(inject(c, name, spec, w, poller, browser))
    c.stop()
    result["faults"] = fault_rows
    result["loadavg_end"] = os.getloadavg()
    return result


def write_port(s: Setup) -> None:
    """Re-render (c) with its new dashboard port."""
    y = s.root / "configs" / f"{ENV}.yaml"
    lines = [f"    port: {s.port}" if ln.startswith("    port: ") else ln for ln in y.read_text().splitlines()]
    y.write_text("\n".join(lines) + "\n")
    render(s.root)


def inject(s: Setup, name: str, spec: dict | None, w: float, poller: StatusPoller, browser: Browser) -> dict:
    """Baseline, fault, window; returns the row. The set-up is thawed and its pages attached."""
    log(f"fault {name} in ({s.key}) {s.label}")
    trainer_before = s.trainer_pid()
    dash_before = s.dashboard_pid()  # type: ignore[attr-defined]
    time.sleep(6.0)
    t_inj = time.time()
    r0 = poller.rate(s.key, t_inj - 6.0, t_inj)
    limit_kill: dict[str, Any] = {}
    if spec is not None:
        (s.run_dir / "isolation-fault.json").write_text(json.dumps(spec))
    else:
        os.kill(dash_before, signal.SIGKILL)
    if name == "leak" and s.key == "c":
        limit_kill = enforce_limit(s, w)
    else:
        time.sleep(w)
    t_end = t_inj + w
    time.sleep(max(0.0, t_end + 1.5 - time.time()))
    s0, s1 = poller.step_at(s.key, t_inj), poller.step_at(s.key, t_end)
    done = (s1 - s0) if s0 is not None and s1 is not None else None
    expected = r0 * w if r0 else None
    # still training: a process alive and steps written in the last 3 s
    last = poller.get(s.key)[-3:]
    tp = s.trainer_pid()
    training = bool(tp and last and time.time() - last[-1][0] < 3.0 and len(last) >= 2 and last[-1][1] > last[0][1])
    # the dashboard afterwards
    back = None
    t_after = time.time()
    try:
        wait_for(lambda: http_ok(s.url), 30, "the dashboard", interval=0.5)
        back = time.time() - t_after
    except TimeoutError:
        pass
    dash_after = s.dashboard_pid()  # type: ignore[attr-defined]
    if back is not None and dash_after != dash_before:
        browser.reload(s)  # the restarted dashboard: reattach the 2 sessions for the next fault
    row = {
        "fault": name, "setup": s.key, "window_s": w, "baseline_steps_per_s": r0,
        "expected_steps": expected, "done_steps": done,
        "steps_lost": (expected - done) if expected is not None and done is not None else None,
        "trainer_still_training": training,
        "trainer_pid_unchanged": trainer_before is not None and tp == trainer_before,
        "dashboard_pid_before": dash_before, "dashboard_pid_after": dash_after,
        "dashboard_serving_after_s": back, **limit_kill,
    }
    log(f"  {json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()})}")
    if s.key == "b":
        # make sure the next fault starts from a healthy dashboard with 2 live sessions
        wait_for(lambda: http_ok(s.url), 60, "(b)'s dashboard")
    return row


def enforce_limit(s: Setup, w: float) -> dict:
    """(c): the memory limit a cgroup would enforce, as keel's watchdog rule: RSS over it for 3 polls 1 s apart."""
    p = psutil.Process(s.proc.pid)  # type: ignore[union-attr]
    limit = p.memory_info().rss + LEAK_LIMIT
    over, end, killed_at, peak = 0, time.time() + w, None, 0
    while time.time() < end:
        time.sleep(1.0)
        if killed_at is not None:
            continue
        try:
            rss = p.memory_info().rss
        except psutil.Error:
            break
        peak = max(peak, rss)
        over = over + 1 if rss > limit else 0
        if over >= 3:
            p.kill()
            killed_at = time.time()
    return {"limit_bytes": limit, "peak_rss_bytes": peak, "killed_by_limit": killed_at is not None}


def throughput_summary(windows: dict[str, list[dict]]) -> dict:
    out: dict[str, Any] = {"windows": windows}
    rates = {k: [w["steps_per_s"] for w in v if w["steps_per_s"]] for k, v in windows.items()}
    for k, v in rates.items():
        out[k] = {"median": statistics.median(v) if v else None, "min": min(v, default=None),
                  "max": max(v, default=None), "n": len(v)}
    for k in ("b", "c"):
        ratios = [wk["steps_per_s"] / wa["steps_per_s"] for wa, wk in zip(windows["a"], windows[k])
                  if wa["steps_per_s"] and wk["steps_per_s"]]
        out[f"{k}_over_a"] = {"median": statistics.median(ratios) if ratios else None, "per_round": ratios}
    return out


def latency_summary(records: list[tuple[float, int, int]], walls: dict[int, float], windows: list[dict]) -> dict:
    """Per page: first time it showed step N minus the trainer's write of step N, for writes inside a window;
    also each (window, page)'s median, so a window or a tab that lags as a whole shows as such."""
    lat: list[float] = []
    cells: dict[str, list[float]] = {}
    for t, step, page in records:
        wt = walls.get(step)
        w = next((i for i, w in enumerate(windows) if w["t0"] <= wt <= w["t1"]), None) if wt is not None else None
        if w is None or t - wt <= -0.05:  # a page cannot show a step before it was written (clock granularity)
            continue
        lat.append(t - wt)
        cells.setdefault(f"window {w} page {page}", []).append(t - wt)
    return {"n": len(lat), "median_s": statistics.median(lat) if lat else None, "p95_s": pct(lat, 0.95),
            "max_s": max(lat, default=None), "samples_s": sorted(round(x, 3) for x in lat),
            "median_s_by_window_and_page": {k: round(statistics.median(v), 3) for k, v in sorted(cells.items())}}


# --------------------------------------------------------------------------- report


def fmt(v: Any, spec: str = ".2f") -> str:
    return "—" if v is None else format(v, spec)


def tables(res: dict) -> str:
    th = res["throughput"]
    out = []
    out.append(f"Trainer steps/s, built-in model, 1 torch thread, CPU {TRAINER_CPU}; "
               f"{th['a']['n']} paired rounds (a b c ...), median (min–max):\n")
    out.append("| set-up | steps/s | vs (a) (median of paired ratios) |")
    out.append("| --- | --- | --- |")
    names = {"a": "(a) trainer alone", "b": "(b) keel: trainer + dashboard (2 browser sessions) + watchdog + supervisord",
             "c": "(c) old way: the same page served from a thread in the trainer (2 browser sessions)"}
    for k in ("a", "b", "c"):
        t = th[k]
        ratio = "1.00" if k == "a" else fmt(th[f"{k}_over_a"]["median"]) + (
            " (target ≥ 0.97)" if k == "b" else "")
        out.append(f"| {names[k]} | {fmt(t['median'], '.1f')} ({fmt(t['min'], '.1f')}–{fmt(t['max'], '.1f')}) | {ratio} |")
    out.append("")
    out.append("Dashboard latency, trainer's status write → the step visible in the page (Chromium), while training:\n")
    out.append("| set-up | samples | median | p95 | max |")
    out.append("| --- | --- | --- | --- | --- |")
    for k in ("b", "c"):
        lt = res["latency"][k]
        out.append(f"| {names[k].split(':')[0]} | {lt['n']} | {fmt(lt['median_s'])} s | {fmt(lt['p95_s'])} s | {fmt(lt['max_s'])} s |")
    out.append("")
    out.append(f"Faults in the dashboard code (block: {res['block_seconds']:.0f} s busy loop; "
               "leak: 128 MiB per callback until the memory limit acts):\n")
    out.append("| fault | set-up | trainer steps lost (of expected in window) | trainer still training | dashboard afterwards |")
    out.append("| --- | --- | --- | --- | --- |")
    for row in res["faults"]:
        lost, exp = row["steps_lost"], row["expected_steps"]
        lost_s = "—" if lost is None or not exp else f"{max(0.0, lost):.0f} of {exp:.0f} ({100 * max(0.0, lost) / exp:.0f}%)"
        training = "yes" if row["trainer_still_training"] else "**no**"
        if row["setup"] == "b":
            training += " (same pid)" if row["trainer_pid_unchanged"] else " (restarted)"
        dash = dashboard_after(row)
        out.append(f"| {row['fault']} | ({row['setup']}) | {lost_s} | {training} | {dash} |")
    out.append("")
    out.append(f"Window per fault: raise 10 s, block {res['block_seconds'] + 5:.0f} s, leak 25 s, sigkill 10 s "
               f"from the injection; expected = the trainer's rate in the 6 s before × the window. "
               f"Machine: {res['cpus']} CPUs, load average {res['loadavg_start'][0]:.1f} at start, "
               f"{res['loadavg_end'][0]:.1f} at the end.")
    return "\n".join(out)


def dashboard_after(row: dict) -> str:
    parts = []
    if row.get("killed_by_limit"):
        parts.append(f"process (trainer included) killed at the memory limit ({row['limit_bytes'] / GiB:.2f} GiB RSS)")
    if row["dashboard_serving_after_s"] is None:
        parts.append("gone: no page")
    elif row["dashboard_pid_after"] != row["dashboard_pid_before"]:
        parts.append(f"restarted (new pid), serving within {row['window_s'] + 1.5 + row['dashboard_serving_after_s']:.0f} s of the fault")
    else:
        parts.append("same process, serving")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds, 6 s windows, a 10 s block (~6.5 minutes)")
    ap.add_argument("--rounds", type=int, default=None, help="paired rounds (default 5; 3 with --quick)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "isolation.json")
    ap.add_argument("--keep", action="store_true", help="keep the tmp dir (logs) after the run")
    args = ap.parse_args(argv)
    if os.cpu_count() is None or os.cpu_count() < 2:
        print("isolation_bench: needs 2 CPUs (trainer on CPU 0, everything else on CPU 1)", file=sys.stderr)
        return 2
    # This process, Playwright and Chromium live on CPU 1; what it starts inherits that unless taskset says 0.
    os.sched_setaffinity(0, {OTHER_CPU})
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    base = Path(tempfile.mkdtemp(prefix="keel-iso-"))
    log(f"working in {base}")
    setups: dict[str, Setup] = {"a": Alone("a", "trainer alone", base), "b": Keel("b", "keel stack", base),
                                "c": OldWay("c", "old way", base)}
    browser_box: list[Browser] = []
    started = time.monotonic()
    rc = 1
    try:
        res = run_bench(args, base, setups, browser_box)
        res["duration_s"] = time.monotonic() - started
        res["command"] = " ".join([".venv/bin/python", "bench/isolation_bench.py", *(argv if argv is not None else sys.argv[1:])])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1, default=str) + "\n")
        print(tables(res))
        print(f"\n(wrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}; "
              f"{res['duration_s']:.0f} s)")
        rc = 0
    finally:
        cleanup(setups, browser_box)
        if not args.keep and rc == 0:
            shutil.rmtree(base, ignore_errors=True)
        else:
            log(f"logs kept in {base}")
    return rc


def cleanup(setups: dict[str, Setup], browser_box: list) -> None:
    for s in setups.values():
        try:
            s.stop()
        except Exception as exc:  # noqa: BLE001 - go on with the others
            log(f"stopping ({s.key}) failed: {exc!r}")
            s.kill_tree()
    for br in browser_box:
        try:
            br.close()
        except Exception:  # noqa: BLE001
            pass
    # anything still descending from this process (Playwright's driver, Chromium): by pid
    me = psutil.Process()
    kill_processes([p for p in me.children(recursive=True) if alive(p)], timeout=5)
    still = [p.pid for s in setups.values() for p in s.tree() if alive(p)] + [p.pid for p in me.children(recursive=True) if alive(p)]
    if still:
        log(f"WARNING: processes left: {still}")


if __name__ == "__main__":
    sys.exit(main())
