"""Phases under a real supervisord: data starvation is a warning, `auto` hang timeouts judge per phase.

Real `python -m trainer` processes run the plug-in entries below; the real
watchdog polls them. Times are short (20 ms steps, a 1.5 s validation) so the
tests take seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from keel.status.models import ProcessStatus, WatchdogStatus
from keel.status.reader import StatusReader
from tests.integration.test_watchdog import POLL, stack  # noqa: F401 - the fixture
from tests.support import REPO_ROOT, wait_until

pytestmark = pytest.mark.slow

STEP = 0.02
K, FLOOR = 10, 0.2


# --- plug-in entries (run inside `python -m trainer`) -------------------------------------------


def starved_entry(run) -> None:
    """Steps of ~25 ms, of which ~20 ms wait inside run.phase("data"): a starved input pipeline."""
    step = 0
    while not run.should_stop():
        with run.phase("data"):
            time.sleep(0.02)
        time.sleep(0.005)
        step += 1
        run.report(step=step, loss=1.0)


def stalling_entry(run) -> None:
    """~20 ms steps for `stall_after` s, then a stall in phase train (marker file: when, by CLOCK_MONOTONIC)."""
    stall_after = float(run.config["stall_after"])
    start, step = time.monotonic(), 0
    while not run.should_stop():
        if time.monotonic() - start >= stall_after:
            Path(run.config["marker"]).write_text(json.dumps({"stalled_at": time.monotonic(), "pid": os.getpid()}))
            while not run.should_stop():
                time.sleep(0.01)
            return
        time.sleep(STEP)
        step += 1
        run.report(step=step, loss=1.0)


def validating_entry(run) -> None:
    """~20 ms steps with a 1.5 s validation every 150 steps (under 1 % of steps: the train p99 stays ~20 ms)."""
    step = 0
    while not run.should_stop():
        time.sleep(STEP)
        step += 1
        if step % 150 == 0:
            with run.phase("validation"):
                end = time.monotonic() + 1.5
                while time.monotonic() < end and not run.stop_requested():
                    time.sleep(0.01)
        run.report(step=step, loss=1.0)


def trainer(entry: str, *, health: dict | None = None, params: dict | None = None) -> dict:
    return {
        "kind": "trainer", "entry": f"tests.integration.test_watchdog_phases:{entry}", "gpus": [], "num_workers": 0,
        "params": params or {},
        "report": {"status_interval": "50ms", "metrics_interval": "1s"},
        "health": {"heartbeat_interval": "0.3s", "heartbeat_timeout": "5s", "startup_grace": "3s",
                   "progress_timeout": "auto",
                   "auto": {"k": K, "floor": f"{FLOOR}s", "ceiling": "60s", "min_samples": 3},
                   "data_starved": {"fraction": 0.5, "polls": 3}, **(health or {})},
        "restart": {"policy": "always", "backoff_initial": "0.5s", "backoff_max": "2s", "max_restarts": 3,
                    "window": "5m"},
        "stop": {"timeout": "5s"}, "startsecs": "1s",
    }


def _watchdog_entry(run_dir: Path, name: str):
    st = StatusReader(run_dir).read("watchdog")
    if not isinstance(st, ProcessStatus) or not isinstance(st.payload, WatchdogStatus):
        return None
    return st.payload.processes.get(name)


def _last_poll(run_dir: Path):
    st = StatusReader(run_dir).read("watchdog")
    return st.payload.last_poll if isinstance(st, ProcessStatus) and isinstance(st.payload, WatchdogStatus) else None


def test_a_starved_trainer_is_warned_about_never_restarted_and_shown_by_bin_status(stack, tmp_path):
    s = stack({"t1": trainer("starved_entry")})
    ev = wait_until(lambda: [e for e in s.events("t1", "observed") if e["rule"] == "data_starved"], 60,
                    interval=0.2, what="data_starved observed")[0]
    assert ev["verdict"] == "degraded" and "num_workers" in ev["reason"] and "pin_memory" in ev["reason"]
    entry = wait_until(lambda: (e := _watchdog_entry(s.run_dir, "t1")) and e.rule == "data_starved" and e, 10,
                       what="published verdict")
    assert entry.health == "degraded"
    pid = s.running_pid("t1")
    # four more polls while it stays starved (the watchdog's own last_poll moves): still only a warning
    polls: set = set()
    wait_until(lambda: polls.add(_last_poll(s.run_dir)) or len(polls - {None}) > 4, 60, interval=0.1,
               what="four more watchdog polls")
    assert not s.events("t1", "restart") and s.running_pid("t1") == pid
    (tmp_path / "builds").mkdir()
    (tmp_path / "builds" / "test").symlink_to(s.build)  # bin/status finds $KEEL_BUILD_ROOT/<env>/keel.json
    out = subprocess.run([str(REPO_ROOT / "bin" / "status"), "test", "--json"], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "KEEL_BUILD_ROOT": str(tmp_path / "builds")})
    assert "data_starved" in out.stdout and "waiting for data" in out.stdout, (out.stdout, out.stderr)


def test_auto_judges_a_stalled_20ms_loop_hung_within_k_p99_plus_a_poll(stack, tmp_path):
    marker = tmp_path / "stalled.json"
    s = stack({"t1": trainer("stalling_entry", params={"stall_after": 6, "marker": str(marker)})})
    stalled = wait_until(lambda: marker.exists() and marker.read_text() and json.loads(marker.read_text()), 60,
                         interval=0.05, what="the plug-in stalled")
    p99 = StatusReader(s.run_dir).read("t1").payload.phases["train"].p99
    threshold = max(FLOOR, K * p99)
    ev = wait_until(lambda: [e for e in s.events("t1", "observed") if e["rule"] == "progress_stale"], 30,
                    interval=0.05, what="progress_stale observed")[0]
    late = ev["mono"] - stalled["stalled_at"]
    # Judged after the phase's own threshold, within it + a status write (50 ms) + a poll (+ slack for load).
    assert threshold - 0.1 <= late <= threshold + 0.05 + POLL + 1.0, (late, threshold, ev)
    assert "in phase train" in ev["reason"] and "p99" in ev["reason"], ev
    assert threshold < 5.0  # far sooner than a fixed timeout would: the stall was judged by 20 ms steps
    wait_until(lambda: s.events("t1", "restart"), 30, interval=0.1, what="restart")


def test_a_long_validation_with_a_history_of_long_validations_is_not_hung(stack):
    s = stack({"t1": trainer("validating_entry")})
    st = lambda: StatusReader(s.run_dir).read("t1")  # noqa: E731
    wait_until(lambda: isinstance(p := getattr(st(), "payload", None), object) and getattr(p, "phases", {}).get(
        "validation") is not None and p.phases["validation"].count >= 4, 90, interval=0.2,
        what="four validations recorded")
    p = st().payload
    assert p.phases["validation"].p99 >= 1.4 and p.phases["train"].p99 < 0.5  # 1.5 s >> the train threshold
    assert not s.events("t1", "restart"), s.events("t1")
    assert not [e for e in s.events("t1", "observed") if e["rule"] == "progress_stale"]
