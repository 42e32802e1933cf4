"""keel.watch.watchdog with a fake clock and the fake backend: decisions, budget, persistence, events, metrics
(the alert command, for real: test_watchdog_alerts)."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from keel.control.base import BackendUnavailable
from tests.support import FakeBackend
from keel.status.models import ProcessStatus, State
from keel.host.sampling import ResourceSampler
from keel.status.reader import StatusReader
from keel.status.snapshot import StatusWriter
from keel.render.contract import SameCrash
from keel.watch.watchdog import EVENTS_FILE, STATE_FILE, Watchdog, WatchdogSettings
from keel.render.resolve import stack_file
from tests.resolved import make_config, make_context

ME = os.getpid()
MY_START = psutil.Process(ME).create_time()
# w1's settings in config terms; keel.json is built from them by the real resolver (``stack_of``).
PROC = {
    "kind": "command",
    "command": ["true"],
    "health": {"heartbeat_timeout": "10s", "progress_timeout": "20s", "startup_grace": "30s"},
    "restart": {"policy": "always", "backoff_initial": "2s", "backoff_max": "8s", "max_restarts": 3, "window": "10m"},
    "stop": {"signal": "TERM", "timeout": "2s"},
}


def stack_of(root: Path, **processes: dict):
    """keel.json (a StackFile) for these processes, as keel.render.resolve builds it."""
    config = make_config(root, processes)
    return stack_file(config, make_context(root, config))


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Alerts:
    """Records what the watchdog would alert about (the real hook is tested on its own below)."""

    def __init__(self) -> None:
        self.sent: list[dict] = []

    def send(self, event: dict) -> bool:
        self.sent.append(event)
        return True

    def close(self, timeout: float | None = None) -> None:
        pass


@pytest.fixture
def env(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stack = stack_of(tmp_path, w1=PROC, watchdog={"kind": "watchdog"})
    assert stack.paths.run_dir == str(run_dir)
    settings = WatchdogSettings(name="watchdog", run_dir=run_dir, stack=tmp_path / "keel.json", poll_interval=2.0,
                                rss_consecutive_polls=3, stable_after=60.0, alert_command=None, alert_timeout=10.0,
                                prometheus_textfile=run_dir / "keel.prom", prometheus_interval=5.0,
                                heartbeat_interval=2.0, jitter="none", log_format="text", log_level="INFO",
                                same_crash=SameCrash(enabled=True, resumes=3, steps=5), incidents=None)
    clock = Clock()
    backend = FakeBackend(on_start=lambda name: ME)
    backend.add("w1", "RUNNING", pid=ME)
    alerts = Alerts()

    def make(stack=stack, **kw):
        kw.setdefault("sampler", ResourceSampler(nvml=None))
        return Watchdog(stack, settings, backend=backend, clock=clock, wall=lambda: 1.8e9, alerts=alerts,
                        control_sleep=lambda s: None, **kw)

    class Env:
        pass

    e = Env()
    e.root, e.run_dir, e.stack, e.settings, e.clock, e.backend, e.alerts, e.make = (
        tmp_path, run_dir, stack, settings, clock, backend, alerts, make)
    e.write = lambda **kw: write_status(run_dir, clock, **kw)
    e.events = lambda: [json.loads(line) for line in (run_dir / EVENTS_FILE).read_text().splitlines()]
    e.actions = lambda: [(c[0], c[1]) for c in backend.calls if c[0] != "status"]
    return e


def write_status(run_dir: Path, clock: Clock, hb_age=0.5, progress_age=0.5, pid=ME, start=MY_START,
                 state=State.RUNNING, wall_shift=timedelta(0), payload=None) -> None:
    wall = datetime.now(timezone.utc) + wall_shift
    with StatusWriter(run_dir, "w1") as w:
        w.write(ProcessStatus(
            name="w1", kind="command", host="h", pid=pid, pid_start_time=start, state=state, started_at=wall,
            heartbeat_wall=wall, heartbeat_mono=clock.t - hb_age, progress_wall=wall,
            progress_mono=None if progress_age is None else clock.t - progress_age, payload=payload or {"step": 3},
        ))


def test_a_healthy_process_is_left_alone_and_the_watchdog_skips_itself(env):
    wd = env.make()
    env.write()
    wd.poll_once()
    assert env.actions() == [] and set(wd.watched) == {"w1"}
    (ev,) = [e for e in env.events() if e["process"] == "w1"]
    assert (ev["action"], ev["verdict"], ev["rule"]) == ("observed", "ok", "ok")


def test_frozen_process_gets_sigcont_then_restart_and_events_say_why(env):
    wd = env.make()
    env.write(hb_age=11)
    wd.poll_once()
    assert env.actions() == [("signal", "w1"), ("restart", "w1")]
    assert env.backend.calls[1][2] == signal.SIGCONT
    restart = [e for e in env.events() if e["action"] == "restart"][0]
    assert restart["rule"] == "heartbeat_stale" and restart["verdict"] == "unhealthy"
    assert restart["attempt"] == 1 and restart["next_allowed_in"] == 2.0 and restart["pid"] == ME
    assert set(restart) >= {"ts", "process", "rule", "verdict", "action", "attempt", "next_allowed_in", "reason"}


def test_backoff_then_give_up_then_failed_and_alert(env):
    wd = env.make()
    env.write(hb_age=11)
    for _ in range(12):
        wd.poll_once()
        env.clock.t += 2.0
        if not wd.watched["w1"].budget.gave_up:
            env.write(hb_age=11)  # still frozen after every restart
    kinds = [a for a, _ in env.actions() if a != "signal"]
    assert kinds == ["restart", "restart", "restart", "stop"]
    ev = env.events()
    restarts = [e for e in ev if e["action"] == "restart"]
    assert [e["next_allowed_in"] for e in restarts] == [2.0, 4.0, 8.0]
    assert any(e["action"] == "deferred" for e in ev)
    gave_up = [e for e in ev if e["action"] == "gave_up"]
    assert len(gave_up) == 1 and env.alerts.sent == gave_up
    assert StatusReader(env.run_dir).read("w1").state is State.FAILED
    # Past the budget nothing more is done, however long it stays unhealthy.
    n = len(env.actions())
    for _ in range(5):
        env.clock.t += 100
        wd.poll_once()
    assert len(env.actions()) == n


def test_budget_state_survives_a_new_watchdog(env):
    wd = env.make()
    env.write(hb_age=11)
    wd.poll_once()
    env.clock.t += 2.5
    env.write(hb_age=11)
    wd.poll_once()
    assert [a for a, _ in env.actions() if a == "restart"] == ["restart", "restart"]
    saved = json.loads((env.run_dir / STATE_FILE).read_text())
    assert saved["processes"]["w1"]["budget"]["attempt"] == 2

    again = env.make()  # the old one was SIGKILLed; a new one starts
    assert any(e["action"] == "state_resumed" for e in env.events())
    env.clock.t += 4.5
    env.write(hb_age=11)
    again.poll_once()
    env.clock.t += 8.5
    env.write(hb_age=11)
    again.poll_once()
    assert [a for a, _ in env.actions() if a != "signal"] == ["restart", "restart", "restart", "stop"]


def test_an_action_is_persisted_before_it_is_announced(env):
    """A watchdog SIGKILLed just after its restart event must resume with that restart counted."""
    wd = env.make()
    seen: dict[str, int] = {}
    append = wd.events.append

    def record(event: dict) -> None:
        if event["action"] == "restart":  # what the state file holds as the event goes out
            seen["attempt"] = json.loads((env.run_dir / STATE_FILE).read_text())["processes"]["w1"]["budget"]["attempt"]
        append(event)

    wd.events.append = record
    env.write(hb_age=11)
    wd.poll_once()
    assert seen == {"attempt": 1}


def test_a_given_up_process_started_again_by_an_operator_is_watched_again(env):
    wd = env.make()
    w = wd.watched["w1"]
    w.budget.record_give_up()
    w.gave_up_pid = 1
    env.write()
    wd.poll_once()
    assert any(e["action"] == "resumed" for e in env.events()) and not w.budget.gave_up


def test_fatal_is_started_not_restarted(env):
    env.backend.processes["w1"].state = "FATAL"
    env.backend.processes["w1"].pid = None
    wd = env.make()
    wd.poll_once()
    assert env.actions() == [("start", "w1")]
    assert [e for e in env.events() if e["action"] == "start"][0]["rule"] == "crash_loop"


@pytest.mark.parametrize("state", ["STARTING", "BACKOFF", "STOPPED", "EXITED"])
def test_the_backends_own_restarts_and_stops_are_not_fought(env, state):
    env.backend.processes["w1"].state = state
    wd = env.make()
    env.write(hb_age=1000)
    for _ in range(3):
        wd.poll_once()
        env.clock.t += 10
    assert env.actions() == []


def test_autorestarts_by_the_backend_past_the_budget_are_a_crash_loop_given_up(env):
    wd = env.make()
    for pid in (101, 102, 103, 104, 105):  # supervisord restarted it each time it crashed after startsecs
        env.backend.processes["w1"].pid = pid
        wd.poll_once()
        env.clock.t += 2
    assert env.actions() == [("stop", "w1")]
    (ev,) = [e for e in env.events() if e["action"] == "gave_up"]
    assert ev["rule"] == "crash_loop" and env.alerts.sent == [ev]


def test_our_own_restart_is_not_counted_as_a_backend_restart(env):
    wd = env.make()
    env.write(hb_age=11)
    wd.poll_once()  # restart 1 (ours)
    env.backend.processes["w1"].pid = 201
    env.write()
    wd.poll_once()
    assert wd.watched["w1"].backend_restarts == []


def test_budget_is_reset_after_a_stable_period(env):
    wd = env.make()
    env.write(hb_age=11)
    wd.poll_once()
    for _ in range(32):  # 64 s healthy > stable_after 60 s
        env.clock.t += 2
        env.write()
        wd.poll_once()
    assert [e["action"] for e in env.events() if e["action"] == "budget_reset"] == ["budget_reset"]
    assert wd.watched["w1"].budget.attempt == 0 and wd.watched["w1"].budget.restarts_total == 1


def test_prometheus_textfile_is_rewritten_at_most_every_interval_unless_something_happened(env):
    wd = env.make()
    env.write()
    wd.poll_once()
    wd.write_prom()
    prom = env.run_dir / "keel.prom"
    first = prom.stat().st_ino  # each rewrite renames a new file over it
    env.clock.t += 1
    wd.poll_once()
    wd.write_prom()
    assert prom.stat().st_ino == first
    env.clock.t += 5
    wd.write_prom()
    assert prom.stat().st_ino != first


def test_a_re_rendered_stack_keeps_budgets_adds_and_drops_processes(env):
    wd = env.make()
    env.write(hb_age=11)
    wd.poll_once()
    wd.set_stack(stack_of(env.root, w1={**PROC, "restart": {**PROC["restart"], "max_restarts": 9}}, w2=PROC))
    assert set(wd.watched) == {"w1", "w2"}
    assert wd.watched["w1"].budget.restarts_total == 1 and wd.watched["w1"].budget.settings.max_restarts == 9
    wd.set_stack(stack_of(env.root, w2=PROC))
    assert set(wd.watched) == {"w2"}


def test_a_control_failure_is_an_event_not_a_crash(env):
    wd = env.make()
    env.write(hb_age=11)
    env.backend.failures["restart"] = [BackendUnavailable("socket refused")] * 3
    wd.poll_once()
    failed = [e for e in env.events() if e["action"] == "restart_failed"]
    assert len(failed) == 1 and "socket refused" in failed[0]["reason"]
    assert [a for a, _ in env.actions()].count("restart") == 3  # retried with backoff, then gave up for this poll


def test_an_unreachable_backend_is_reported_once_and_nothing_is_done(env):
    wd = env.make()
    env.write(hb_age=11)
    env.backend.failures["status"] = [BackendUnavailable("down")] * 6
    wd.poll_once()
    wd.poll_once()
    assert [e["action"] for e in env.events() if e["action"].startswith("backend")] == ["backend_error"]
    assert env.actions() == []
    wd.poll_once()
    assert [e["action"] for e in env.events() if e["action"].startswith("backend")] == ["backend_error", "backend_ok"]


@pytest.mark.parametrize("shift", [timedelta(hours=1), timedelta(hours=-1)])
def test_a_wall_clock_jump_changes_nothing(env, shift):
    wall = [1.8e9]
    wd = Watchdog(env.stack, env.settings, backend=env.backend, clock=env.clock, wall=lambda: wall[0],
                  alerts=env.alerts, sampler=ResourceSampler(nvml=None))
    for i in range(5):
        env.write(wall_shift=shift if i >= 2 else timedelta(0))
        if i == 2:
            wall[0] += shift.total_seconds()
        wd.poll_once()
        env.clock.t += 2
    assert env.actions() == []


def test_a_reused_pid_is_never_signalled(env):
    # The status names our pid, but with another start time: the process that wrote it is gone.
    wd = env.make()
    env.write(hb_age=11, start=MY_START - 1000)
    wd.poll_once()
    assert ("signal", "w1") not in env.actions()
    assert [e["rule"] for e in env.events() if e["process"] == "w1"][0] == "pid_reused"


class BigSampler:
    """Reports the real sample but with the process tree's RSS replaced."""

    def __init__(self, rss: int) -> None:
        self.real = ResourceSampler(nvml=None)
        self.rss = rss

    def sample(self, pids):
        s = self.real.sample(pids)
        return replace(s, processes={p: replace(x, rss_bytes=self.rss) for p, x in s.processes.items()})

    def close(self) -> None:
        pass


def test_rss_over_limit_for_n_polls_restarts_with_an_rss_event(env):
    limited = stack_of(env.root, w1={**PROC, "limits": {"memory": "100MiB"}}, watchdog={"kind": "watchdog"})
    wd = env.make(limited, sampler=BigSampler(200 << 20))
    for _ in range(3):
        env.write()
        wd.poll_once()
        env.clock.t += 2
    assert [a for a, _ in env.actions()] == ["restart"]
    observed = [(e["verdict"], e["rule"]) for e in env.events() if e["process"] == "w1"]
    assert observed[0] == ("degraded", "rss_over_limit") and observed[-1] == ("unhealthy", "rss_over_limit")


def test_prometheus_textfile(env):
    wd = env.make()
    env.write(payload={"step": 7, "loss": "NaN"})
    wd.poll_once()
    wd.write_prom()
    text = (env.run_dir / "keel.prom").read_text()
    samples = {(s.name, s.labels.get("process"), s.labels.get("state")): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples[("keel_process_up", "w1", None)] == 1.0
    assert samples[("keel_process_health", "w1", None)] == 3.0  # NaN loss: unhealthy
    assert samples[("keel_process_state", "w1", "running")] == 1.0
    assert samples[("keel_process_restarts_total", "w1", None)] == 1.0
    assert samples[("keel_training_step", "w1", None)] == 7.0
    assert samples[("keel_gpu_metrics_available", None, None)] == 0.0
    assert samples[("keel_process_resident_memory_bytes", "w1", None)] > 0
    assert samples[("keel_process_verdict", "w1", None)] == 1.0
    assert not list(env.run_dir.glob("keel.prom.*"))  # no temp file left


def test_the_watchdog_publishes_per_process_the_verdict_restarts_and_last_action_that_prom_shows(env):
    """One truth: the status payload's entries (what bin/status and the page read) are keel.prom's rows."""
    wd = env.make()
    env.write(hb_age=11)
    wd.poll_once()
    fields = wd.status_fields()
    entry = fields["processes"]["w1"]
    assert fields["processes_watched"] == ["w1"] and fields["poll_interval"] == 2.0
    assert (entry.health, entry.rule, entry.restarts_total) == ("unhealthy", "heartbeat_stale", 1)
    assert entry.last_action == "restart" and "frozen" in entry.last_action_reason and entry.last_action_at
    row = next(r for r in wd.prom_rows() if r.process == "w1")
    assert (row.health, row.restarts_total) == (entry.health, entry.restarts_total)
