"""dashboard.present: rows, labels and colours from keel.watch.verdicts; every typed read error renders as itself."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from keel.status.models import ProcessStatus, State, TrainingStatus
from keel.status.results import Corrupt, Missing, Stale, TooLarge, Unreadable, UnknownVersion

from keel.host.sampling import HostSample, ProcessSample, ResourceSample
from keel.watch.verdicts import BY_WATCHDOG, ProcessHealth, health_from_files

from dashboard.config import ProcessInfo, stack_processes
from keel.render.resolve import stack_file
from tests.resolved import make_config, make_context
from dashboard.present import (
    BAD, GREY, OK, WARN, event_line, fmt_age, fmt_num, health_verdict, overall, process_rows, training_summary,
)

NOW_WALL = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
NOW = 1000.0


def stack_of(**processes):
    """keel.json as keel.render.resolve builds it, as dashboard.config hands it on (one ProcessInfo each)."""
    root = Path("/nonexistent/keel")
    config = make_config(root, processes)
    return {p.name: p for p in stack_processes(stack_file(config, make_context(root, config)))}


HEALTH = {"heartbeat_timeout": "10s", "progress_timeout": "20s", "startup_grace": "30s"}
TRAINER: ProcessInfo = stack_of(trainer={"kind": "trainer", "health": HEALTH, "limits": {"memory": "100MiB"}})["trainer"]


def status(state=State.RUNNING, hb_age=1.0, progress_age=1.0, kind="trainer", name="trainer", host="h",
           started_ago=100.0, **payload) -> ProcessStatus:
    return ProcessStatus(
        name=name, kind=kind, host=host, pid=4242, pid_start_time=123.0, state=state,
        started_at=NOW_WALL - timedelta(seconds=started_ago),
        heartbeat_wall=NOW_WALL, heartbeat_mono=NOW - hb_age,
        progress_wall=NOW_WALL if progress_age is not None else None,
        progress_mono=NOW - progress_age if progress_age is not None else None,
        payload=TrainingStatus(run_id="r", step=7, loss=0.5, **payload) if kind == "trainer" else None,
    )




def sample(alive=True, create_time=123.0, rss_bytes=1) -> ResourceSample:
    proc = ProcessSample(pid=4242, alive=alive, create_time=create_time, rss_bytes=rss_bytes, cpu_percent=0.0,
                         num_procs=1)
    return ResourceSample(NOW, HostSample(0.0, 1, 2), {4242: proc}, [], "no GPU", {})


def local(result, running_for=100.0, smp=None):
    """The page's local verdict (no watchdog in this stack): keel.watch.verdicts with the watchdog's rules."""
    statuses = {"trainer": result} if result is not None else {}
    health, why = health_from_files({"trainer": TRAINER.entry}, statuses, smp or sample(), NOW,
                                    {"trainer": NOW - running_for})
    return health


def rows_for(result, **kw):
    cols, verdicts = process_rows([TRAINER], {"trainer": result} if result is not None else {}, local(result, **kw),
                                  NOW, NOW_WALL, host="h")
    return {k: v[0] for k, v in cols.items()}, verdicts[0]


@pytest.mark.parametrize("err, label, level", [
    (None, "missing", WARN),
    (Missing("/r/trainer.status.json", "no such file"), "missing", WARN),
    (Corrupt("/r/trainer.status.json", "not JSON: EOF"), "corrupt", BAD),
    (TooLarge("/r/trainer.status.json", "2000000 bytes > cap", 2_000_000), "too large", BAD),
    (UnknownVersion("/r/trainer.status.json", "unknown schema_version 2", 2), "unknown version", BAD),
    (Unreadable("/r/trainer.status.json", "is a symlink; refusing to follow it"), "unreadable", BAD),
])
def test_every_read_error_is_a_greyed_row_with_its_name_and_detail(err, label, level):
    row, v = rows_for(err)
    assert row["state"] == label and row["health"] == label and v.level == level
    assert row["pid"] == row["heartbeat"] == row["uptime"] == "—"  # never a number we do not have
    assert row["color"] == GREY
    assert row["note"] == (err.detail if err is not None else "no status file yet")
    html = training_summary(err, NOW, 10.0)
    assert label in html and "step" not in html


def test_a_stale_status_keeps_values_but_greys_them_and_says_why():
    st = status(hb_age=60.0, progress_age=60.0)
    row, v = rows_for(Stale("/r/trainer.status.json", "heartbeat 60s old", 60.0, st))
    assert v.label == "unhealthy" and v.level == BAD and row["color"] == GREY and "frozen" in row["note"]
    assert row["pid"] == "4242" and row["heartbeat"] == "1m"
    html = training_summary(Stale("/r/x", "old", 60.0, st), NOW, 10.0)
    assert "step <b>7" in html and "as of 1m ago" in html and GREY in html


def test_running_and_fresh_is_ok_and_current():
    row, v = rows_for(status())
    assert (v.label, v.level, row["state"], row["color"]) == ("ok", OK, "running", "#212121")
    assert row["uptime"] == "1m" and row["progress"] == "1.0s"
    html = training_summary(status(), NOW, 10.0)
    assert "as of" not in html and "loss <b>0.5" in html


@pytest.mark.parametrize("kw, running_for, label, rule", [
    (dict(hb_age=11.0), 100.0, "unhealthy", "heartbeat_stale"),
    (dict(progress_age=25.0), 100.0, "unhealthy", "progress_stale"),
    (dict(progress_age=None), 100.0, "unhealthy", "progress_stale"),
    (dict(progress_age=None), 10.0, "ok", "ok"),  # still in startup grace
    (dict(state=State.FAILED), 100.0, "unhealthy", "state_failed"),
    (dict(state=State.STARTING, progress_age=None), 1.0, "starting", "state_starting"),
])
def test_without_a_watchdog_the_page_judges_with_the_watchdogs_rules_and_says_so(kw, running_for, label, rule):
    h = local(status(**kw), running_for)["trainer"]
    assert (h.health, h.rule, h.restarts_total) == (label, rule, None)
    assert h.judged_by == "local: watchdog not reporting: no watchdog in this stack"
    v = health_verdict(h)
    assert v.label == label and (label == "ok" or "[local: watchdog not reporting" in v.note)


def test_dead_and_reused_pids_are_caught_with_the_watchdogs_tolerance():
    assert local(status(), smp=sample(alive=False))["trainer"].rule == "pid_gone"
    assert local(status(), smp=sample(create_time=123.2))["trainer"].rule == "pid_reused"  # > 0.05 s apart
    assert local(status(), smp=sample(create_time=123.01))["trainer"].health == "ok"


def test_the_pages_own_verdict_judges_keel_jsons_limits_too():
    """The typed entry reaches the rules whole: RSS over limits.memory is judged, as the watchdog does."""
    h = local(status(), smp=sample(rss_bytes=200 << 20))["trainer"]
    assert (h.health, h.rule) == ("degraded", "rss_over_limit") and "limit 100 MiB" in h.reason


def test_a_status_file_of_no_process_in_keel_json_is_shown_unjudged():
    """No keel.json entry: no timeouts to judge it by, so it is "unknown", never judged with invented ones."""
    frozen = status(name="stray", kind="command", hb_age=1e5)
    cols, (_, v) = process_rows([TRAINER], {"trainer": status(), "stray": frozen}, local(status()), NOW, NOW_WALL,
                                host="h")
    assert cols["name"] == ["trainer", "stray"] and cols["kind"][1] == "command"
    assert (v.label, v.level, v.note) == ("unknown", WARN, "not in keel.json: not judged")


def test_the_watchdogs_verdict_is_shown_as_published_with_its_colour():
    for word, level in (("ok", OK), ("starting", WARN), ("degraded", WARN), ("unhealthy", BAD), ("failed", BAD),
                        ("stopped", WARN)):
        v = health_verdict(ProcessHealth(word, "r", "why", BY_WATCHDOG, 3))
        assert (v.label, v.level) == (word, level) and v.note == ("" if word == "ok" else "why")


def test_status_from_another_host_has_no_ages():
    row, v = rows_for(status(host="elsewhere"))
    assert v.label == "other host" and row["heartbeat"] == "—" and row["color"] == GREY


def test_rows_follow_stack_order_then_extra_files_and_restarts_are_the_watchdogs():
    published = ProcessHealth("ok", "ok", "healthy", BY_WATCHDOG, 2, "restart", "heartbeat stale")
    rank = stack_of(trainer={"kind": "trainer", "launcher": "torchrun", "torchrun": {"nproc_per_node": 2}})["trainer"]
    cols, _ = process_rows([rank], {"zeta": status(name="zeta", kind="command"), "trainer.rank0": status(),
                                    "trainer.rank1": status(name="trainer.rank1")},
                           {"trainer": published}, NOW, NOW_WALL, host="h")
    # every torchrun rank shows its process's count; a file the watchdog does not judge shows none
    assert cols["name"] == ["trainer.rank0", "trainer.rank1", "zeta"] and cols["restarts"] == ["2", "2", "—"]


def test_failed_status_writes_are_shown():
    st = status().model_copy(update={"write_failures": 3, "last_write_error": "[Errno 28] No space left on device"})
    row, _ = rows_for(st)
    assert row["writes"] == "3" and "No space left" in row["note"]


def test_overall():
    assert overall([], {}).label == "no processes"
    _, ok = rows_for(status())
    _, bad = rows_for(Corrupt("/x", "bad"))
    assert overall([ok], {}).label == "ok"
    assert overall([ok], {"resources": "timed out"}).label == "degraded"
    o = overall([ok, bad], {})
    assert o.label == "failing" and "corrupt" in o.note


def test_html_from_the_run_dir_is_escaped():
    row, _ = rows_for(Corrupt("/x", "<script>alert(1)</script>"))
    assert row["note"] == "<script>alert(1)</script>"  # the table formatter escapes (<%- %>)
    html = training_summary(Corrupt("/x", "<script>alert(1)</script>"), NOW, 10.0)
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_formatting():
    assert [fmt_age(x) for x in (None, 0.42, 12.4, 185, 7260, 3 * 86400 + 4 * 3600)] == \
        ["—", "0.4s", "12s", "3m", "2h01m", "3d04h"]
    assert fmt_num(None) == "—" and fmt_num(float("nan")) == "NaN" and fmt_num(float("inf")) == "inf"
    assert fmt_num(0.000123456) == "0.0001235"
    line = event_line({"ts": "2026-01-01T12:00:01Z", "level": "warning", "action": "restart",
                       "process": "trainer", "reason": "heartbeat stale"})
    assert line == "12:00:01 warning restart trainer heartbeat stale"
