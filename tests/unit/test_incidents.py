"""Incident bundles: parsing py-spy and faulthandler output, the stuck thread, atomic write, retention, listing."""

from __future__ import annotations

import json
import os
import time

import pytest

from keel.watch.incidents import Incident, incident_id, list_incidents, load_incident, prune, tail_jsonl, write_incident
from keel.watch.stacks import Frame, ProcessStacks, Thread, format_stacks, parse_faulthandler, parse_py_spy, stuck_thread

# Recorded from `py-spy dump --pid N --json --full-filenames` (0.4.3), trimmed.
PY_SPY_JSON = json.dumps([
    {"pid": 5935, "thread_id": 139915507656384, "thread_name": "keel-heartbeat-trainer", "os_thread_id": 5938,
     "active": False, "owns_gil": False, "frames": [
         {"name": "Event.wait", "filename": "/usr/lib/python3.11/threading.py", "line": 629},
         {"name": "Heartbeat._run", "filename": "/srv/keel/keel/status/heartbeat.py", "line": 37}]},
    {"pid": 5935, "thread_id": 139915522276224, "thread_name": "MainThread", "os_thread_id": 5935,
     "active": False, "owns_gil": False, "frames": [
         {"name": "wait_for_the_lock_that_never_comes", "filename": "/srv/app/train.py", "line": 4},
         {"name": "<module>", "filename": "/srv/app/train.py", "line": 10}]},
])

FAULTHANDLER = """\
Thread 0x00007f126c69c6c0 (most recent call first):
  File "/srv/keel/keel/status/heartbeat.py", line 37 in _run
  File "/usr/lib/python3.11/threading.py", line 982 in run

Current thread 0x00007f126d403b80 (most recent call first):
  File "/srv/app/train.py", line 4 in wait_for_the_lock_that_never_comes
  File "/srv/keel/trainer/__main__.py", line 149 in main
  File "/srv/keel/trainer/__main__.py", line 261 in <module>
  File "<frozen runpy>", line 88 in _run_code
"""


def test_py_spy_json_is_parsed_innermost_frame_first_and_the_main_thread_is_the_stuck_one():
    threads = parse_py_spy(PY_SPY_JSON)
    assert [t.name for t in threads] == ["keel-heartbeat-trainer", "MainThread"]
    assert threads[1].frames[0] == Frame("wait_for_the_lock_that_never_comes", "/srv/app/train.py", 4)
    stacks = [ProcessStacks(pid=5935, role="process", method="py-spy", threads=threads)]
    assert stuck_thread(stacks).name == "MainThread"
    text = format_stacks(stacks)
    first = text.split("\n\n")[0]
    assert first.startswith("== likely stuck: pid 5935 thread MainThread")
    assert "wait_for_the_lock_that_never_comes (/srv/app/train.py:4)" in first


@pytest.mark.parametrize("bad", ["", "{}", "not json", '[{"frames": []}]'])
def test_py_spy_output_that_is_not_its_json_is_an_error(bad):
    with pytest.raises((ValueError, KeyError)):
        parse_py_spy(bad)


def test_faulthandler_text_is_parsed_and_the_thread_running_module_code_is_the_stuck_one():
    threads = parse_faulthandler(FAULTHANDLER, 77)
    assert len(threads) == 2 and [len(t.frames) for t in threads] == [2, 4]
    t = stuck_thread([ProcessStacks(pid=77, role="process", threads=threads)])
    assert t.frames[0] == Frame("wait_for_the_lock_that_never_comes", "/srv/app/train.py", 4)


def test_children_come_after_the_supervised_process():
    child = Thread(7, "7", "MainThread", (Frame("worker_loop", "/w.py", 1),))
    parent = Thread(5, "5", "MainThread", (Frame("train", "/t.py", 2),))
    stacks = [ProcessStacks(7, "child", threads=[child]), ProcessStacks(5, "process", threads=[parent])]
    assert stuck_thread(stacks) is parent


def _incident(wall: float, process: str = "trainer") -> Incident:
    inc = Incident(id=incident_id(wall, process), process=process, pid=5, wall=wall,
                   verdict={"level": "unhealthy", "rule": "progress_stale", "reason": "hung"}, action="restart",
                   log=["line 1", "line 2"], metrics=[{"step": 3}])
    inc.stacks = [ProcessStacks(5, "process", method="py-spy", threads=parse_py_spy(PY_SPY_JSON))]
    return inc


def test_a_bundle_is_written_whole_and_read_back(tmp_path):
    path = write_incident(tmp_path, _incident(1.8e9), keep=5)
    assert path.parent == tmp_path / "incidents" and path.name.endswith("-trainer")
    assert sorted(os.listdir(path)) == ["log.txt", "metrics.jsonl", "stacks.json", "stacks.txt", "summary.json"]
    assert not [p for p in os.listdir(path.parent) if p.startswith(".")]  # no temp dir left
    summary, files = load_incident(tmp_path, "latest")
    assert summary["stuck"]["function"] == "wait_for_the_lock_that_never_comes" and summary["stuck"]["line"] == 4
    assert files["log.txt"] == "line 1\nline 2\n" and json.loads(files["metrics.jsonl"]) == {"step": 3}
    assert load_incident(tmp_path, path.name[:8])[0]["id"] == path.name  # a unique prefix works
    with pytest.raises(LookupError, match="no incident 'nope'"):
        load_incident(tmp_path, "nope")


def test_retention_keeps_the_newest_and_removes_stale_temp_dirs(tmp_path):
    names = [write_incident(tmp_path, _incident(1.8e9 + i), keep=3).name for i in range(5)]
    assert [s["id"] for s in list_incidents(tmp_path)] == names[:1:-1]  # newest first, the two oldest gone
    stale = tmp_path / "incidents" / ".tmp-old"
    stale.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    fresh = tmp_path / "incidents" / ".tmp-now"
    fresh.mkdir()
    assert prune(tmp_path / "incidents", 3) == [".tmp-old"] and fresh.exists()


def test_two_incidents_in_the_same_millisecond_are_both_kept(tmp_path):
    a = write_incident(tmp_path, _incident(1.8e9), keep=5)
    b = write_incident(tmp_path, _incident(1.8e9), keep=5)
    assert a != b and b.name == a.name + ".1" and len(list_incidents(tmp_path)) == 2


def test_an_unreadable_summary_is_listed_with_its_error(tmp_path):
    path = write_incident(tmp_path, _incident(1.8e9), keep=5)
    (path / "summary.json").write_text("{torn")
    (entry,) = list_incidents(tmp_path)
    assert "unreadable summary.json" in entry["error"]


def test_tail_jsonl_skips_torn_lines(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text("".join(json.dumps({"step": i}) + "\n" for i in range(10)) + '{"step": 1')
    assert [r["step"] for r in tail_jsonl(p, 3)] == [7, 8, 9]
    assert tail_jsonl(tmp_path / "missing", 3) == []


def test_the_page_panel_shows_the_newest_incident_and_its_stuck_frames(tmp_path):
    # The collector reads the newest bundle off the loop (dashboard.rundir), once per new bundle; the
    # panel draws what it read.
    import asyncio

    from dashboard.collector import Collector
    from dashboard.incident_panel import IncidentPanel
    from tests.unit.test_dashboard_page import make_cfg

    cfg = make_cfg(tmp_path)
    c = Collector(cfg)
    panel = IncidentPanel(c)
    asyncio.run(c.cycle())
    panel.refresh()
    assert "none" in panel.div.text
    write_incident(cfg.run_dir, _incident(1.8e9, "old"), keep=5)
    newest = write_incident(cfg.run_dir, _incident(1.8e9 + 5), keep=5)
    asyncio.run(c.cycle())
    serial = c.incident_serial
    panel.refresh()
    assert newest.name in panel.div.text and "old" not in panel.div.text
    assert "stuck in wait_for_the_lock_that_never_comes (/srv/app/train.py:4)" in panel.div.text
    asyncio.run(c.cycle())  # nothing new: not read again
    assert c.incident_serial == serial
    c.runner.close()


def test_a_capture_left_pending_by_a_hang_that_ended_is_dropped(tmp_path):
    # A hang that recovers before its restart leaves its capture behind; a later hang of the same pid
    # must get fresh stacks, not that stale bundle.
    from keel.watch.recorder import IncidentRecorder, _Pending

    rec = IncidentRecorder(None, tmp_path, emit=lambda **_: None)
    rec._pending["trainer"] = _Pending(123, 0.0)
    rec.settle("trainer", "progress_stale")  # still hung: the capture is still wanted
    assert "trainer" in rec._pending
    rec.settle("trainer", "ok")
    assert "trainer" not in rec._pending
