"""The watchdog against a real supervisord running a config rendered by bin/render-config.

Each test renders a tmp config dir (base.yaml with absolute paths under a short
/tmp dir, stand-in workers of ``kind: command``, short timeouts), starts
supervisord on it, and breaks a worker for real: SIGSTOP, a hung loop, a leak,
a crash loop, a SIGKILLed watchdog, a reused pid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from keel.status.models import ProcessStatus, State
from keel.host.dirs import prepare_process_dirs
from keel.status.reader import StatusReader
from keel.status.snapshot import StatusWriter
from tests.integration.test_watchdog_fixtures import SUPERVISORD, info, short_dir, stop_supervisord
from tests.support import PYTHON, REPO_ROOT, is_alive, wait_until

pytestmark = pytest.mark.slow

WORKER = f"{PYTHON} {REPO_ROOT}/tests/integration/standin_worker.py"
HEARTBEAT_TIMEOUT = 2.0
POLL = 0.5


def worker(mode: str, *, extra: str = "", health: dict | None = None, restart: dict | None = None,
           limits: dict | None = None) -> dict:
    return {
        "kind": "command",
        "command": f"{WORKER} --mode {mode} --heartbeat-interval 0.3 --step 0.1 {extra}".strip(),
        "health": {"heartbeat_interval": "0.3s", "heartbeat_timeout": f"{HEARTBEAT_TIMEOUT}s",
                   "progress_timeout": "2s", "startup_grace": "4s", **(health or {})},
        "restart": {"policy": "always", "backoff_initial": "0.5s", "backoff_max": "2s", "max_restarts": 3,
                    "window": "5m", **(restart or {})},
        "limits": limits or {},
        "stop": {"timeout": "2s"},
        "startsecs": "1s",
    }


class Stack:
    """A rendered stack under a short /tmp dir, run by a real supervisord."""

    def __init__(self, processes: dict, watchdog: dict | None = None) -> None:
        self.dir = short_dir()
        self.run_dir = self.dir / "run"
        cfg = self.dir / "cfg"
        cfg.mkdir()
        base = {
            "project": "kt",
            "paths": {"root": str(self.dir), "run_dir": str(self.run_dir), "log_dir": str(self.dir / "log"),
                      "checkpoint_dir": str(self.dir / "ckpt")},
            "processes": {
                **processes,
                "watchdog": {"kind": "watchdog", "poll_interval": f"{POLL}s", "stable_after": "1m",
                             "rss_consecutive_polls": 2, "stop": {"timeout": "5s"}, **(watchdog or {})},
            },
        }
        (cfg / "base.yaml").write_text(json.dumps(base))  # JSON is YAML
        (cfg / "test.yaml").write_text("{}\n")
        self.build = self.dir / "build"
        done = subprocess.run([str(REPO_ROOT / "bin" / "render-config"), "test", "--config-dir", str(cfg),
                               "--out", str(self.build), "-q"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        self.keel = json.loads((self.build / "keel.json").read_text())
        for name, proc in self.keel["processes"].items():  # --out installs nothing: make the dirs ourselves
            prepare_process_dirs(json.loads(Path(proc["config_file"]).read_text()))
        self.sock = Path(self.keel["control"]["socket"])
        self.proc: subprocess.Popen | None = None

    def start(self, reaper) -> Stack:
        self.proc = reaper.popen([SUPERVISORD, "-n", "-c", str(self.build / "supervisord.conf")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: self.sock.exists() and self._answers(), 15, interval=0.1, what="supervisord answering")
        return self

    def _answers(self) -> bool:
        try:
            self.info("watchdog")
            return True
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def info(self, name: str) -> dict:
        return info(self.sock, self.keel["processes"][name]["program"])  # keel.json names it

    def running_pid(self, name: str) -> int | None:
        i = self.info(name)
        return i["pid"] if i["statename"] == "RUNNING" else None

    def events(self, process: str | None = None, action: str | None = None) -> list[dict]:
        path = self.run_dir / "watchdog.events.jsonl"
        if not path.exists():
            return []
        out = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [e for e in out if (process is None or e["process"] == process) and (action is None or e["action"] == action)]

    def stop(self) -> None:
        if self.proc is not None:
            stop_supervisord(self.proc, self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def stack(reaper):
    made: list[Stack] = []

    def make(processes: dict, watchdog: dict | None = None) -> Stack:
        s = Stack(processes, watchdog)
        made.append(s)
        return s.start(reaper)

    yield make
    for s in made:
        pids = [p.pid for p in psutil.Process(s.proc.pid).children(recursive=True)] if s.proc and s.proc.poll() is None else []
        s.stop()
        wait_until(lambda: not any(is_alive(p) for p in pids), 10, what="supervisord's programs gone")


def _status_pid(run_dir: Path, name: str) -> int | None:
    st = StatusReader(run_dir).read(name)
    return st.pid if isinstance(st, ProcessStatus) and st.state is State.RUNNING else None


def test_a_sigstopped_worker_is_restarted_within_heartbeat_timeout_plus_poll_plus_2s(stack):
    s = stack({"w1": worker("ok")})
    pid = wait_until(lambda: _status_pid(s.run_dir, "w1"), 15, what="w1 reporting")
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    # Restarted = supervisord has spawned a new process (its RUNNING state comes startsecs later).
    new = wait_until(lambda: (p := s.info("w1")["pid"]) not in (0, pid) and p, 15, interval=0.05,
                     what="w1 restarted")
    latency = time.monotonic() - t0
    timeline = [(round(e["mono"] - t0, 2), e["action"], e["rule"]) for e in s.events("w1") if e["mono"] >= t0]
    assert latency <= HEARTBEAT_TIMEOUT + POLL + 2.0, (latency, timeline, os.getloadavg())
    assert not is_alive(pid)
    # the watchdog writes its restart event after the start it asked for: supervisord may spawn first
    (ev,) = wait_until(lambda: s.events("w1", "restart"), 10, interval=0.05, what="the restart event")
    assert ev["rule"] == "heartbeat_stale" and ev["attempt"] == 1 and ev["pid"] == pid
    assert s.events("w1", "signal")  # SIGCONT first, so the frozen worker could stop cleanly
    wait_until(lambda: _status_pid(s.run_dir, "w1") not in (None, pid), 15, what="new run reporting")


def test_a_hung_loop_with_a_live_heartbeat_is_restarted_for_stale_progress(stack):
    s = stack({"w1": worker("hang", extra="--hang-after 0.5")})
    pid = wait_until(lambda: _status_pid(s.run_dir, "w1"), 15, what="w1 reporting")
    ev = wait_until(lambda: s.events("w1", "restart"), 15, what="restart event")[0]
    assert ev["rule"] == "progress_stale" and ev["pid"] == pid
    wait_until(lambda: s.running_pid("w1") not in (None, pid), 10, what="new w1")
    assert not any(e["rule"] == "heartbeat_stale" for e in s.events("w1"))  # its heartbeat never stopped


def test_a_leaking_worker_is_restarted_with_an_rss_event(stack):
    s = stack({"w1": worker("leak", extra="--leak-mb 6", limits={"memory": "100MiB"},
                            health={"progress_timeout": "1m"})})
    pid = wait_until(lambda: _status_pid(s.run_dir, "w1"), 15, what="w1 reporting")
    ev = wait_until(lambda: s.events("w1", "restart"), 20, what="restart event")[0]
    assert ev["rule"] == "rss_over_limit" and "RSS" in ev["reason"] and ev["pid"] == pid
    observed = [e for e in s.events("w1", "observed") if e["rule"] == "rss_over_limit"]
    assert observed[0]["verdict"] == "degraded"  # one poll over the limit is not yet a restart
    wait_until(lambda: s.running_pid("w1") not in (None, pid), 10, what="new w1")


def test_a_crash_loop_backs_off_then_fails_with_an_alert_and_is_not_restarted_again(stack):
    alerts = short_dir() / "alerts.jsonl"
    s = stack(
        # startsecs 5 s: however slow this machine is, a crash at once is a failed start (BACKOFF, then FATAL).
        {"w1": {**worker("crash", restart={"max_restarts": 2, "backoff_initial": "1s"}), "startsecs": "5s"}},
        {"alert": {"command": [PYTHON, "-c", f"import sys; open({str(alerts)!r}, 'a').write(sys.stdin.read())"],
                   "timeout": "5s"}},
    )
    try:
        try:
            gave_up = wait_until(lambda: s.events("w1", "gave_up"), 60, interval=0.2, what="gave_up")[0]
        except AssertionError as exc:
            raise AssertionError(f"{exc}; events: {s.events()}") from None
        starts = s.events("w1", "start")
        assert [e["attempt"] for e in starts] == [1, 2] and all(e["rule"] == "crash_loop" for e in starts)
        assert starts[0]["next_allowed_in"] > 0  # backoff between the watchdog's restarts
        assert gave_up["verdict"] == "unhealthy" and gave_up["alert"] is True
        alert = wait_until(lambda: alerts.exists() and alerts.read_text(), 10, what="alert command ran")
        assert json.loads(alert.splitlines()[0])["action"] == "gave_up"
        wait_until(lambda: s.events("w1", "alert_sent"), 10, what="alert result event")
        # Past the budget it stays down: supervisord's FATAL is left alone.
        time.sleep(2 * POLL)
        n = len(s.events("w1", "start"))
        time.sleep(3 * POLL)
        assert len(s.events("w1", "start")) == n and s.info("w1")["statename"] in ("FATAL", "STOPPED")
        prom = {(m.name, m.labels["process"], m.labels["kind"], m.labels["rank"]): m.value
                for f in text_string_to_metric_families((s.run_dir / "keel.prom").read_text())
                for m in f.samples if "process" in m.labels}
        assert prom[("keel_process_health", "w1", "command", "")] == 4.0
        assert prom[("keel_process_restarts_total", "w1", "command", "")] == 2.0
    finally:
        shutil.rmtree(alerts.parent, ignore_errors=True)


def test_a_worker_that_crashes_after_startsecs_every_time_is_a_crash_loop_too(stack):
    # supervisord's autorestart restarts it forever (it never becomes FATAL); the watchdog counts those restarts.
    # Each run lives 1.5 s past its start-up, so polls every 0.5 s see each new pid RUNNING.
    s = stack({"w1": worker("crash", extra="--crash-after 1.5", restart={"max_restarts": 2})})
    gave_up = wait_until(lambda: s.events("w1", "gave_up"), 45, interval=0.2, what="gave_up")[0]
    assert gave_up["rule"] == "crash_loop" and "by the backend" in gave_up["reason"]
    assert s.events("w1", "restart") == [] and s.events("w1", "start") == []  # the watchdog restarted nothing
    wait_until(lambda: s.info("w1")["statename"] == "STOPPED", 10, what="stopped")


def test_a_give_up_on_a_run_that_ignores_sigterm_is_published_at_once_and_the_watchdog_stays_responsive(stack):
    """A torchrun agent ignores SIGTERM: its stop takes its whole stop timeout (20 s here) before SIGKILL.

    The gave_up event and its alert are out while it is still STOPPING, and a SIGTERM to the watchdog (a
    `bin/launch down`) is obeyed then too: the watchdog used to wait the stop out, and was SIGKILLed by
    the down after its own 5 s, losing the event and the alert."""
    alerts = short_dir() / "alerts.jsonl"
    s = stack(
        # each run reports, then crashes 4 s on: supervisord restarts it, the watchdog counts a crash loop
        {"w1": {**worker("crash", extra="--crash-after 4 --ignore-sigterm", restart={"max_restarts": 1}),
                "stop": {"timeout": "20s"}}},
        {"alert": {"command": [PYTHON, "-c", f"import sys; open({str(alerts)!r}, 'a').write(sys.stdin.read())"],
                   "timeout": "5s"}},
    )
    try:
        gave_up = wait_until(lambda: s.events("w1", "gave_up"), 45, interval=0.2, what="gave_up")[0]
        assert gave_up["rule"] == "crash_loop" and "stop failed" not in gave_up["reason"]
        assert s.info("w1")["statename"] == "STOPPING"
        alert = wait_until(lambda: alerts.exists() and alerts.read_text(), 10, what="alert command ran")
        assert json.loads(alert.splitlines()[0])["action"] == "gave_up"
        watchdog = s.running_pid("watchdog")
        os.kill(watchdog, signal.SIGTERM)
        wait_until(lambda: s.info("watchdog")["pid"] != watchdog, 15, what="the watchdog exits on SIGTERM")
        assert s.events(None, "stopped")[-1]["reason"] == "signal received"
        assert s.info("w1")["statename"] == "STOPPING"  # all of that before the backend's SIGKILL ended w1
        wait_until(lambda: s.info("w1")["statename"] == "STOPPED", 30, what="w1 stopped by SIGKILL")
        assert s.events("w1", "start") == [] and s.events("w1", "restart") == []  # left alone, as given up
    finally:
        shutil.rmtree(alerts.parent, ignore_errors=True)


def test_a_sigkilled_watchdog_is_restarted_and_resumes_its_budget(stack):
    s = stack({"w1": worker("hang", extra="--hang-after 0.3", restart={"max_restarts": 2, "backoff_initial": "0.3s"},
                            health={"startup_grace": "2.5s"})})
    wait_until(lambda: s.events("w1", "restart"), 20, what="first restart")
    old = s.running_pid("watchdog")
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: (p := s.running_pid("watchdog")) not in (None, old), 15, what="supervisord restarts the watchdog")
    wait_until(lambda: s.events(None, "state_resumed"), 10, what="state resumed")
    gave_up = wait_until(lambda: s.events("w1", "gave_up"), 30, interval=0.2, what="gave_up")[0]
    restarts = s.events("w1", "restart")
    # Two restarts in all (one per watchdog), not two more after the restart: the budget was persisted.
    assert [e["attempt"] for e in restarts] == [1, 2]
    assert gave_up["attempt"] == 3
    # the state file is written at the end of the poll that wrote the event
    wait_until(lambda: json.loads((s.run_dir / "watchdog.state.json").read_text())["processes"]["w1"]["budget"]["gave_up"],
               10, what="the give-up persisted in watchdog.state.json")


def test_a_status_whose_pid_now_belongs_to_another_process_is_not_signalled(stack, reaper, tmp_path):
    s = stack({"w1": worker("silent", health={"startup_grace": "1s"})})
    wait_until(lambda: s.running_pid("w1"), 15, what="w1 running")
    log = tmp_path / "signals.log"
    sink = reaper.popen([PYTHON, str(REPO_ROOT / "tests/integration/standin_worker.py"), "--mode", "sink",
                         "--run-dir", str(tmp_path), "--signal-log", str(log)])
    wait_until(log.exists, 10, what="sink ready")
    # A stale status naming the sink's pid with another start time: the writer is gone, its pid reused.
    now = time.monotonic()
    with StatusWriter(s.run_dir, "w1") as w:
        from keel.status.models import utc_now

        w.write(ProcessStatus(name="w1", kind="command", host="h", pid=sink.pid,
                              pid_start_time=psutil.Process(sink.pid).create_time() - 1000, state=State.RUNNING,
                              started_at=utc_now(), heartbeat_wall=utc_now(), heartbeat_mono=now - 100,
                              progress_mono=now - 100, progress_wall=utc_now()))
    ev = wait_until(lambda: [e for e in s.events("w1") if e["rule"] == "pid_reused" and e["verdict"] == "unhealthy"],
                    15, what="pid_reused verdict")[0]
    assert ev["action"] in ("observed", "restart")
    wait_until(lambda: s.events("w1", "restart"), 10, what="w1 restarted through supervisord")
    time.sleep(2 * POLL)
    assert log.read_text() == ""  # not one signal reached the unrelated process
    assert psutil.Process(sink.pid).status() not in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE)


def test_sigterm_stops_the_watchdog_promptly_with_exit_0(reaper):
    s = Stack({"w1": worker("ok")})
    try:
        proc = reaper.popen([str(REPO_ROOT / "bin" / "watchdog"), "--config", str(s.build / "watchdog.json")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until(lambda: _status_pid(s.run_dir, "watchdog") == proc.pid, 15, what="watchdog running")
        # No supervisord here: the backend is unreachable, which is an event, not a crash.
        wait_until(lambda: s.events(None, "backend_error"), 10, what="backend_error event")
        # A re-rendered keel.json is followed without a restart; a broken one is an event, not a crash.
        keel_json = s.build / "keel.json"
        stack = json.loads(keel_json.read_text())
        stack["processes"]["w2"] = stack["processes"]["w1"]
        keel_json.write_text(json.dumps(stack))
        ev = wait_until(lambda: s.events(None, "stack_reloaded"), 10, what="stack_reloaded")[0]
        assert "w1, w2" in ev["reason"]
        keel_json.write_text("{not json")
        wait_until(lambda: s.events(None, "stack_reload_failed"), 10, what="stack_reload_failed")
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0, proc.stderr.read()
        assert s.events(None, "stopped")[-1]["reason"] == "signal received"  # it stopped on the signal, cleanly
        assert StatusReader(s.run_dir).read("watchdog").state is State.STOPPED
    finally:
        s.stop()


def test_a_bad_config_exits_2(tmp_path):
    done = subprocess.run([str(REPO_ROOT / "bin" / "watchdog"), "--config", str(tmp_path / "nope.json")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "cannot load configuration" in done.stderr
