"""keel.watch.endings.classify and the evidence parsers of keel.watch.end_evidence, on recorded inputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from keel.status.exits import exit_record_for, read_exit_record, write_exit_record
from keel.control.supervisord import parse_supervisord_exit
from keel.watch.end_evidence import cgroup_of, parse_oom_kill
from keel.watch.endings import END_REASONS, End, EndEvidence, EndState, classify

MIB = 2**20


@pytest.mark.parametrize("ev, reason, words", [
    (EndEvidence(pid=1, exit_code=0, has_record=True, step=100), End.EXITED, "exited cleanly at step 100"),
    (EndEvidence(pid=1, exit_code=1, has_record=True, step=7, exception="ValueError: boom"), End.CRASHED,
     "crashed at step 7: ValueError: boom (exit code 1)"),
    (EndEvidence(pid=1, exit_code=3, last_error="no such file"), End.CRASHED, "crashed: exit code 3: no such file"),
    (EndEvidence(pid=1, signal="SIGKILL"), End.KILLED, "killed by SIGKILL"),
    (EndEvidence(pid=1, signal="SIGSEGV"), End.KILLED, "killed by SIGSEGV"),
    (EndEvidence(pid=1, signal="SIGKILL", oom_kills=1), End.OOM_KILLED, "OOM-killed (cgroup memory.events oom_kill +1)"),
    (EndEvidence(pid=1, signal="SIGKILL", oom_kills=0, rss_bytes=950 * MIB, memory_limit=1000 * MIB), End.OOM_KILLED,
     "killed by SIGKILL, RSS near limit (950 MiB of 1000 MiB)"),
    (EndEvidence(pid=1, signal="SIGKILL", rss_bytes=100 * MIB, memory_limit=1000 * MIB), End.KILLED, "killed by SIGKILL"),
    (EndEvidence(pid=1, exit_code=0, has_record=True, stop_signal="SIGTERM", step=4), End.PREEMPTED,
     "preempted: SIGTERM from outside the stack at step 4"),
    (EndEvidence(pid=1, signal="SIGTERM"), End.PREEMPTED, "preempted: SIGTERM from outside the stack"),
    (EndEvidence(pid=1, backend_state="STOPPED", exit_code=0, has_record=True, stop_signal="SIGTERM"), End.STOPPED,
     "stopped by an operator"),
    # told once the backend runs the next run (the stack brought down and up): its own record of the stop
    (EndEvidence(pid=1, backend_state="RUNNING", backend_stopped=True, exit_code=0, has_record=True,
                 stop_signal="SIGTERM", step=9), End.STOPPED, "stopped by an operator at step 9"),
    (EndEvidence(pid=1, watchdog_action="restart", watchdog_rule="progress_stale", watchdog_reason="progress 3s old"),
     End.HUNG, "hung: killed by the watchdog (progress 3s old)"),
    (EndEvidence(pid=1, watchdog_action="restart", watchdog_rule="heartbeat_stale", watchdog_reason="heartbeat 3s old"),
     End.FROZEN, "frozen: killed by the watchdog (heartbeat 3s old)"),
    (EndEvidence(pid=1, watchdog_action="restart", watchdog_rule="rss_over_limit", watchdog_reason="RSS 2 GiB"),
     End.RESTARTED, "restarted by the watchdog (RSS 2 GiB)"),
    (EndEvidence(pid=1, watchdog_action="gave_up", watchdog_reason="3 restarts", backend_state="STOPPED"),
     End.GAVE_UP, "gave up: 3 restarts"),
    (EndEvidence(pid=1), End.UNKNOWN, "ended: cause unknown (the backend gave no exit status)"),
])
def test_each_end_is_classified_with_its_words(ev, reason, words):
    end = classify(ev)
    assert (end.reason, end.summary) == (reason.value, words)
    assert end.reason in END_REASONS
    assert EndState.from_dict(end.to_dict()) == end


def test_the_watchdogs_own_action_outranks_what_the_backend_says():
    ev = EndEvidence(pid=1, backend_state="STOPPED", signal="SIGKILL", watchdog_action="restart",
                     watchdog_rule="heartbeat_stale")
    assert classify(ev).reason == "frozen"


# Recorded from supervisord 4.2 (its main log, loglevel info).
SUPERVISORD_LOG = """\
2026-12-02 17:40:01,100 INFO spawned: 'kt-w1' with pid 100
2026-12-02 17:40:02,200 INFO success: kt-w1 entered RUNNING state, process has stayed up for > than 1 seconds (startsecs)
2026-12-02 17:40:05,300 WARN exited: kt-w1 (terminated by SIGKILL; not expected)
2026-12-02 17:40:06,400 INFO spawned: 'kt-w1' with pid 200
2026-12-02 17:40:06,401 INFO spawned: 'kt-w2' with pid 201
2026-12-02 17:40:09,500 WARN exited: kt-w2 (exit status 0; expected)
2026-12-02 17:40:09,600 WARN exited: kt-w1 (exit status 1; not expected)
2026-12-02 17:40:10,700 INFO spawned: 'kt-w1' with pid 300
2026-12-02 17:40:12,800 INFO stopped: kt-w1 (terminated by SIGTERM)
"""


@pytest.mark.parametrize("program, pid, expected", [
    ("kt-w1", 100, (None, "SIGKILL", False)),
    ("kt-w1", 200, (1, None, False)),
    ("kt-w2", 201, (0, None, False)),
    ("kt-w1", 300, (None, "SIGTERM", True)),  # "stopped:": supervisord stopped it itself
    ("kt-w1", 999, None),  # a run the log does not hold (rotated away)
    ("kt-w1", None, (None, "SIGTERM", True)),
])
def test_supervisords_log_says_how_each_run_ended(program, pid, expected):
    assert parse_supervisord_exit(SUPERVISORD_LOG, program, pid) == expected


def test_a_run_that_has_not_ended_in_the_log_has_no_exit_yet():
    assert parse_supervisord_exit(SUPERVISORD_LOG + "2026 INFO spawned: 'kt-w1' with pid 400\n", "kt-w1", 400) is None


def test_oom_kill_counters_of_cgroup_v2_and_v1_are_read():
    v2 = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n"
    v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 5\n"
    assert parse_oom_kill(v2) == 2 and parse_oom_kill(v1) == 5 and parse_oom_kill("oom 1\n") is None


def test_the_cgroup_file_is_v2_memory_events_else_v1_oom_control(tmp_path: Path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "memory.events").write_text("oom_kill 0\n")
    (tmp_path / "memory" / "x").mkdir(parents=True)
    (tmp_path / "memory" / "x" / "memory.oom_control").write_text("oom_kill 0\n")
    assert cgroup_of("0::/a/b\n", tmp_path) == str(tmp_path / "a" / "b" / "memory.events")
    assert cgroup_of("4:memory:/x\n0::/\n", tmp_path) == str(tmp_path / "memory" / "x" / "memory.oom_control")
    assert cgroup_of("1:cpu:/\n", tmp_path) is None


def test_an_exit_record_names_its_pid_exception_and_step(tmp_path: Path):
    try:
        raise ValueError("boom at 5")
    except ValueError as exc:
        record = exit_record_for(1, 5, exc, None)
    write_exit_record(tmp_path, "trainer", record)
    back = read_exit_record(tmp_path, "trainer", record.pid)
    assert back is not None and back.exception == "ValueError: boom at 5" and back.step == 5
    assert "raise ValueError" in (back.traceback or "")
    assert read_exit_record(tmp_path, "trainer", record.pid + 1) is None  # another run's end is not this run's
    assert read_exit_record(tmp_path, "trainer", None) is None  # a run with no pid has no record (not the last one)
    (tmp_path / "trainer.exit.json").write_text("{half")
    assert read_exit_record(tmp_path, "trainer", record.pid) is None


def test_a_run_that_reported_failed_and_was_restarted_by_the_watchdog_still_crashed():
    ev = EndEvidence(pid=1, exit_code=1, has_record=True, step=5, exception="RuntimeError: x",
                     watchdog_action="restart", watchdog_rule="state_failed", watchdog_reason="reported state=failed")
    assert classify(ev).summary == "crashed at step 5: RuntimeError: x (exit code 1)"
