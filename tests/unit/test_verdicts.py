"""keel.watch.verdicts: which verdict a reader shows -- the watchdog's published one, or an honest local one."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from keel.status.models import WatchdogStatus, WatchedProcess
from keel.watch.health import HealthVerdict, Level
from keel.watch.verdicts import BY_WATCHDOG, health_for

POLL = datetime(2026, 12, 2, 10, 0, 0, tzinfo=timezone.utc)
REPORT = WatchdogStatus(last_poll=POLL, processes={"trainer": WatchedProcess(
    health="ok", rule="ok", reason="healthy", pid=100, restarts_total=2, last_action="restart",
    last_action_reason="heartbeat 11s old > 10s: frozen", last_action_at=POLL - timedelta(seconds=30))})
LOCAL = HealthVerdict(Level.STARTING, "status of pid 100, a previous run; within startup grace", "status_foreign")


def test_a_run_the_watchdog_judged_shows_its_verdict_and_counts():
    h = health_for("trainer", REPORT, BY_WATCHDOG, LOCAL, run_started=POLL - timedelta(seconds=60))
    assert (h.health, h.judged_by, h.restarts_total, h.last_action) == ("ok", BY_WATCHDOG, 2, "restart")


def test_a_run_that_began_after_the_last_poll_is_judged_locally_with_the_watchdogs_counts():
    # A SIGKILLed trainer restarted by supervisord: the published "ok" is the dead run's, not this one's.
    h = health_for("trainer", REPORT, BY_WATCHDOG, LOCAL, run_started=POLL + timedelta(seconds=1))
    assert (h.health, h.rule) == ("starting", "status_foreign")
    assert h.judged_by == "local: the watchdog has not judged this run yet"
    assert (h.restarts_total, h.last_action) == (2, "restart")


def test_no_report_means_unknown_counts_and_says_why():
    h = health_for("trainer", None, "watchdog not reporting: it is stopped", LOCAL, run_started=POLL)
    assert h.judged_by == "local: watchdog not reporting: it is stopped" and h.restarts_total is None


def test_the_watchdog_itself_is_never_judged_by_its_own_report():
    h = health_for("watchdog", REPORT, BY_WATCHDOG, HealthVerdict(Level.OK, "healthy", "ok"), watched=False)
    assert h.judged_by == "local: not watched by the watchdog" and h.restarts_total is None
