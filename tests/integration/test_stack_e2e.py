"""The whole stack as a user meets it: bin/launch, bin/status, bin/doctor against the real trainer,
dashboard and watchdog under a real supervisord, with real SIGKILL/SIGSTOP faults.

One stack is shared by the tests of this module, in order (each leaves it up and healthy for
the next); the last one takes it down and checks that nothing is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import psutil
import pytest

from tests.support import keel_config_pids, REPO_ROOT, free_port, is_alive, wait_until

pytestmark = pytest.mark.slow

ENV = "e2e"
HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT, POLL = 0.5, 4.0, 1.0


class Stack:
    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.cfg = root / "configs"
        self.env = {**os.environ, "KEEL_BUILD_ROOT": str(root / "build")}

    def run(self, tool: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        argv = [str(REPO_ROOT / "bin" / tool), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=self.env)

    def status(self) -> dict:
        done = self.run("status", ENV, "--json", timeout=30)
        assert done.returncode in (0, 1), done.stderr
        return json.loads(done.stdout)

    def proc(self, name: str) -> dict:
        return next(p for p in self.status()["processes"] if p["name"] == name)

    def healthy(self) -> bool:
        return self.status()["healthy"]

    def stack_file(self) -> dict:
        return json.loads((self.root / "build" / ENV / "keel.json").read_text())

    def supervisord_pid(self) -> int:
        return int((self.root / "var" / "run" / "supervisord.pid").read_text())

    def all_pids(self) -> set[int]:
        """Every live process carrying this stack's KEEL_CONFIG (DataLoader workers included)."""
        return keel_config_pids(self.root / "build" / ENV)


def write_configs(root: Path, port: int) -> Path:
    cfg = root / "configs"
    cfg.mkdir(parents=True)
    (cfg / "base.yaml").write_text((REPO_ROOT / "configs" / "base.yaml").read_text())
    (cfg / f"{ENV}.yaml").write_text(textwrap.dedent(f"""\
        paths:
          root: {root}
        processes:
          trainer:
            num_workers: 2
            checkpoint:
              every_seconds: 2s
            report:
              status_interval: 250ms
            health:
              heartbeat_interval: {HEARTBEAT_INTERVAL}s
              heartbeat_timeout: {HEARTBEAT_TIMEOUT}s
              progress_timeout: 8s
              startup_grace: 20s
            restart:
              backoff_initial: 1s
              backoff_max: 4s
              max_restarts: 10
              window: 10m
            stop:
              timeout: 15s
          dashboard:
            port: {port}
            health:
              heartbeat_interval: {HEARTBEAT_INTERVAL}s
              heartbeat_timeout: {HEARTBEAT_TIMEOUT}s
              startup_grace: 20s
          watchdog:
            poll_interval: {POLL}s
            health:
              heartbeat_interval: {HEARTBEAT_INTERVAL}s
              heartbeat_timeout: {HEARTBEAT_TIMEOUT}s
              startup_grace: 20s
        """))
    return cfg


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    st = Stack(root, free_port())
    write_configs(root, st.port)
    # --timeout bounds the wait for healthy; exit 0 says every process got there
    done = st.run("launch", "up", ENV, "--config-dir", str(st.cfg), "--timeout", "90")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"dashboard: http://127.0.0.1:{st.port}/" in done.stdout
    yield st
    # whatever happened above: nothing of this stack may outlive the module
    st.run("launch", "down", ENV, timeout=120)
    for pid in st.all_pids():
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass
    try:
        sup = psutil.Process(st.supervisord_pid())
        if "supervisord" in " ".join(sup.cmdline()):
            sup.kill()
    except (OSError, ValueError, psutil.Error):
        pass
    wait_until(lambda: not st.all_pids(), 15, what="no stack process left")


def step_of(st: Stack) -> int:
    return st.proc("trainer")["step"] or 0


def events(st: Stack) -> list[dict]:
    path = st.root / "var" / "run" / "watchdog.events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def event_wall(event: dict) -> float:
    """The watchdog stamps events with UTC wall time, ISO 8601 with a Z."""
    return datetime.fromisoformat(event["ts"].replace("Z", "+00:00")).timestamp()


def metrics_lines(st: Stack) -> list[str]:
    return (st.root / "var" / "run" / "trainer.metrics.jsonl").read_text().splitlines()


def trainer_files_intact(st: Stack, metrics_from: int) -> None:
    """The trainer's snapshot parses, and the metrics lines since line `metrics_from` are whole JSON
    records whose steps never go back (a trainer restart resumes from a checkpoint, i.e. goes back)."""
    json.loads((st.root / "var" / "run" / "trainer.status.json").read_text())
    records = [json.loads(line) for line in metrics_lines(st)[metrics_from:] if line.strip()]
    steps = [r["step"] for r in records if r.get("step") is not None]
    assert steps and steps == sorted(steps), "trainer metrics went back: the trainer restarted"


def test_up_is_healthy_and_the_dashboard_answers(stack):
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.port}/", timeout=10) as response:
        assert response.status == 200
    first = step_of(stack)
    wait_until(lambda: step_of(stack) > first, 10, what="step grows")
    again = stack.run("launch", "up", ENV, "--config-dir", str(stack.cfg))
    assert again.returncode == 0 and "already up" in again.stdout


def test_sigkilled_trainer_resumes_from_its_checkpoint(stack):
    ckpt_dir = stack.root / "var" / "checkpoints"
    wait_until(lambda: list(ckpt_dir.glob("*.pt")), 15, what="a checkpoint")
    before = stack.proc("trainer")
    os.kill(before["pid"], signal.SIGKILL)
    status_file = stack.root / "var" / "run" / "trainer.status.json"

    def new_run_training() -> dict | None:
        # The restarted trainer's own snapshot, once it says running (it resumes before it runs).
        try:
            s = json.loads(status_file.read_text())
        except (OSError, ValueError):
            return None
        return s if s["pid"] != before["pid"] and s["state"] == "running" else None

    status = wait_until(new_run_training, 60, what="the restarted trainer running")
    after = stack.proc("trainer")
    resumed_from = status["payload"].get("checkpoint_step") or 0
    assert resumed_from > 0, f"restarted from scratch: {status}"
    assert after["step"] >= resumed_from
    assert after["step"] > before["step"] * 0.5


def test_sigstopped_trainer_is_restarted_by_the_watchdog(stack):
    wait_until(stack.healthy, 60, what="stack healthy before SIGSTOP")
    pid = stack.proc("trainer")["pid"]
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.time()  # wall clock: the watchdog's event stamps are wall time on this host
    try:
        wait_until(lambda: stack.proc("trainer")["pid"] not in (None, pid), 120, what="trainer replaced")
    finally:
        if is_alive(pid):
            os.kill(pid, signal.SIGCONT)
    trainer_events = [e for e in events(stack) if e["process"] == "trainer" and event_wall(e) >= stopped_at - 1]
    stale = [e for e in trainer_events if e["action"] == "observed" and e["rule"] == "heartbeat_stale"]
    assert stale, f"the watchdog never judged the heartbeat stale: {trainer_events}"
    assert any(e["action"] == "restart" for e in trainer_events), f"no restart by the watchdog: {trainer_events}"
    # The heartbeat goes stale heartbeat_timeout after the stop and the next poll sees it; the margin
    # (one more heartbeat_timeout + poll) absorbs a loaded machine. A watchdog that judged only the
    # missing progress (progress_timeout 8s) fails the rule check above, not this bound.
    detected = event_wall(stale[0]) - stopped_at
    deadline = (HEARTBEAT_TIMEOUT + POLL) + (HEARTBEAT_TIMEOUT + POLL)
    assert detected <= deadline, f"stale heartbeat judged {detected:.1f}s after SIGSTOP (deadline {deadline:.1f}s)"
    wait_until(stack.healthy, 60, what="healthy again")


def test_sigkilled_dashboard_leaves_the_trainer_running(stack):
    """Behaviour only; what the fault costs the trainer in steps/s is measured by bench/isolation_bench.py."""
    wait_until(stack.healthy, 60, what="stack healthy")
    trainer_pid = stack.proc("trainer")["pid"]
    pid = stack.proc("dashboard")["pid"]
    metrics_from = len(metrics_lines(stack))
    killed_at = step_of(stack)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not is_alive(pid), 10, what="dashboard dead")
    wait_until(lambda: (p := stack.proc("dashboard"))["pid"] not in (None, pid) and p["health"] == "ok", 60,
               what="dashboard back")
    # supervisord's restart and Bokeh's start-up keep the page away for seconds: the trainer stepped on
    back_at = step_of(stack)
    assert back_at > killed_at, f"the trainer made no step while the dashboard was dead (step {killed_at})"
    wait_until(lambda: step_of(stack) > back_at, 30, what="trainer steps after the dashboard came back")
    assert stack.proc("trainer")["pid"] == trainer_pid, "the trainer was restarted"
    trainer_files_intact(stack, metrics_from)
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.port}/", timeout=10) as response:
        assert response.status == 200


def test_broken_config_is_refused_and_changes_nothing(stack):
    wait_until(stack.healthy, 60, what="stack healthy")
    pids = {p["name"]: p["pid"] for p in stack.status()["processes"]}
    config_file = stack.cfg / f"{ENV}.yaml"
    good = config_file.read_text()
    build = {p.name: p.read_bytes() for p in (stack.root / "build" / ENV).glob("*.json")}
    try:
        config_file.write_text(good.replace("checkpoint:\n      every_seconds: 2s", "checkpoint:\n      every_seconds: soon"))
        done = stack.run("launch", "up", ENV, "--config-dir", str(stack.cfg))
    finally:
        config_file.write_text(good)
    assert done.returncode == 2
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 1 and 'processes.trainer.checkpoint.every_seconds: expected a duration' in errors[0]
    assert {p["name"]: p["pid"] for p in stack.status()["processes"]} == pids
    assert {p.name: p.read_bytes() for p in (stack.root / "build" / ENV).glob("*.json")} == build


def test_orphans_after_a_sigkilled_supervisord_are_cleaned_by_up(stack):
    wait_until(stack.healthy, 60, what="stack healthy")
    old_pids = stack.all_pids()
    sup = stack.supervisord_pid()
    os.kill(sup, signal.SIGKILL)
    wait_until(lambda: not is_alive(sup), 10, what="supervisord dead")
    doctor = stack.run("doctor", ENV, "--config-dir", str(stack.cfg))
    assert doctor.returncode == 1
    assert "orphans" in doctor.stdout and "stale files" in doctor.stdout
    done = stack.run("launch", "up", ENV, "--config-dir", str(stack.cfg), "--timeout", "90")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "orphaned processes" in done.stdout
    assert not (old_pids & stack.all_pids()), "an orphan survived"
    kinds = {}
    for proc in stack.status()["processes"]:
        kinds[proc["name"]] = proc["pid"]
    mains = [p for p in map(psutil.Process, stack.all_pids()) if p.environ().get("KEEL_PROCESS") and p.ppid() == stack.supervisord_pid()]
    assert sorted(p.environ()["KEEL_PROCESS"] for p in mains) == ["dashboard", "trainer", "watchdog"]


def test_down_leaves_nothing(stack):
    wait_until(stack.healthy, 60, what="stack healthy")
    family = stack.all_pids()
    assert len(family) > 3, "expected DataLoader workers beside the three processes"
    sup = stack.supervisord_pid()
    done = stack.run("launch", "down", ENV, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not any(is_alive(p) for p in family | {sup})
    assert stack.all_pids() == set()
