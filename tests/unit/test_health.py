"""keel.watch.health: every verdict, from hand-made statuses and samples (no clock, no processes)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from keel.watch.health import Context, Identity, Level, evaluate, identity, worst
from keel.status.models import ProcessStatus, State, TrainingStatus
from keel.host.sampling import HostSample, ProcessSample, ResourceSample
from keel.status.results import Corrupt, Missing, Stale
from keel.render.resolve import stack_file
from tests.resolved import make_config, make_context

PID, START = 4242, 1_700_000_000.25
NOW = 10_000.0


def entry(kind="trainer", **settings):
    """The process's keel.json entry, as the real resolver builds it (nothing written: the rules are pure)."""
    root = Path("/nonexistent/keel")
    config = make_config(root, {"p": {"kind": kind, **settings}})
    return stack_file(config, make_context(root, config)).processes["p"]


HEALTH = {"heartbeat_timeout": "10s", "progress_timeout": "20s", "startup_grace": "30s"}
CONFIG = entry(gpus=[0], health=HEALTH, limits={"memory": "100MiB", "gpu_memory": "1GiB"})
RUNNING_LONG = Context("RUNNING", PID, running_since=NOW - 100.0)


def status(hb_age=1.0, progress_age=1.0, state=State.RUNNING, pid=PID, start=START, kind="trainer", payload=None,
           wall_shift=timedelta(0)):
    wall = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc) + wall_shift
    if payload is None and kind == "trainer":
        payload = TrainingStatus(run_id="r", step=5, loss=0.5)
    return ProcessStatus(
        name="trainer", kind=kind, host="h", pid=pid, pid_start_time=start, state=state,
        started_at=wall, heartbeat_wall=wall, heartbeat_mono=NOW - hb_age,
        progress_wall=None if progress_age is None else wall,
        progress_mono=None if progress_age is None else NOW - progress_age,
        payload=payload,
    )


def sample(rss=10 << 20, gpu=None, alive=True, create=START, pid=PID):
    proc = ProcessSample(pid, alive, create if alive else None, rss if alive else 0, 1.0, 1, (pid,), gpu)
    return ResourceSample(NOW, HostSample(1.0, 1, 2), {pid: proc}, [], None, {})


def verdict(st, smp=None, cfg=CONFIG, ctx=RUNNING_LONG, now=NOW):
    return worst(evaluate(st, smp or sample(), cfg, now, ctx))


def test_a_healthy_process_is_ok():
    v = verdict(status())
    assert (v.level, v.rule) == (Level.OK, "ok")


def test_stale_heartbeat_means_frozen():
    v = verdict(status(hb_age=10.5))
    assert (v.level, v.rule) == (Level.UNHEALTHY, "heartbeat_stale") and "frozen" in v.reason


def test_stale_progress_with_a_live_heartbeat_means_hung():
    v = verdict(status(progress_age=21.0))
    assert (v.level, v.rule) == (Level.UNHEALTHY, "progress_stale")


def test_progress_is_not_judged_during_startup_grace():
    in_grace = Context("RUNNING", PID, running_since=NOW - 29.0)
    assert verdict(status(progress_age=25.0), ctx=in_grace).level is Level.OK
    assert verdict(status(progress_age=None), ctx=in_grace).level is Level.OK


def test_a_trainer_that_never_progressed_after_grace_is_hung():
    v = verdict(status(progress_age=None))
    assert v.rule == "progress_stale" and "since start" in v.reason


def test_a_process_that_never_reports_progress_is_judged_by_heartbeat_only():
    cfg = entry("dashboard", health=HEALTH)
    assert verdict(status(progress_age=None, kind="dashboard", payload={}), cfg=cfg).level is Level.OK


def test_the_timeouts_are_keel_jsons_as_resolved():
    """No default of the rules' own: another heartbeat_timeout in keel.json moves the verdict with it."""
    patient = entry(gpus=[0], health={**HEALTH, "heartbeat_timeout": "1m"})
    assert verdict(status(hb_age=30.0), cfg=CONFIG).rule == "heartbeat_stale"
    assert verdict(status(hb_age=30.0), cfg=patient).level is Level.OK


def test_rss_over_limit_is_degraded_until_n_polls_in_a_row():
    big = sample(rss=200 << 20)
    first = verdict(status(), big, ctx=Context("RUNNING", PID, NOW - 100, rss_over_polls=0, consecutive=3))
    third = verdict(status(), big, ctx=Context("RUNNING", PID, NOW - 100, rss_over_polls=2, consecutive=3))
    assert (first.level, first.rule) == (Level.DEGRADED, "rss_over_limit") and "(1/3 polls)" in first.reason
    assert (third.level, third.rule) == (Level.UNHEALTHY, "rss_over_limit")


def test_gpu_memory_over_limit():
    v = verdict(status(), sample(gpu=2 << 30), ctx=Context("RUNNING", PID, NOW - 100, gpu_over_polls=5))
    assert (v.level, v.rule) == (Level.UNHEALTHY, "gpu_memory_over_limit")


def test_no_gpu_metrics_means_no_gpu_verdict():
    assert verdict(status(), sample(gpu=None)).level is Level.OK


def test_no_limits_means_no_resource_verdict():
    cfg = entry(gpus=[0], health=HEALTH)
    assert (cfg.limits.memory_bytes, cfg.limits.gpu_memory_bytes) == (None, None)
    assert verdict(status(), sample(rss=1 << 40, gpu=1 << 40), cfg=cfg).level is Level.OK


@pytest.mark.parametrize("loss", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_loss_in_a_trainer_payload(loss):
    v = verdict(status(payload=TrainingStatus(run_id="r", loss=loss)))
    assert (v.level, v.rule) == (Level.UNHEALTHY, "nan_loss")


def test_nan_loss_in_a_free_form_payload_as_json_spells_it():
    v = verdict(status(kind="command", payload={"loss": "NaN"}), cfg=entry("command", command=["true"], health=HEALTH))
    assert v.rule == "nan_loss"


def test_state_failed():
    st = status().model_copy(update={"state": State.FAILED, "last_error": "CUDA OOM"})
    v = verdict(st)
    assert (v.level, v.rule) == (Level.UNHEALTHY, "state_failed") and "CUDA OOM" in v.reason


def test_a_frozen_process_that_says_starting_is_still_frozen():
    assert verdict(status(hb_age=60, state=State.STARTING)).rule == "heartbeat_stale"


def test_pid_gone():
    v = verdict(status(), sample(alive=False), ctx=Context(None, None, NOW - 100))
    assert (v.level, v.rule) == (Level.UNHEALTHY, "pid_gone")


def test_pid_reused_is_told_apart_by_start_time():
    st, smp = status(), sample(create=START + 3600)
    assert identity(st, smp) is Identity.REUSED
    v = verdict(st, smp, ctx=Context(None, None, NOW - 100))
    assert (v.level, v.rule) == (Level.UNHEALTHY, "pid_reused")


def test_status_of_a_previous_run_is_waited_for_within_grace_then_unhealthy():
    # The backend runs pid 5000 now; the file still names the old pid 4242 (gone).
    smp = sample(alive=False)
    young = Context("RUNNING", 5000, running_since=NOW - 5)
    old = Context("RUNNING", 5000, running_since=NOW - 31)
    assert verdict(status(), smp, ctx=young).level is Level.STARTING
    assert verdict(status(), smp, ctx=old).level is Level.UNHEALTHY


def test_a_gone_process_that_said_stopped_is_not_unhealthy():
    assert verdict(status(state=State.STOPPED), sample(alive=False), ctx=Context()).rule == "not_running"


@pytest.mark.parametrize("error", [Missing("/r/t.status.json", "no such file"), Corrupt("/r/t.status.json", "bad")])
def test_missing_or_corrupt_status_is_starting_in_grace_and_unhealthy_after(error):
    in_grace = Context("RUNNING", PID, running_since=NOW - 5)
    assert verdict(error, ctx=in_grace).level is Level.STARTING
    v = verdict(error)
    assert (v.level, v.rule) == (Level.UNHEALTHY, "status_missing")


def test_a_stale_read_is_judged_by_our_own_timeout():
    st = status(hb_age=3)
    assert verdict(Stale("/r/t", "old", 3.0, st)).level is Level.OK


@pytest.mark.parametrize("state", ["STARTING", "BACKOFF"])
def test_backend_restarting_it_is_starting_whatever_the_status_says(state):
    v = verdict(status(hb_age=1e6), ctx=Context(state, None, None))
    assert (v.level, v.rule) == (Level.STARTING, "backend_starting")


def test_backend_fatal_is_a_crash_loop():
    v = verdict(Missing("/r/t", "none"), ctx=Context("FATAL", None, None))
    assert (v.level, v.rule) == (Level.UNHEALTHY, "crash_loop")


@pytest.mark.parametrize("state", ["STOPPED", "EXITED", "STOPPING"])
def test_stopped_on_purpose_is_not_watched(state):
    assert verdict(status(hb_age=1e6), ctx=Context(state, None, None)).level is Level.OK


@pytest.mark.parametrize("shift", [timedelta(hours=1), timedelta(hours=-1)])
def test_a_wall_clock_jump_changes_no_verdict(shift):
    for kwargs in ({}, {"hb_age": 10.5}, {"progress_age": 21.0}):
        assert verdict(status(**kwargs, wall_shift=shift)) == verdict(status(**kwargs))


def test_worst_keeps_the_first_of_equal_severity_and_ok_for_none():
    assert worst([]).level is Level.OK
    vs = evaluate(status(hb_age=11, progress_age=21), sample(), CONFIG, NOW, RUNNING_LONG)
    assert [v.rule for v in vs] == ["heartbeat_stale", "progress_stale"] and worst(vs).rule == "heartbeat_stale"


def test_more_backend_restarts_than_the_budget_is_a_crash_loop():
    ctx = Context("STARTING", None, None, backend_restarts=4, max_backend_restarts=3)
    v = verdict(status(), ctx=ctx)
    assert (v.level, v.rule) == (Level.UNHEALTHY, "crash_loop") and "4 times" in v.reason
    assert verdict(status(), ctx=Context("RUNNING", PID, NOW - 100, backend_restarts=3, max_backend_restarts=3)).level is Level.OK


def test_an_exit_the_backend_has_not_noticed_yet_is_left_to_the_backend():
    # supervisord still says RUNNING with the dead pid (it reaps on its next tick): not ours to restart.
    v = verdict(status(), sample(alive=False), ctx=Context("RUNNING", PID, NOW - 100))
    assert (v.level, v.rule) == (Level.STARTING, "pid_gone")


def test_a_stale_heartbeat_while_the_run_dir_is_full_is_degraded_not_unhealthy():
    """The status channel degrades instead of killing: a full disk must never read as a frozen trainer."""
    blocked = Context("RUNNING", PID, running_since=NOW - 100, status_channel_blocked="run dir /r is full (3 KiB free)")
    vs = evaluate(status(hb_age=60, progress_age=60), sample(), CONFIG, NOW, blocked)
    assert {v.rule for v in vs} == {"status_channel_blocked"} and all(v.level is Level.DEGRADED for v in vs)
    assert "full" in worst(vs).reason and "frozen" in worst(vs).reason
    # Everything that does not read an age is judged as usual.
    assert verdict(status(state=State.FAILED), ctx=blocked).level is Level.UNHEALTHY


def test_status_channel_blocked_on_a_real_full_filesystem(tmp_path):
    import os
    import subprocess

    from keel.host.disk import status_channel_blocked

    assert status_channel_blocked(tmp_path) is None
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mnt)], check=True)
    try:
        with open(mnt / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        assert "full" in status_channel_blocked(mnt)
        (mnt / "filler").unlink()
        assert status_channel_blocked(mnt) is None
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        assert "read-only" in status_channel_blocked(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
