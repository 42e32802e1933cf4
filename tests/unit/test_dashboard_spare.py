"""The spare page (dashboard.spare): built ahead of a tab, taken by it, brought up to date, refilled once."""

from __future__ import annotations

import logging

from bokeh.document import Document

from dashboard.collector import Collector
from dashboard.document import build_page, make_doc
from dashboard.spare import REFILL_AFTER_S, SparePage
from tests.unit.test_dashboard_page import cycle, run_dir  # noqa: F401 - run_dir is a fixture


class Later:
    """The loop's call_later, run by hand."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, object]] = []

    def __call__(self, delay, fn) -> None:
        self.calls.append((delay, fn))

    def run(self) -> None:
        calls, self.calls = self.calls, []
        for _, fn in calls:
            fn()


def test_a_tab_takes_the_spare_and_the_next_is_built_once_its_page_was_sent():
    built = []
    later = Later()
    spare = SparePage(lambda: built.append(len(built)) or f"page {len(built)}", later)
    assert spare.take() == "page 1" and spare.built_on_request == 1  # none ahead: built there and then
    spare.refill_soon()
    spare.refill_soon()  # asked twice (two tabs served): one build
    assert [d for d, _ in later.calls] == [REFILL_AFTER_S] and len(built) == 1
    later.run()
    assert spare.ready and len(built) == 2
    spare.refill_soon()  # one is ready: nothing more is built
    assert later.calls == []
    assert spare.take() == "page 2" and spare.taken == 1 and not spare.ready


def test_a_spare_that_cannot_be_built_is_logged_and_the_next_tab_builds_its_own(caplog):
    attempts = []

    def build():
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("no models today")
        return "page"

    later = Later()
    spare = SparePage(build, later)
    spare.refill_soon()
    with caplog.at_level(logging.ERROR, logger="dashboard.spare"):
        later.run()
    assert not spare.ready and "cannot build a spare page" in caplog.text and "no models today" in caplog.text
    assert spare.take() == "page" and spare.built_on_request == 1


def _seen(doc: Document, view) -> dict:
    """What a person reads on the page: the texts, the table, the loss line, the runs table (not the
    header: it is made whole at every update, from the clock and the session count)."""
    src = doc.get_model_by_name("metrics:trainer")
    return {"training": view.training.text,
            "table": {k: v for k, v in view.table_source.data.items() if k not in ("heartbeat", "progress", "uptime")},
            "loss": (list(src.data["step"]), list(src.data["y"])), "events": view.events.text,
            "runs": dict(view.runs.source.data), "incident": view.incident.div.text,
            "roots": [r.name for r in doc.roots]}


def test_a_page_built_ahead_shows_what_a_page_built_now_shows(run_dir):
    # built before the trainer's next 20 steps and a restart event: put into its Document, it catches up
    cfg, rep = run_dir
    c = Collector(cfg)
    cycle(c)
    ahead = build_page(c)
    assert ahead.doc is None and ahead.header.document is None  # in no Document yet
    rep.metrics([{"step": i, "loss": 1 / i, "lr": 0.01, "samples_per_s": 100.0} for i in range(31, 51)])
    rep.progress(step=50, loss=1 / 50)
    cycle(c)
    doc_ahead, doc_now = Document(), Document()
    view_ahead = make_doc(doc_ahead, c, ahead)
    assert view_ahead is ahead and ahead.doc is doc_ahead and ahead.runs.doc is doc_ahead
    view_now = make_doc(doc_now, c)
    seen = _seen(doc_ahead, view_ahead)
    assert seen == _seen(doc_now, view_now)
    assert seen["loss"][0][-1] == 50.0 and "step <b>50" in seen["training"]
    c.runner.close()


def test_make_doc_says_when_the_whole_page_is_in(run_dir):
    cfg, _ = run_dir
    c = Collector(cfg)
    cycle(c)
    served = []
    make_doc(Document(), c, served=lambda: served.append(1))  # a bare Document gets all of it at once
    assert served == [1]
    c.runner.close()
