"""The runs panel in a real Chromium against a real `python -m dashboard`, over runs of the real trainer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.browser.test_dashboard_page import CHROMIUM_ARGS, T
from tests.browser.test_training_curves import _series
from tests.integration import trainer_fixtures
from tests.integration.test_dashboard_server import start_dashboard, write_config
from tests.support import ProcessReaper, free_port, wait_until

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ARTIFACTS = Path(__file__).resolve().parents[2] / "var" / "test-artifacts"


def overlay(page, label: str) -> dict | None:
    """The overlay lines named `overlay:<label>` as the browser holds them: the loss line's points and
    whether it is drawn as the baseline (black), or None when there is none."""
    return page.evaluate(
        """(label) => {
            const doc = Bokeh.documents[0];
            const all = doc.all_models ? Array.from(doc.all_models) : Array.from(doc._all_models.values());
            const rs = all.filter(m => m.name === "overlay:" + label && m.data_source);
            if (!rs.length) return null;
            const r = rs.find(x => x.data_source.name === "overlay:" + label + ":loss") || rs[0];
            const d = r.data_source.data;
            const col = d instanceof Map ? d.get("x") : d.x;
            return {points: col ? col.length : 0, lines: rs.length,
                    baseline: rs.some(x => JSON.stringify(x.glyph.line_color).includes("black"))};  // a color spec is {value: ...}; removed renderers may linger in all_models
        }""",
        label,
    )


def test_two_earlier_runs_overlay_and_a_pinned_baseline_survives_a_reload(tmp_path, reaper, chromium_path):
    from playwright.sync_api import sync_playwright

    ids = []
    for max_steps in (40, 25):  # two runs of the real trainer, checkpoints cleared between them
        config = trainer_fixtures.write_config(tmp_path, max_steps=max_steps, num_workers=0, val_every_steps=10,
                                                  report=trainer_fixtures.EVERY_STEP)
        tp = trainer_fixtures.start_trainer(reaper, config, log_name=f"trainer-{max_steps}.log")
        assert tp.wait(timeout=120) == 0, tp.log_path.read_text()[-2000:]
        ids.append(tp.payload()["run_id"])
        shutil.rmtree(tp.checkpoint_dir)
    port = free_port()
    cfg = write_config(tmp_path, port, refresh=1.0, heartbeat_timeout=5.0)  # the same run dir
    start_dashboard(reaper, cfg, port)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=chromium_path,
                                                    headless=True, args=CHROMIUM_ARGS,
                                                    viewport={"width": 1400, "height": 1500})
        try:
            pg = ctx.new_page()
            pg.goto(f"http://127.0.0.1:{port}/", wait_until="load", timeout=T * 1000)
            pg.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0", timeout=T * 1000)
            for run_id in ids:
                pg.get_by_text(run_id, exact=True).first.wait_for(timeout=T * 1000)
            assert overlay(pg, f"run {ids[0]}") is None
            # the live curves are the latest run's: the run before it in the same metrics file is another
            # run (in the runs table), not this one's restart with its 40 steps drawn as lost work
            wait_until(lambda: len((_series(pg, "metrics:trainer") or {"x": []})["x"]) >= 20, T, what="live line")
            live, lost = _series(pg, "metrics:trainer"), _series(pg, "metrics:trainer:lost")
            assert 1 <= min(live["x"]) and max(live["x"]) <= 25 and lost["x"] == [], (live["x"], lost["x"])
            marks = pg.evaluate("""() => { const d = Bokeh.documents[0].get_model_by_name('training_events').data;
                                   return Array.from(d instanceof Map ? d.get('what') : d.what); }""")
            assert not [m for m in marks if "restart" in m], marks

            # a person's clicks: one row, then ctrl-click the other
            pg.get_by_text(ids[0], exact=True).first.click()
            pg.get_by_text(ids[1], exact=True).first.click(modifiers=["Control"])
            for run_id in ids:
                wait_until(lambda: (overlay(pg, f"run {run_id}") or {}).get("points", 0) >= 20, T,
                           what=f"overlay of run {run_id}")
            lines = [overlay(pg, f"run {i}") for i in ids]
            assert lines[0]["points"] > lines[1]["points"]  # 40 steps against 25: each run its own data
            pg.screenshot(path=str(ARTIFACTS / "runs-overlay.png"), full_page=True)

            # pin the second run as the baseline, in the Select that offers the runs
            selects = pg.locator("select")
            (pin,) = [selects.nth(i) for i in range(selects.count())
                      if any(ids[1] in t for t in selects.nth(i).evaluate("e => Array.from(e.options).map(o => o.text)"))]
            pin.select_option(label=f"{ids[1]} (trainer)")
            wait_until(lambda: (overlay(pg, f"run {ids[1]}") or {}).get("baseline"), T, what="baseline drawn")

            pg.reload(wait_until="load", timeout=T * 1000)
            pg.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0", timeout=T * 1000)
            wait_until(lambda: (overlay(pg, f"run {ids[1]}") or {}).get("baseline"), T, what="baseline after reload")
            assert overlay(pg, f"run {ids[1]}")["points"] >= 20
            assert overlay(pg, f"run {ids[0]}") is None  # a selection is not a pin: it did not survive
            pg.screenshot(path=str(ARTIFACTS / "runs-baseline-after-reload.png"), full_page=True)
        finally:
            ctx.close()


@pytest.fixture
def reaper():
    r = ProcessReaper()
    try:
        yield r
    finally:
        r.reap()
