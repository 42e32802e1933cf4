"""The keel fleet board for Grafana, built from code with grafana-foundation-sdk.

``python -m monitoring.board`` (``make monitoring``) writes monitoring/keel-fleet.json;
``--check`` exits 1 when the committed file differs from what this module builds
(tests/unit/test_monitoring.py checks the same, and tests/integration/test_prometheus.py
runs every query through a real Prometheus). The metric names are keel.prom's
(keel/watch/prom.py; table in docs/deployment.md, "Monitoring").

Panels are per host and rank: one series per (host, process, rank), filtered by the
``host`` and ``process`` variables. The data source is a variable too, so the JSON can be
imported into any Grafana with a Prometheus data source.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import dashboard as gd
from grafana_foundation_sdk.builders import prometheus as gp
from grafana_foundation_sdk.builders import stat, statetimeline, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as dm

from keel.fs.atomic import atomic_write_text
from keel.watch.prom import HEALTH_CODES

__all__ = ["BOARD", "board", "queries", "render", "runnable"]

BOARD = Path(__file__).with_name("keel-fleet.json")
UID = "keel-fleet"
DS = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
SEL = 'host=~"$host", process=~"$process"'
LEGEND = "{{host}} {{process}} {{rank}}"
# keel_process_health's codes (keel.watch.prom.HEALTH_CODES, the one mapping) as words and colours.
_COLOURS = {"ok": "green", "starting": "blue", "degraded": "yellow", "unhealthy": "orange", "failed": "red",
            "stopped": "text"}
HEALTH = {code: (word, _COLOURS[word]) for word, code in HEALTH_CODES.items()}


def _q(expr: str, legend: str = LEGEND, *, instant: bool = False, ref: str = "A") -> gp.Dataquery:
    q = gp.Dataquery().expr(expr).legend_format(legend).ref_id(ref)
    return q.instant() if instant else q.range()


def _series(title: str, expr: str, unit: str, description: str, legend: str = LEGEND) -> timeseries.Panel:
    return (timeseries.Panel().title(title).description(description).datasource(DS).unit(unit)
            .with_target(_q(expr, legend)).height(8).span(12))


def _training() -> list[Any]:
    return [
        _series("Step rate", f'deriv(keel_training_step{{{SEL}}}[$__rate_interval])', "short",
                "Steps per second per rank (deriv: a run resumed from a checkpoint goes back in steps)."),
        _series("Loss", f'keel_training_loss{{{SEL}}}', "short", "Training loss each rank reports."),
        _series("Step", f'keel_training_step{{{SEL}}}', "short", "Training step each rank reports."),
        _series("Progress age", f'keel_process_progress_age_seconds{{{SEL}}}', "s",
                "Seconds since the last finished step; the watchdog calls a process hung past progress_timeout."),
    ]


def _health() -> list[Any]:
    mapping = dm.ValueMap(options={str(code): dm.ValueMappingResult(text=word, color=color, index=code)
                                   for code, (word, color) in HEALTH.items()})
    verdicts = (statetimeline.Panel().title("Health").datasource(DS).height(8).span(12)
                .description("The watchdog's verdict per process (keel_process_health).")
                .with_target(_q(f'keel_process_health{{{SEL}}}', "{{host}} {{process}}"))
                .mappings([mapping]))
    rules = (table.Panel().title("Verdict rules now").datasource(DS).height(8).span(12)
             .description("The rule behind each process's current verdict (keel.watch.health).")
             .with_target(_q(f'keel_process_verdict{{{SEL}}} == 1', "{{rule}}", instant=True)))
    restarts = _series("Restarts (1h)", f'increase(keel_process_restarts_total{{{SEL}}}[1h])', "short",
                       "Restarts by the watchdog in the last hour.", "{{host}} {{process}}")
    alerts = (table.Panel().title("Keel alerts firing").datasource(DS).height(8).span(12)
              .description("monitoring/keel.rules.yml alerts now firing.")
              .with_target(_q('ALERTS{alertname=~"Keel.*", alertstate="firing", host=~"$host"}',
                              "{{alertname}}", instant=True)))
    poll = (stat.Panel().title("Watchdog last poll age").datasource(DS).unit("s").height(4).span(24)
            .description("Seconds since each host's watchdog last polled; KeelWatchdogStale fires past 120 s.")
            .with_target(_q('time() - keel_watchdog_last_poll_timestamp_seconds{host=~"$host"}', "{{host}}")))
    return [verdicts, rules, restarts, alerts, poll]


def _resources() -> list[Any]:
    gpu_sel = 'host=~"$host"'
    return [
        _series("GPU utilisation", f'keel_gpu_utilization_ratio{{{gpu_sel}}}', "percentunit",
                "Per GPU (NVML).", "{{host}} gpu{{gpu}}"),
        _series("GPU memory used", f'keel_gpu_memory_used_bytes{{{gpu_sel}}} / keel_gpu_memory_total_bytes{{{gpu_sel}}}',
                "percentunit", "Per GPU, of its total.", "{{host}} gpu{{gpu}}"),
        _series("Process GPU memory", f'keel_process_gpu_memory_bytes{{{SEL}}}', "bytes",
                "GPU memory of each process tree.", "{{host}} {{process}}"),
        _series("Process CPU", f'keel_process_cpu_ratio{{{SEL}}}', "short",
                "Busy cores of each process tree (1 = one core).", "{{host}} {{process}}"),
        _series("Process memory", f'keel_process_resident_memory_bytes{{{SEL}}}', "bytes",
                "Resident memory of each process tree.", "{{host}} {{process}}"),
    ]


def board() -> dm.Dashboard:
    """The fleet board as the SDK's model."""
    ds = gd.DatasourceVariable("datasource").label("Data source").type("prometheus")
    host = (gd.QueryVariable("host").label("Host").datasource(DS).query("label_values(keel_process_up, host)")
            .multi(True).include_all(True).all_value(".*").refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED))
    process = (gd.QueryVariable("process").label("Process").datasource(DS)
               .query('label_values(keel_process_up{host=~"$host"}, process)')
               .multi(True).include_all(True).all_value(".*").refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED))
    b = (gd.Dashboard("keel fleet").uid(UID).tags(["keel"]).refresh("30s").time("now-6h", "now")
         .description("keel's fleet: training, health and resources per host and rank (monitoring/board.py).")
         .with_variable(ds).with_variable(host).with_variable(process))
    for title, panels in (("Training", _training()), ("Health", _health()), ("Resources", _resources())):
        b = b.with_row(gd.Row(title))
        for p in panels:
            b = b.with_panel(p)
    return b.build()


def render() -> str:
    """The board as the JSON text committed in monitoring/keel-fleet.json."""
    return json.dumps(board(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def queries(doc: dict[str, Any]) -> list[str]:
    """Every PromQL expression in a board document: panel targets and query variables."""
    out = [t["expr"] for p in doc.get("panels", []) for t in p.get("targets", []) if t.get("expr")]
    for v in doc.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v["query"]
            out.append(q if isinstance(q, str) else q.get("query", ""))
    return out


_LABEL_VALUES = re.compile(r"^label_values\((?:(?P<sel>.+),\s*)?(?P<label>\w+)\)$")


def runnable(expr: str) -> str:
    """``expr`` as plain PromQL a Prometheus server can run: Grafana's variables filled in
    ($host/$process: match all; $__rate_interval: 1m) and ``label_values(sel, label)`` (Grafana's
    query-variable helper, not PromQL) turned into the selector it reads."""
    expr = expr.replace("$__rate_interval", "1m").replace("$host", ".*").replace("$process", ".*")
    m = _LABEL_VALUES.match(expr)
    return m.group("sel") if m and m.group("sel") else expr


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the committed board differs from the generated one")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if not BOARD.exists() or BOARD.read_text() != text:
            print(f"{BOARD}: out of date; run `make monitoring`", file=sys.stderr)
            return 1
        return 0
    atomic_write_text(BOARD, text, 0o644)  # replaced whole or not at all, like every file keel writes
    print(f"wrote {BOARD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
