"""The collector's failure paths over a real fixture run dir: a hung read, a failing scan, a loop that never stops."""

from __future__ import annotations

import asyncio
import json
import threading
import time

from bokeh.document import Document

from keel.status.reporter import ProcessReporter

from dashboard.collector import Collector
from dashboard.document import make_doc
from dashboard.rundir import RunDirReader
from tests.support import wait_until
from tests.unit.test_dashboard_page import cycle, run_dir  # noqa: F401 - run_dir is a fixture


class FlakyReader(RunDirReader):
    """The real reader, with one chosen operation made to hang or fail."""

    def __init__(self, cfg, hang: threading.Event | None = None, fail_scan: bool = False,
                 hang_metrics: threading.Event | None = None):
        super().__init__(cfg)
        self.hang = hang
        self.fail_scan = fail_scan
        self.hang_metrics = hang_metrics

    def metrics(self, names):
        out = super().metrics(names)  # read past these records, then held (a slow disk, NFS)
        if self.hang_metrics is not None and not self.hang_metrics.is_set():
            self.hang_metrics.wait(60)
        return out

    def sample(self, pids):
        if self.hang is not None and not self.hang.is_set():
            self.hang.wait(60)
        return super().sample(pids)

    def scan(self):
        if self.fail_scan:
            raise OSError(5, "Input/output error")
        return super().scan()


def test_a_hung_read_is_an_error_on_the_page_and_the_rest_keeps_updating(run_dir):
    cfg, rep = run_dir
    release = threading.Event()
    reader = FlakyReader(cfg, hang=release)
    c = Collector(cfg, reader=reader)  # read_timeout: 1s
    doc = Document()
    view = make_doc(doc, c)
    cycle(c)
    # the cycle came back while the sampler is still held: it gave up on the read, it did not wait
    assert "resources" in c.runner.busy() and not release.is_set()
    assert "no answer after 1s" in c.errors["resources"]
    rep.progress(step=99)
    cycle(c)  # the stuck sampler is not started again; statuses still move
    assert "still busy" in c.errors["resources"]
    view.update()
    assert "resources" in view.errors.text and "still busy" in view.errors.text
    assert "step <b>99" in view.training.text
    assert "degraded" in view.header.text or "failing" in view.header.text
    release.set()
    wait_until(lambda: not c.runner.busy(), 30, what="the released sampler finished")
    cycle(c)
    assert "resources" not in c.errors
    c.runner.close()


def test_a_metrics_read_that_timed_out_loses_no_record(run_dir):
    # the read went past the fixture's 30 records, then hung past read_timeout: its records come with
    # the next cycle, and the records written meanwhile with the one after
    cfg, rep = run_dir
    release = threading.Event()
    c = Collector(cfg, reader=FlakyReader(cfg, hang_metrics=release))
    cycle(c)
    assert "metrics" in c.runner.busy() and "trainer" not in c.metrics
    assert "no answer after 1s" in c.errors["metrics"]
    release.set()
    wait_until(lambda: not c.runner.busy(), 30, what="the held metrics read finished")
    rep.metrics([{"step": i, "loss": 1 / i} for i in range(31, 41)])
    cycle(c)
    assert len(c.metrics["trainer"]) == 30 and "metrics" not in c.errors
    cycle(c)
    assert list(c.metrics["trainer"].arrays()["step"]) == [float(i) for i in range(1, 41)]
    c.runner.close()


def test_a_failing_scan_keeps_the_last_statuses_and_says_so(run_dir):
    cfg, _ = run_dir
    reader = FlakyReader(cfg)
    c = Collector(cfg, reader=reader)
    cycle(c)
    assert c.rows["name"][0] == "trainer"
    reader.fail_scan = True
    cycle(c)
    assert "Input/output error" in c.errors["status scan"]
    assert c.rows["name"][0] == "trainer" and c.cycles == 2
    c.runner.close()


def test_collector_loop_never_stops_and_writes_its_own_status(run_dir, tmp_path):
    cfg, _ = run_dir
    made = []

    def factory():
        r = ProcessReporter(cfg.run_dir, "dashboard", "dashboard", heartbeat_interval=60)
        made.append(r)
        return r

    async def main():
        c = Collector(cfg, reader=FlakyReader(cfg, fail_scan=True), reporter_factory=factory)
        c.start()
        deadline = time.monotonic() + 60  # bounds the wait only; 3 cycles of 0.3 s take about 1 s
        while c.cycles < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await c.stop()
        return c

    c = asyncio.run(main())
    assert c.cycles >= 3 and "status scan" in c.errors
    st = json.loads((tmp_path / "run" / "dashboard.status.json").read_text())
    assert st["state"] == "stopped" and st["kind"] == "dashboard"
    assert "status scan" in st["payload"]["read_errors"]
    assert st["payload"]["last_refresh"] is not None
