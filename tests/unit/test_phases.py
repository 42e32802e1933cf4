"""Phases, `auto` hang thresholds, data starvation and GPU idle: the pure parts, with made-up numbers.

trainer.phases (timer, histograms, wait fraction), keel.watch.phases (threshold maths),
keel.watch.training_rules (the N-poll counters, gpu_idle through the NVML seam with
recorded samples) and their verdicts through keel.watch.health.evaluate.
"""

from __future__ import annotations

import pytest

from keel.host.sampling import ResourceSampler
from keel.status.models import PhaseStat, TrainingStatus
from keel.watch.health import Context, Level, evaluate, worst
from keel.watch.phases import phase_threshold, stuck_phase
from keel.watch.training_rules import DATA_STARVED, GPU_IDLE, PollCounters
from tests.unit.fake_nvml import FakeNvml
from tests.unit.test_health import NOW, PID, RUNNING_LONG, entry, sample, status
from trainer.phases import DurationHistogram, PhaseTimer

AUTO = {"heartbeat_timeout": "10s", "progress_timeout": "auto", "startup_grace": "30s",
        "auto": {"k": 10, "floor": "2s", "ceiling": "10m", "ceilings": {"validation": "30m"}},
        "data_starved": {"fraction": 0.5, "polls": 3}, "gpu_idle": {"util_percent": 2, "polls": 3}}
CFG = entry(gpus=[0, 1], health=AUTO)


def payload(phase, age, phases=None, wait=None):
    return TrainingStatus(run_id="r", step=5, loss=0.5, phase=phase, phase_mono=NOW - age,
                          phases={k: PhaseStat(**v) for k, v in (phases or {}).items()}, data_wait_fraction=wait)


# -- trainer.phases ---------------------------------------------------------------------------


def test_the_histogram_p99_is_within_one_bucket_of_the_true_p99():
    h = DurationHistogram()
    for i in range(1000):
        h.add(0.020 if i % 100 else 0.200)  # 1 % slow steps
    assert 0.020 <= h.quantile(0.5) <= 0.020 * 1.2
    assert 0.020 <= h.quantile(0.99) <= 0.024 and h.max == 0.2
    assert h.quantile(0.999) == pytest.approx(0.2)


def test_the_histogram_stays_bounded_and_survives_a_round_trip():
    h = DurationHistogram()
    for i in range(100_000):
        h.add(0.001 * (1 + i % 50))
    assert sum(h.buckets.values()) < 2048 and len(h.buckets) < 30 and h.count == 100_000
    back = DurationHistogram.from_dict(h.to_dict())
    assert back.quantile(0.99) == h.quantile(0.99) and back.count == h.count


def test_the_timer_knows_the_current_phase_and_learns_each_phase():
    t = PhaseTimer(now=0.0)
    assert t.current == ("startup", 0.0)
    t.enter("data", 1.0)
    assert t.current == ("data", 1.0)
    t.exit(1.5)
    t.step_done(2.0)  # first step: start-up ends
    assert t.current == ("train", 2.0)
    assert t.stats["startup"].count == 1 and t.stats["data"].count == 1
    for step in range(3, 10):
        t.enter("data", step - 0.75)
        t.exit(step - 0.25)  # half of each 1 s step waits for data
        t.step_done(float(step))
    assert t.wait_fraction == pytest.approx(0.5)
    assert t.stats["train"].count == 7
    p = t.payload()
    assert p["phase"] == "train" and p["phase_mono"] == 9.0 and p["phases"]["data"]["count"] == 8


def test_nested_phases_report_the_innermost_and_data_counts_once():
    t = PhaseTimer(now=0.0)
    t.step_done(0.0)
    t.enter("data", 0.0)
    t.enter("data", 0.1)
    assert t.current == ("data", 0.1)
    t.exit(0.2)
    t.exit(0.4)
    t.step_done(1.0)
    assert t.wait_fraction == pytest.approx(0.4)


def test_saved_phase_stats_resume_and_junk_is_ignored():
    a = PhaseTimer(now=0.0)
    for i in range(5):
        a.enter("validation", i)
        a.exit(i + 0.9)
    b = PhaseTimer(now=100.0)
    b.load({"format": 2})
    b.load("junk")
    assert "validation" not in b.stats
    b.load(a.to_dict())
    assert b.stats["validation"].count == 5


def test_only_long_or_new_phases_are_published_on_transition():
    t = PhaseTimer(now=0.0)
    assert t.publish_now("data")
    for i in range(10):
        t.enter("data", i)
        t.exit(i + 0.01)
        t.enter("validation", i)
        t.exit(i + 0.9)
    assert not t.publish_now("data") and t.publish_now("validation")


# -- keel.watch.phases ------------------------------------------------------------------------


def test_the_threshold_is_k_times_p99_above_the_floor_below_the_ceiling():
    auto = CFG.health.auto
    assert phase_threshold("train", PhaseStat(count=50, p99=0.5), auto).seconds == pytest.approx(5.0)
    assert phase_threshold("train", PhaseStat(count=50, p99=0.02), auto).seconds == 2.0  # floor
    assert phase_threshold("train", PhaseStat(count=50, p99=100.0), auto).seconds == 600.0  # ceiling
    assert phase_threshold("validation", PhaseStat(count=50, p99=300.0), auto).seconds == 1800.0  # its own ceiling


def test_a_phase_without_history_gets_its_ceiling():
    auto = CFG.health.auto
    t = phase_threshold("validation", None, auto)
    assert (t.seconds, t.p99) == (1800.0, None)
    assert phase_threshold("train", PhaseStat(count=2, p99=0.1), auto).seconds == 600.0  # < min_samples


def test_stuck_phase_names_the_phase_and_its_p99():
    p = payload("validation", 31.0, {"validation": {"count": 9, "p99": 0.9}})
    stuck = stuck_phase(p, CFG.health.auto, NOW)
    assert stuck is not None and stuck.reason == "stuck 31 s in phase validation, p99 0.9 s, threshold 9.0 s: hung"
    assert stuck_phase(payload("validation", 8.0, {"validation": {"count": 9, "p99": 0.9}}), CFG.health.auto, NOW) is None


def test_auto_judges_a_stalled_fast_loop_hung_and_a_long_usual_validation_not():
    fast = {"train": {"count": 500, "p99": 0.02}, "validation": {"count": 5, "p99": 60.0}}
    hung = worst(evaluate(status(progress_age=3.0, payload=payload("train", 3.0, fast)), sample(), CFG, NOW, RUNNING_LONG))
    assert (hung.level, hung.rule) == (Level.UNHEALTHY, "progress_stale") and "phase train" in hung.reason
    # 50 s in validation: far past the train threshold, well within 10 x its own p99.
    ok = worst(evaluate(status(progress_age=50.0, payload=payload("validation", 50.0, fast)), sample(), CFG, NOW,
                        RUNNING_LONG))
    assert ok.level is Level.OK, ok


def test_auto_keeps_the_longest_ceiling_as_a_backstop_on_progress():
    v = worst(evaluate(status(progress_age=1801.0, payload=payload("train", 1.0)), sample(), CFG, NOW, RUNNING_LONG))
    assert v.rule == "progress_stale"
    v = worst(evaluate(status(progress_age=1799.0, payload=payload("train", 1.0)), sample(), CFG, NOW, RUNNING_LONG))
    assert v.level is Level.OK


# -- data_starved and the N-poll counters ------------------------------------------------------


def _poll(counters, st, smp, pid=PID):
    ctx = Context("RUNNING", PID, running_since=NOW - 100.0, training_polls=counters.counts("p", pid))
    verdicts = evaluate(st, smp, CFG, NOW, ctx)
    counters.update("p", pid, [st], smp, CFG)
    return worst(verdicts)


def test_data_starved_fires_after_n_polls_as_a_warning_with_advice():
    counters = PollCounters()
    starving = status(payload=payload("data", 0.01, wait=0.8))
    seen = [_poll(counters, starving, sample()) for _ in range(4)]
    assert [v.rule for v in seen] == ["ok", "ok", DATA_STARVED, DATA_STARVED]
    assert seen[2].level is Level.DEGRADED and "num_workers" in seen[2].reason and "80%" in seen[2].reason
    # One poll below the threshold resets the count.
    assert _poll(counters, status(payload=payload("train", 0.01, wait=0.1)), sample()).rule == "ok"
    assert _poll(counters, starving, sample()).rule == "ok"


def test_counters_start_afresh_for_a_new_run():
    counters = PollCounters()
    starving = status(payload=payload("data", 0.01, wait=0.8))
    for _ in range(2):
        _poll(counters, starving, sample())
    assert counters.counts("p", PID) == {DATA_STARVED: 2}
    assert counters.counts("p", PID + 1) == {}


# -- gpu_idle, through the NVML seam with recorded samples -------------------------------------

# Recorded per-poll utilisation of GPUs 0 and 1 (a trainer holding both), and of GPU 2 (someone else's).
RECORDED = [(0, 0, 97), (1, 0, 95), (0, 1, 99), (0, 0, 99), (0, 0, 98), (35, 40, 99), (0, 0, 90)]


def recorded_samples(rows):
    for utils in rows:
        nvml = FakeNvml([{"util": u} for u in utils])
        sampler = ResourceSampler(nvml=nvml)
        try:
            smp = sampler.sample([])
        finally:
            sampler.close()
        yield sample().__class__(smp.mono, smp.host, sample().processes, smp.gpus, smp.gpu_error, {})


def test_gpu_idle_fires_after_n_idle_polls_of_every_held_gpu():
    counters = PollCounters()
    st = status(payload=payload("train", 0.01)).model_copy(update={"gpus": [0, 1]})
    rules = [_poll(counters, st, smp).rule for smp in recorded_samples(RECORDED)]
    # Polls 1-5 are idle (<= 2 %) on both GPUs: the third in a row warns; a busy poll resets.
    assert rules == ["ok", "ok", GPU_IDLE, GPU_IDLE, GPU_IDLE, "ok", "ok"]
    v = _poll(counters, st, next(recorded_samples([(0, 0, 0)])))
    assert v.rule == "ok"  # 2 in a row after the busy poll
    v = _poll(counters, st, next(recorded_samples([(0, 0, 0)])))
    assert v.level is Level.DEGRADED and "GPU 0 0%" in v.reason and "GPU 1 0%" in v.reason


def test_gpu_idle_needs_held_gpus_running_state_and_gpu_metrics():
    idle = list(recorded_samples([(0, 0, 0)] * 4))
    counters = PollCounters()
    no_gpus = status(payload=payload("train", 0.01))  # gpus []
    assert {_poll(counters, no_gpus, s).rule for s in idle} == {"ok"}
    counters = PollCounters()
    other = status(payload=payload("train", 0.01)).model_copy(update={"gpus": [5]})  # NVML does not show GPU 5
    assert {_poll(counters, other, s).rule for s in idle} == {"ok"}
    counters = PollCounters()
    no_nvml = sample().__class__(NOW, sample().host, sample().processes, [], "no GPU metrics: NVML missing", {})
    held = status(payload=payload("train", 0.01)).model_copy(update={"gpus": [0]})
    assert {_poll(counters, held, no_nvml).rule for _ in range(4)} == {"ok"}


def test_the_page_shows_the_published_data_starved_warning_and_its_advice():
    from dashboard.present import health_verdict
    from keel.status.models import WatchdogStatus, WatchedProcess
    from keel.watch.verdicts import health_for, health_word

    counters = PollCounters()
    starving = status(payload=payload("data", 0.01, wait=0.9))
    v = [_poll(counters, starving, sample()) for _ in range(3)][-1]
    report = WatchdogStatus(processes={"p": WatchedProcess(health=health_word(v), rule=v.rule, reason=v.reason)})
    shown = health_verdict(health_for("p", report, "watchdog", v))
    assert shown.label == "degraded" and "waiting for data 90%" in shown.note and "prefetch_factor" in shown.note


# -- Run.phase: published in the status, saved with the checkpoint -----------------------------


def test_run_phase_is_published_and_its_stats_resume_with_the_checkpoint(tmp_path):
    from tests.unit.test_trainer_run import _reporters, make_run

    try:
        run, reporter, clock, _ = make_run(tmp_path, report={"status_interval": "1ms", "metrics_interval": "1s"})
        for step in range(1, 6):
            with run.phase("data"):
                clock.now += 0.3
            with run.phase("validation"):
                assert reporter.status.payload.phase == "validation"  # a long/new phase: published at once
                assert reporter.status.payload.phase_mono == clock.now
                clock.now += 2.0
            clock.now += 0.1
            run.report(step=step, loss=1.0)
        p = reporter.status.payload
        assert p.phase == "train" and p.phases["validation"].count == 5 and p.phases["data"].count == 5
        assert p.data_wait_fraction == pytest.approx(0.3 / 2.4, rel=0.01)
        run.save_checkpoint({"w": 1})
        assert reporter.status.payload.phases["checkpoint"].count == 1

        fresh, reporter2, _, _ = make_run(tmp_path)
        fresh.load_checkpoint()
        assert reporter2.status.payload.phases["validation"].count == 5
        assert 2.0 <= reporter2.status.payload.phases["validation"].p99 <= 2.4
    finally:
        while _reporters:
            _reporters.pop().close()
