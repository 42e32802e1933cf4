"""Incident bundles against a real supervisord: a real trainer that hangs in a named function, or is SIGSTOPped.

The plug-ins below run inside `python -m trainer` (supervisord starts it from the repo root, so
`tests.integration.test_incidents:<fn>` imports). Each test checks that the incident names the
function and line the trainer was stuck on, that the restart came after the bundle was written,
and (with a py-spy made slow on purpose) that the watchdog kept polling while it captured.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from keel.status.reader import StatusReader
from keel.watch.incidents import list_incidents, load_incident
from tests.integration.test_watchdog import stack, worker  # noqa: F401 - `stack` is a fixture
from tests.support import REPO_ROOT, wait_until

pytestmark = pytest.mark.slow

PY_SPY = str(Path(sys.executable).parent / "py-spy")


# --- plug-ins (run inside the trainer) --------------------------------------------------------------


def wait_for_the_lock_that_never_comes() -> None:
    lock = threading.Lock()
    lock.acquire()
    lock.acquire()  # HANG_LINE: the second acquire never returns


def hang_after_a_few_steps(run) -> None:
    """Reports a few steps, then blocks forever in a distinctively named function (its heartbeat goes on)."""
    for step in range(1, 6):
        run.report(step=step, loss=1.0 / step)
        time.sleep(0.05)
    wait_for_the_lock_that_never_comes()


def step_until_frozen_from_outside(run) -> None:
    """Steps forever; the test SIGSTOPs the process, so its stack stays here."""
    step = 0
    while not run.should_stop():
        step += 1
        run.report(step=step, loss=1.0)
        time.sleep(0.02)


HANG_LINE = next(i for i, line in enumerate(inspect.getsource(sys.modules[__name__]).splitlines(), 1)
                 if "HANG_LINE" in line and "lock.acquire()" in line)


# --- helpers --------------------------------------------------------------------------------------------


def trainer(entry: str) -> dict:
    return {
        "kind": "trainer",
        "entry": f"tests.integration.test_incidents:{entry}",
        "num_workers": 0,
        "val_every_steps": 1_000_000,
        "report": {"status_interval": "100ms", "metrics_interval": "100ms"},
        "health": {"heartbeat_interval": "0.3s", "heartbeat_timeout": "3s", "progress_timeout": "3s",
                   "startup_grace": "20s"},
        "restart": {"policy": "always", "backoff_initial": "0.5s", "backoff_max": "2s", "max_restarts": 3,
                    "window": "5m"},
        "stop": {"timeout": "5s"},
        "startsecs": "1s",
    }


def slow_py_spy(directory: Path, delay: float) -> str:
    """A py-spy that takes ``delay`` seconds first: the capture outlasts several polls."""
    path = directory / "slow-py-spy"
    path.write_text(f"#!/bin/sh\nsleep {delay}\nexec {PY_SPY} \"$@\"\n")
    path.chmod(0o755)
    return str(path)


class PollRecorder:
    """Reads the watchdog's status every 50 ms on a thread: which `last_poll` values it published, when."""

    def __init__(self, run_dir: Path) -> None:
        self.reader = StatusReader(run_dir)
        self.polls: set[float] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            st = self.reader.read("watchdog")
            if st and st.payload is not None and st.payload.last_poll is not None:
                self.polls.add(st.payload.last_poll.timestamp())
            self._stop.wait(0.05)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def launch(s, *args: str) -> subprocess.CompletedProcess:
    """bin/launch on the test's stack: its keel.json is <dir>/build/keel.json, i.e. env "build" under KEEL_BUILD_ROOT."""
    return subprocess.run([str(REPO_ROOT / "bin" / "launch"), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "KEEL_BUILD_ROOT": str(s.dir)})


def wall(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def stuck_incident(s, process: str = "t") -> dict:
    try:
        return wait_until(lambda: [i for i in list_incidents(s.run_dir) if i.get("process") == process], 90,
                          interval=0.1, what="an incident")[0]
    except AssertionError as exc:
        raise AssertionError(f"{exc}; events: {[(e['process'], e['action'], e['reason']) for e in s.events()][-12:]}")


def check_restart_after(s, incident: dict, process: str = "t") -> dict:
    """The restart event names the bundle, and comes after the bundle was complete on disk."""
    ev = wait_until(lambda: s.events(process, "restart"), 30, interval=0.1, what="restart event")[0]
    assert ev["incident"] == incident["path"]
    written = Path(incident["path"]).stat().st_mtime  # the rename: the bundle is whole from then on
    assert wall(ev["ts"]) >= written - 0.01, (ev["ts"], written)
    assert wall(ev["ts"]) >= wall(incident["time"]) + incident["capture_seconds"] - 0.01
    (captured,) = s.events(process, "incident")
    assert captured["incident"] == incident["path"] and captured["mono"] <= ev["mono"]
    return ev


# --- tests ---------------------------------------------------------------------------------------------


def test_a_hung_trainer_leaves_an_incident_naming_its_line_before_the_restart(stack, tmp_path):
    s = stack({"t": trainer("hang_after_a_few_steps"), "w2": worker("ok")},
              {"incidents": {"py_spy": slow_py_spy(tmp_path, 1.5), "capture_timeout": "8s", "log_lines": 50}})
    polls = PollRecorder(s.run_dir)
    try:
        inc = stuck_incident(s)
        ev = check_restart_after(s, inc)
    finally:
        polls.close()
    assert ev["rule"] == "progress_stale" and inc["verdict"]["rule"] == "progress_stale"
    stuck = inc["stuck"]
    assert stuck["function"] == "wait_for_the_lock_that_never_comes", inc
    assert stuck["file"] == __file__ and stuck["line"] == HANG_LINE
    assert inc["stacks"][0]["method"] == "py-spy" and inc["complete"] is True
    # The capture took >= 1.5 s (the slow py-spy); the watchdog published polls all through it.
    start, end = wall(inc["time"]), wall(inc["time"]) + inc["capture_seconds"]
    during = sorted(p for p in polls.polls if start <= p <= end)
    assert inc["capture_seconds"] >= 1.5 and len(during) >= 2, (inc["capture_seconds"], during)
    summary, files = load_incident(s.run_dir, inc["id"])
    assert files["stacks.txt"].startswith("== likely stuck: pid")
    first_block = files["stacks.txt"].split("\n\n")[0]
    assert f"wait_for_the_lock_that_never_comes ({__file__}:{HANG_LINE})" in first_block
    assert summary["status"][0]["name"] == "t" and summary["status"][0]["payload"]["step"] == 5
    assert [r["step"] for r in map(json.loads, files["metrics.jsonl"].splitlines())][-1] == 5
    assert files["log.txt"].strip() and summary["resources"]["processes"][0]["rss_bytes"] > 0
    # bin/status points at it, bin/launch incidents lists and shows it.
    listed = launch(s, "incidents", "build")
    assert listed.returncode == 0 and inc["id"] in listed.stdout, listed.stderr
    shown = launch(s, "incidents", "build", "--show", inc["id"])
    assert shown.returncode == 0 and "wait_for_the_lock_that_never_comes" in shown.stdout.split("\n\n")[1], shown.stdout


def test_a_frozen_trainer_is_read_by_py_spy_while_stopped_then_restarted(stack):
    s = stack({"t": trainer("step_until_frozen_from_outside"), "w2": worker("ok")})
    pid = wait_until(lambda: (st := StatusReader(s.run_dir).read("t")) and st.payload and st.payload.step > 3
                     and st.pid, 90, interval=0.1, what="trainer stepping")
    os.kill(pid, signal.SIGSTOP)
    inc = stuck_incident(s)
    check_restart_after(s, inc)
    assert inc["verdict"]["rule"] == "heartbeat_stale" and inc["pid"] == pid
    main = inc["stacks"][0]
    assert main["state"] == "stopped" and main["method"] == "py-spy", inc["stacks"]
    assert any("step_until_frozen_from_outside" in f for f in inc["stuck"]["frames"]), inc["stuck"]
    (sigcont,) = s.events("t", "signal")  # SIGCONT came after the capture, before the restart
    (captured,), restart = s.events("t", "incident"), s.events("t", "restart")[0]
    assert "SIGCONT" in sigcont["reason"] and captured["mono"] <= sigcont["mono"] <= restart["mono"]
    wait_until(lambda: s.running_pid("t") not in (None, pid), 60, what="new trainer")


def test_without_py_spy_the_faulthandler_dump_gives_the_stack(stack):
    s = stack({"t": trainer("hang_after_a_few_steps")}, {"incidents": {"py_spy": "/nonexistent/py-spy"}})
    inc = stuck_incident(s)
    check_restart_after(s, inc)
    assert inc["stacks"][0]["method"] == "faulthandler", inc["stacks"]
    assert inc["stuck"]["function"] == "wait_for_the_lock_that_never_comes" and inc["stuck"]["line"] == HANG_LINE
    assert any("py-spy not found" in n for n in inc["notes"])


def test_an_incident_on_demand_does_not_kill(stack):
    s = stack({"t": trainer("step_until_frozen_from_outside")})
    pid = wait_until(lambda: (st := StatusReader(s.run_dir).read("t")) and st.payload and st.payload.step > 3
                     and st.pid, 90, interval=0.1, what="trainer stepping")
    done = launch(s, "incident", "build", "t")
    assert done.returncode == 0, done.stderr
    found = list_incidents(s.run_dir)
    (inc,) = [i for i in found if i["action"] == "on_demand"]
    assert inc["path"] in done.stdout and inc["verdict"]["rule"] == "on_demand"
    assert any("step_until_frozen_from_outside" in f for f in inc["stuck"]["frames"])
    assert s.running_pid("t") == pid and not s.events("t", "restart"), (found, s.events("t"))
