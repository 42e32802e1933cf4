"""keel.watch.alerts for real: the alert command gets the event on stdin, is killed after its timeout, fails loudly."""

from __future__ import annotations

import json
import signal

import pytest

from keel.watch.alerts import AlertHook, run_alert_command
from tests.support import is_alive, wait_until


# --------------------------------------------------------------------------- the alert hook, for real


@pytest.mark.slow  # starts a real process
def test_alert_command_gets_the_event_as_json_on_stdin(tmp_path):
    out = tmp_path / "alert.json"
    res = run_alert_command(["sh", "-c", f"cat > {out}"], {"action": "gave_up", "process": "w1"}, timeout=5)
    assert res["rc"] == 0 and json.loads(out.read_text()) == {"action": "gave_up", "process": "w1"}


@pytest.mark.slow  # starts a real process
def test_a_slow_alert_command_never_blocks_and_is_killed_after_its_timeout(tmp_path):
    results = []
    pidfile = tmp_path / "pid"
    hook = AlertHook(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 30"], timeout=0.5,
                     on_result=lambda e, r: results.append(r))
    assert hook.send({"action": "gave_up"})
    assert not results  # send only queued it: the command (sleeping 30 s, killed at 0.5 s) has not finished
    wait_until(lambda: results, 5, what="alert result")
    assert results[0]["timed_out"] and results[0]["rc"] == -signal.SIGKILL
    assert not is_alive(int(pidfile.read_text()))
    hook.close()


@pytest.mark.slow  # starts a real process
def test_a_failing_or_missing_alert_command_is_reported(tmp_path):
    assert run_alert_command(["sh", "-c", "exit 3"], {}, 5)["rc"] == 3
    missing = run_alert_command([str(tmp_path / "nope")], {}, 5)
    assert missing["rc"] is None and "cannot run" in missing["error"]
    assert AlertHook(None).send({}) is False
