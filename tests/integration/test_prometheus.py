"""A real Prometheus scrapes keel.prom through a real node_exporter while a real stack runs under
supervisord, with the shipped alert rules: keel's series are there, every board query runs, and a
SIGSTOPped trainer raises KeelProcessFrozen.

Everything listens on 127.0.0.1 on free ports and is stopped by the test (killed by pid, checked gone).
The rules are the shipped file; only their ``for:`` durations are shortened in a temp copy (minutes in
production), so the test sees pending then firing within seconds. The trainer's restart policy is
``never``: the watchdog judges and publishes it but does not restart it, so the frozen verdict lasts.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import textwrap
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest

from monitoring import board
from tests.integration.test_stack_e2e import Stack
from tests.support import REPO_ROOT, require_binary, free_port, is_alive, wait_until

pytestmark = pytest.mark.slow

ENV = "e2e"  # Stack's tools use this environment name
RULES = REPO_ROOT / "monitoring" / "keel.rules.yml"
FOR = "2s"  # every alert's `for:` in the test copy


def write_configs(root: Path, port: int) -> Path:
    cfg = root / "configs"
    cfg.mkdir(parents=True)
    (cfg / "base.yaml").write_text((REPO_ROOT / "configs" / "base.yaml").read_text())
    (cfg / f"{ENV}.yaml").write_text(textwrap.dedent(f"""\
        paths:
          root: {root}
        processes:
          trainer:
            num_workers: 0
            threads: 1
            report:
              status_interval: 250ms
            health:
              heartbeat_interval: 500ms
              heartbeat_timeout: 3s
              progress_timeout: 30s
              startup_grace: 30s
            restart:
              policy: never
          dashboard:
            port: {port}
          watchdog:
            poll_interval: 500ms
        """))
    return cfg


class Server:
    """One real server process of this test: started on a free 127.0.0.1 port, killed by pid."""

    def __init__(self, argv: list[str], port: int, log: Path) -> None:
        self.port = port
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def get(self, path: str, **params: str) -> bytes:
        url = f"http://127.0.0.1:{self.port}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read()

    def answers(self, path: str) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.proc.args[0]} exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
        try:
            self.get(path)
            return True
        except OSError:
            return False

    def stop(self) -> None:
        pid = self.proc.pid
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        assert not is_alive(pid)


def rules_copy(directory: Path) -> Path:
    """The shipped rules with only their `for:` values shortened."""
    text, n = re.subn(r"(?m)^(\s+for:) \S+$", rf"\1 {FOR}", RULES.read_text())
    assert n == RULES.read_text().count("alert:"), "every alert has a for:"
    out = directory / "keel.rules.yml"
    out.write_text(text)
    return out


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    prometheus = require_binary("prometheus", "prometheus")
    exporter = require_binary("prometheus-node-exporter", "prometheus-node-exporter")
    root = tmp_path_factory.mktemp("prom")
    st = Stack(root, free_port())
    write_configs(root, st.port)
    started: list[Server] = []
    stopped_pid: list[int] = []
    try:
        done = st.run("launch", "up", ENV, "--config-dir", str(st.cfg), "--timeout", "90")
        assert done.returncode == 0, done.stdout + done.stderr
        run_dir = Path(st.stack_file()["paths"]["run_dir"])
        wait_until(lambda: (run_dir / "keel.prom").exists(), 20, what="keel.prom written")
        ne_port = free_port()
        node = Server([exporter, "--collector.disable-defaults", "--collector.textfile",
                       f"--collector.textfile.directory={run_dir}", f"--web.listen-address=127.0.0.1:{ne_port}"],
                      ne_port, root / "node_exporter.log")
        started.append(node)
        wait_until(lambda: node.answers("/metrics"), 20, interval=0.2, what="node_exporter up")
        prom_dir = root / "prometheus"
        prom_dir.mkdir()
        rules = rules_copy(prom_dir)
        (prom_dir / "prometheus.yml").write_text(textwrap.dedent(f"""\
            global: {{scrape_interval: 1s, evaluation_interval: 1s}}
            rule_files: [{rules}]
            scrape_configs:
              - job_name: node
                static_configs: [{{targets: ["127.0.0.1:{ne_port}"]}}]
            """))
        p_port = free_port()
        prom = Server([prometheus, f"--config.file={prom_dir / 'prometheus.yml'}",
                       f"--storage.tsdb.path={prom_dir / 'data'}", f"--web.listen-address=127.0.0.1:{p_port}"],
                      p_port, root / "prometheus.log")
        started.append(prom)
        wait_until(lambda: prom.answers("/-/ready"), 30, interval=0.2, what="prometheus ready")
        yield st, prom, stopped_pid
    finally:
        for pid in stopped_pid:  # a SIGSTOPped trainer cannot stop: let it run before the stack goes down
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass
        for server in reversed(started):
            server.stop()
        st.run("launch", "down", ENV, timeout=120)
        for pid in st.all_pids():
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        wait_until(lambda: not st.all_pids(), 15, what="no stack process left")


def query(prom: Server, expr: str) -> dict:
    return json.loads(prom.get("/api/v1/query", query=expr))


def result(prom: Server, expr: str) -> list[dict]:
    doc = query(prom, expr)
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


def alerts(prom: Server, name: str) -> list[dict]:
    doc = json.loads(prom.get("/api/v1/alerts"))
    assert doc["status"] == "success"
    return [a for a in doc["data"]["alerts"] if a["labels"]["alertname"] == name]


def test_prometheus_scrapes_keel_series_runs_the_board_and_fires_frozen(servers):
    st, prom, stopped = servers
    host = socket.gethostname()
    # keel's series, through node_exporter, with keel's labels
    up = wait_until(lambda: result(prom, 'keel_process_up{process="trainer"} == 1'), 30, interval=0.5,
                    what="keel_process_up for the trainer in Prometheus")
    assert up[0]["metric"]["host"] == host and up[0]["metric"]["kind"] == "trainer"
    assert "rank" not in up[0]["metric"]  # empty on per-process series: Prometheus drops it
    wait_until(lambda: result(prom, 'keel_training_step{process="trainer"} > 0'), 60, interval=0.5,
               what="the trainer's steps in Prometheus")
    wait_until(lambda: result(prom, 'keel_process_verdict{process="trainer", rule="ok"}'), 30, interval=0.5,
               what="the trainer judged ok")
    assert result(prom, "keel_watchdog_last_poll_timestamp_seconds")[0]["metric"]["host"] == host
    assert result(prom, "keel_process_restarts_total")  # a counter, with its _total
    # every board query runs on the real server
    for expr in board.queries(json.loads(board.BOARD.read_text())):
        doc = query(prom, board.runnable(expr))
        assert doc["status"] == "success", (expr, doc)
    # the shipped rules are loaded; nothing fires on a healthy stack
    groups = json.loads(prom.get("/api/v1/rules"))["data"]["groups"]
    assert sum(len(g["rules"]) for g in groups) == RULES.read_text().count("alert:")
    assert alerts(prom, "KeelProcessFrozen") == []

    pid = json.loads((Path(st.stack_file()["paths"]["run_dir"]) / "trainer.status.json").read_text())["pid"]
    stopped.append(pid)
    os.kill(pid, signal.SIGSTOP)
    seen: set[str] = set()

    def firing() -> bool:
        for a in alerts(prom, "KeelProcessFrozen"):
            if a["labels"]["process"] == "trainer":
                seen.add(a["state"])
                if a["state"] == "firing":
                    return a
        return False

    alert = wait_until(firing, 45, interval=0.25, what="KeelProcessFrozen firing for the SIGSTOPped trainer")
    assert alert["labels"]["host"] == host and alert["labels"]["severity"] == "critical"
    assert "trainer on" in alert["annotations"]["summary"]
    assert seen == {"pending", "firing"}  # the `for:` held it pending first
    assert alerts(prom, "KeelWatchdogStale") == []  # the watchdog itself keeps polling
    os.kill(pid, signal.SIGCONT)
    stopped.remove(pid)
    wait_until(lambda: not [a for a in alerts(prom, "KeelProcessFrozen") if a["labels"]["process"] == "trainer"],
               45, interval=0.5, what="KeelProcessFrozen resolved after SIGCONT")
