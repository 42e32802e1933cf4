"""End states under a real supervisord: every end this machine can produce, classified once and shown the same
way in the ``ended`` event, the watchdog's published status and keel.prom; and a trainer that crashes at the
same step after every resume is given up on early, with an alert, before its restart budget is spent.

OOM kills cannot be produced here without a memory cgroup of our own: tests/unit/test_endings.py covers them
with recorded cgroup and RSS inputs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from keel.control.supervisord import SupervisordBackend
from keel.status.models import ProcessStatus, WatchdogStatus
from keel.status.reader import StatusReader
from tests.integration.test_watchdog import stack, worker  # noqa: F401 - the fixture
from tests.integration.test_watchdog_fixtures import short_dir
from tests.support import PYTHON, wait_until

pytestmark = pytest.mark.slow

CRASH_STEP = 5


def crash_at_step_entry(run) -> None:
    """Resumes from its checkpoint, checkpoints every step before CRASH_STEP, and dies at CRASH_STEP every time."""
    state = run.load_checkpoint() or {"step": 0}
    step = int(state["step"])
    while not run.should_stop():
        step += 1
        run.report(step=step, loss=1.0)
        if step == CRASH_STEP:
            raise RuntimeError(f"deterministic failure at step {step}")
        run.save_checkpoint({"step": step})


def _published(run_dir: Path, name: str):
    st = StatusReader(run_dir).read("watchdog")
    if not isinstance(st, ProcessStatus) or not isinstance(st.payload, WatchdogStatus):
        return None
    return st.payload.processes.get(name)


def _prom_has(run_dir: Path, name: str, reason: str) -> bool:
    path = run_dir / "keel.prom"
    text = path.read_text() if path.exists() else ""
    return any(line.startswith("keel_process_last_exit{") and f'process="{name}"' in line
               and f'reason="{reason}"' in line and line.endswith(" 1.0") for line in text.splitlines())


def _shown_everywhere(s, name: str, reason: str, words: str) -> dict:
    """The last ``ended`` event of ``name`` says ``reason`` with ``words``; status and keel.prom say the same."""
    def ended():
        evs = s.events(name, "ended")
        return evs and evs[-1]["end"] == reason and words in evs[-1]["reason"] and evs[-1]
    try:
        ev = wait_until(ended, 60, interval=0.2, what=f"{name} ended: {reason}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; events: {s.events(name)}") from None
    entry = wait_until(lambda: (e := _published(s.run_dir, name)) and e.end == reason and e, 15,
                       what=f"{name} published end {reason}")
    assert entry.end_reason == ev["reason"]
    wait_until(lambda: _prom_has(s.run_dir, name, reason), 15, what=f"keel.prom last_exit {name} {reason}")
    return ev


def test_a_trainer_crashing_at_the_same_step_after_every_resume_is_given_up_on_early(stack):
    alerts = short_dir() / "alerts.jsonl"
    trainer = {
        "kind": "trainer", "entry": "tests.integration.test_end_states:crash_at_step_entry", "gpus": [],
        "num_workers": 0, "checkpoint": {"every_steps": 1, "every_seconds": "1h"},
        "report": {"status_interval": "50ms", "metrics_interval": "1s"},
        "health": {"heartbeat_interval": "0.3s", "heartbeat_timeout": "10s", "startup_grace": "60s"},
        "restart": {"policy": "on-failure", "backoff_initial": "0.5s", "backoff_max": "1s", "max_restarts": 10,
                    "window": "10m"},
        "stop": {"timeout": "5s"}, "startsecs": "1s",
    }
    s = stack({"t1": trainer}, {
        "same_crash": {"resumes": 2, "steps": 0},
        "alert": {"command": [PYTHON, "-c", f"import sys; open({str(alerts)!r}, 'a').write(sys.stdin.read())"],
                  "timeout": "5s"}})
    try:
        try:
            gave_up = wait_until(lambda: s.events("t1", "gave_up"), 240, interval=0.2, what="gave_up")[0]
        except AssertionError as exc:
            raise AssertionError(f"{exc}; events: {s.events('t1')}") from None
        want = f"crashes at step {CRASH_STEP} each time: RuntimeError: deterministic failure at step {CRASH_STEP}"
        assert gave_up["rule"] == "same_crash", "\n".join(f"{e['action']} {e['rule']} {e.get('end')} {e['reason']}" for e in s.events("t1"))
        assert want in gave_up["reason"] and gave_up["alert"] is True
        crashes = [e for e in s.events("t1", "ended") if e["end"] == "crashed"]
        assert len(crashes) == 3  # the first run and two resumes: not the budget of 10
        for e in crashes:
            assert e["step"] == CRASH_STEP and e["exception"].startswith("RuntimeError: deterministic")
            assert e["reason"].startswith(f"crashed at step {CRASH_STEP}: RuntimeError") and "exit code 1" in e["reason"]
        assert not any(e["rule"] == "crash_loop" for e in s.events("t1"))
        alert = wait_until(lambda: alerts.exists() and alerts.read_text(), 15, what="alert command ran")
        assert json.loads(alert.splitlines()[0])["rule"] == "same_crash"
        _shown_everywhere(s, "t1", "gave_up", want)
        wait_until(lambda: s.info("t1")["statename"] in ("STOPPED", "FATAL", "EXITED"), 15, what="stays down")
    finally:
        shutil.rmtree(alerts.parent, ignore_errors=True)


def _plain(code: str, policy: str = "never") -> dict:
    """A plain command (no status file): judged by the backend only; its end by the backend's exit status."""
    return {"kind": "command", "command": [PYTHON, "-c", code], "restart": {"policy": policy},
            "stop": {"timeout": "2s"}, "startsecs": "1s"}


def wait_until_watched() -> None:
    """Return once the watchdog has published this process's run (its pid): a run that ends before the
    watchdog first looks at it has no tracked run to end (its first poll finds it already EXITED), and
    on a loaded box the watchdog can start later than a 1.5 s program lives. Run by the stack's
    programs, as their first line."""
    run_dir = Path(json.loads(Path(os.environ["KEEL_CONFIG"]).read_text())["paths"]["run_dir"])
    while (e := _published(run_dir, os.environ["KEEL_PROCESS"])) is None or e.pid != os.getpid():
        time.sleep(0.05)


_WATCHED = "from tests.integration.test_end_states import wait_until_watched; wait_until_watched(); "


def test_every_end_this_machine_can_produce_is_shown_the_same_way_everywhere(stack):
    sleep = "import time; time.sleep(600)"
    s = stack({
        "clean": _plain(_WATCHED + "import time; time.sleep(1.5)"),
        "crash": _plain(_WATCHED + "import sys, time; time.sleep(1.5); sys.exit(3)"),
        "killed": _plain(sleep),
        "preempted": _plain(sleep),  # the default SIGTERM disposition: it dies of the signal
        "operator": _plain(sleep),
        "hung": worker("hang"),
        "frozen": worker("ok"),
    })
    running = lambda name: wait_until(lambda: s.running_pid(name), 30, what=f"{name} running")  # noqa: E731
    for name in ("killed", "preempted", "operator", "frozen"):
        running(name)
    seen = lambda n: (e := _published(s.run_dir, n)) is not None and e.pid is not None and e.pid == s.running_pid(n)  # noqa: E731
    wait_until(lambda: all(seen(n) for n in ("killed", "preempted", "operator", "frozen")), 30,
               what="the watchdog judged their runs")
    os.kill(s.running_pid("killed"), signal.SIGKILL)
    os.kill(s.running_pid("preempted"), signal.SIGTERM)
    programs = {n: p["program"] for n, p in s.keel["processes"].items()}
    SupervisordBackend(str(s.sock), programs).stop("operator")
    os.kill(s.running_pid("frozen"), signal.SIGSTOP)

    _shown_everywhere(s, "clean", "exited", "exited cleanly")
    _shown_everywhere(s, "crash", "crashed", "crashed: exit code 3")
    ev = _shown_everywhere(s, "killed", "killed", "killed by SIGKILL")
    assert ev["signal"] == "SIGKILL"
    _shown_everywhere(s, "preempted", "preempted", "preempted: SIGTERM from outside the stack")
    _shown_everywhere(s, "operator", "stopped", "stopped by an operator")
    ev = _shown_everywhere(s, "hung", "hung", "hung: killed by the watchdog")
    assert "progress" in ev["reason"]
    ev = _shown_everywhere(s, "frozen", "frozen", "frozen: killed by the watchdog")
    assert "heartbeat" in ev["reason"]
    # Each end was classified once: no process has a second, different end for the same run.
    for name in ("clean", "crash", "killed", "preempted", "operator"):
        assert len(s.events(name, "ended")) == 1, s.events(name, "ended")


def test_a_run_stopped_with_the_stack_is_an_operator_stop_once_the_stack_is_back(stack, reaper):
    """``bin/launch down`` then ``up`` (``make stop``, ``make run``): the watchdog, stopped with the rest,
    tells the end of the run it was watching when it comes back, and the backend then runs a new run.
    supervisord's log still says it stopped that run itself: an operator's stop, not a preemption
    (which is what the run's own record, "obeyed SIGTERM", said alone: the page and keel.prom showed
    every ``make stop`` as one)."""
    s = stack({"w": worker("ok")})
    pid = wait_until(lambda: (e := _published(s.run_dir, "w")) is not None and e.pid is not None
                     and e.pid == s.running_pid("w") and e.pid, 30, what="the watchdog judged w's run")
    backend = SupervisordBackend(str(s.sock), {n: p["program"] for n, p in s.keel["processes"].items()})
    backend.stop("watchdog")  # first: it must not see w stop (stopped all at once, it sometimes does)
    backend.shutdown()
    s.proc.wait(timeout=30)
    s.start(reaper)
    ev = wait_until(lambda: [e for e in s.events("w", "ended") if e["pid"] == pid], 60, what="w's run ended")[0]
    assert ev["end"] == "stopped" and ev["reason"] == "stopped by an operator", ev
    entry = wait_until(lambda: (e := _published(s.run_dir, "w")) and e.end and e, 15, what="w's end published")
    assert entry.end == "stopped"
