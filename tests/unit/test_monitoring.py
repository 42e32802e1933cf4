"""monitoring/: the shipped alert rules (promtool check + unit tests, and that those tests can fail),
the Grafana board (committed JSON == generated; every query parses), and keel.prom's names and labels."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from keel.status.models import ProcessStatus
from keel.watch.prom import GpuRow, ProcessRow, RankRow, write_textfile
from keel.watch.publish import _rank_row
from monitoring import board
from tests.support import require_binary, REPO_ROOT

MON = REPO_ROOT / "monitoring"
RULES = MON / "keel.rules.yml"
RULE_TESTS = MON / "tests" / "keel.rules.test.yml"


def need_promtool() -> str:
    return require_binary("promtool", "prometheus")


def promtool(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([need_promtool(), *map(str, args)], capture_output=True, text=True, timeout=60)


def alerts() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_promtool_checks_the_shipped_rules():
    done = promtool("check", "rules", RULES)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in done.stdout


def test_promtool_unit_tests_of_every_rule_pass():
    done = promtool("test", "rules", RULE_TESTS)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_for_a_severity_a_summary_and_a_unit_test():
    cases = [t for case in yaml.safe_load(RULE_TESTS.read_text())["tests"] for t in case["alert_rule_test"]]
    names = [a["alert"] for a in alerts()]
    assert set(names) == {"KeelProcessHung", "KeelProcessFrozen", "KeelProcessCrashLooping", "KeelProcessGaveUp",
                          "KeelDataStarved", "KeelGpuIdle", "KeelWatchdogStale", "KeelFleetNoProgress"}
    # each one fires in some case, and stays quiet in another (a point where nothing of it may fire)
    assert {t["alertname"] for t in cases if t["exp_alerts"]} == set(names)
    assert {t["alertname"] for t in cases if not t["exp_alerts"]} == set(names)
    for a in alerts():
        assert re.fullmatch(r"\d+[smh]", a["for"]) and a["for"] != "0s", a["alert"]
        assert a["labels"]["severity"] in ("critical", "warning")
        assert "{{ $labels.host }}" in a["annotations"]["summary"], a["alert"]


def test_the_gave_up_rule_reads_the_failed_health_code():
    from keel.watch.prom import HEALTH_CODES

    gave_up = next(a for a in alerts() if a["alert"] == "KeelProcessGaveUp")
    assert gave_up["expr"].strip() == f"keel_process_health == {HEALTH_CODES['failed']}"


def _mutated(tmp_path: Path, alert: str, **change: str) -> subprocess.CompletedProcess:
    """Run the shipped unit tests against a copy of the rules with one alert changed."""
    doc = yaml.safe_load(RULES.read_text())
    rule = next(r for g in doc["groups"] for r in g["rules"] if r["alert"] == alert)
    rule.update(change)
    (tmp_path / "tests").mkdir(exist_ok=True)
    (tmp_path / "keel.rules.yml").write_text(yaml.safe_dump(doc))
    shutil.copy(RULE_TESTS, tmp_path / "tests")
    return promtool("test", "rules", tmp_path / "tests" / RULE_TESTS.name)


@pytest.mark.slow  # one promtool run per alert
@pytest.mark.parametrize("alert", [a["alert"] for a in alerts()])
def test_the_unit_tests_fail_for_an_alert_that_never_fires(tmp_path, alert):
    done = _mutated(tmp_path, alert, expr="vector(1) == 0")
    assert done.returncode != 0 and alert in done.stdout + done.stderr


@pytest.mark.slow  # one promtool run per alert
@pytest.mark.parametrize("alert", [a["alert"] for a in alerts()])
def test_the_unit_tests_fail_for_an_alert_without_its_for(tmp_path, alert):
    done = _mutated(tmp_path, alert, **{"for": "0s"})
    assert done.returncode != 0 and alert in done.stdout + done.stderr


# -------------------------------------------------------------------------------- the Grafana board


def test_the_committed_board_is_the_generated_one():
    assert board.BOARD.read_text() == board.render(), "monitoring/keel-fleet.json is out of date: run `make monitoring`"
    assert board.main(["--check"]) == 0


def test_every_board_query_parses(tmp_path):
    """promtool parses each query (as a recording rule); the integration test also runs them on a real Prometheus."""
    exprs = [board.runnable(q) for q in board.queries(json.loads(board.BOARD.read_text()))]
    assert len(exprs) >= 12
    rules = {"groups": [{"name": "board", "rules": [{"record": f"board:q{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "board.rules.yml"
    path.write_text(yaml.safe_dump(rules))
    done = promtool("check", "rules", path)
    assert done.returncode == 0, done.stdout + done.stderr
    bad = tmp_path / "bad.rules.yml"  # the check can fail
    bad.write_text(yaml.safe_dump({"groups": [{"name": "b", "rules": [{"record": "b:q", "expr": "rate(x[1m]"}]}]}))
    assert promtool("check", "rules", bad).returncode != 0


def test_the_board_shows_each_panel_per_host_and_rank():
    doc = json.loads(board.BOARD.read_text())
    titles = {p["title"] for p in doc["panels"]}
    assert {"Step rate", "Loss", "Restarts (1h)", "Health", "GPU utilisation"} <= titles
    assert {v["name"] for v in doc["templating"]["list"]} == {"datasource", "host", "process"}
    step = next(p for p in doc["panels"] if p["title"] == "Step rate")
    assert step["targets"][0]["legendFormat"] == "{{host}} {{process}} {{rank}}"


# -------------------------------------------------------------------------------- keel.prom


def samples(path: Path) -> dict[str, list]:
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(path.read_text()):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_keel_prom_names_units_and_labels(tmp_path):
    path = tmp_path / "keel.prom"
    rows = [
        ProcessRow("trainer", "trainer", up=True, health="unhealthy", rule="progress_stale", restarts_total=2,
                   rss_bytes=1000, cpu_percent=150.0, gpu_memory_bytes=None,
                   ranks=(RankRow("0", "running", 1.0, 30.0, 7, 0.5), RankRow("1", "running", 1.0, 31.0, 7, float("nan")))),
        ProcessRow("dashboard", "dashboard", up=True, health="ok", rule="ok"),
    ]
    write_textfile(path, rows, [GpuRow(0, "H200", 10, 100, 50.0, 40.0)], last_poll=123.0, gpu_metrics=True, host="n1")
    s = samples(path)
    assert s["keel_process_restarts_total"] == [({"host": "n1", "process": "trainer", "kind": "trainer", "rank": ""}, 2.0),
                                                ({"host": "n1", "process": "dashboard", "kind": "dashboard", "rank": ""}, 0.0)]
    assert ({"host": "n1", "process": "trainer", "kind": "trainer", "rank": "", "rule": "progress_stale"}, 1.0) \
        in s["keel_process_verdict"]
    assert s["keel_process_cpu_ratio"][0][1] == 1.5
    assert s["keel_process_resident_memory_bytes"] == [({"host": "n1", "process": "trainer", "kind": "trainer",
                                                         "rank": ""}, 1000.0)]  # unknown: left out
    assert [(lab["rank"], v) for lab, v in s["keel_training_step"]] == [("0", 7.0), ("1", 7.0)]
    assert {lab["rank"] for lab, _ in s["keel_process_progress_age_seconds"]} == {"0", "1"}
    assert s["keel_gpu_utilization_ratio"] == [({"host": "n1", "gpu": "0", "name": "H200"}, 0.5)]
    assert s["keel_watchdog_last_poll_timestamp_seconds"] == [({"host": "n1"}, 123.0)]
    for name, series in s.items():  # no pids, run ids or other unbounded labels
        for labels, _ in series:
            assert set(labels) <= {"host", "process", "kind", "rank", "rule", "state", "gpu", "name"}, name


def documented_metrics() -> set[str]:
    text = (REPO_ROOT / "docs" / "deployment.md").read_text()
    section = text[text.index("## Monitoring"):]
    section = section[:section.index("\n## ", 1)] if "\n## " in section[1:] else section
    return set(re.findall(r"^\| `(keel_\w+)` \|", section, re.M))


def test_every_metric_is_in_the_one_table_and_every_rule_and_panel_uses_real_names(tmp_path):
    path = tmp_path / "keel.prom"
    rows = [ProcessRow("t", "trainer", up=True, health="ok", rss_bytes=1, cpu_percent=1.0, gpu_memory_bytes=1,
                       ranks=(RankRow("", "running", 1.0, 1.0, 1, 1.0),))]
    write_textfile(path, rows, [GpuRow(0, "g", 1, 2, 3.0, 4.0)], last_poll=1.0, host="h")
    families = {f.name + ("_total" if f.type == "counter" else "") for f in text_string_to_metric_families(path.read_text())}
    assert documented_metrics() == families
    used = set(re.findall(r"\bkeel_\w+", RULES.read_text() + board.BOARD.read_text())) - {"keel_fleet"}
    assert used <= families, used - families


def test_a_distributed_trainer_gets_one_rank_series_per_status_and_a_single_process_none():
    now = datetime.now(timezone.utc)

    def status(rank: int, world: int) -> ProcessStatus:
        return ProcessStatus(name=f"trainer.rank{rank}", kind="trainer", host="h", pid=1, pid_start_time=1.0,
                             state="running", started_at=now, heartbeat_wall=now, heartbeat_mono=10.0,
                             progress_mono=8.0, payload={"run_id": "r", "step": 5, "rank": rank, "world_size": world})

    assert [_rank_row(status(r, 2), 12.0).rank for r in (0, 1)] == ["0", "1"]
    single = _rank_row(status(0, 1), 12.0)
    assert (single.rank, single.step, single.heartbeat_age, single.progress_age) == ("", 5.0, 2.0, 4.0)


def test_every_verdict_rule_an_alert_reads_is_one_the_health_engine_emits():
    """The rules read keel_process_verdict{rule=...}: each name must be a rule id keel.watch publishes."""
    source = "".join(p.read_text() for p in (REPO_ROOT / "keel" / "watch").glob("*.py"))
    read = set(re.findall(r'rule="(\w+)"', RULES.read_text()))
    assert read == {"progress_stale", "heartbeat_stale", "crash_loop", "data_starved", "gpu_idle"}
    assert {r for r in read if f'"{r}"' not in source} == set()


def test_the_docs_alert_table_is_the_rules_file():
    # docs/deployment.md's alert table repeats each alert's name and `for:`: it must say what ships
    text = (REPO_ROOT / "docs" / "deployment.md").read_text()
    section = text[text.index("### Alert rules"):]
    documented = dict(re.findall(r"^\| `(Keel\w+)` \|.*\| (\w+) \|$", section, re.M))
    assert documented == {a["alert"]: a["for"] for a in alerts()}
