"""What a person sees in the training curves, read from the page's own BokehJS models in a real Chromium.

A stand-in trainer writes validation results as records of their own (as the real trainer does),
is SIGKILLed and resumed from an earlier step; the page must draw continuous lines, no fold-back,
a restart marker and a smoothing that follows its slider. Screenshots go to $KEEL_ARTIFACTS or tmp.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.browser.test_dashboard_page import CHROMIUM_ARGS, T
from tests.integration.test_dashboard_server import REPO_ROOT, _env, start_dashboard, write_config
from tests.support import ProcessReaper, free_port, is_alive, wait_until

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def run_split_writer(run_dir: str, start: int, interval: float) -> None:
    """Train records every step, a validation record of its own every 10 steps; from step ``start``."""
    import random

    from keel.status.models import State
    from keel.status.reporter import ProcessReporter

    rep = ProcessReporter(run_dir, "trainer", "trainer", heartbeat_interval=0.5)
    rep.start({"run_id": "test"})
    rep.set_state(State.RUNNING)
    step = start
    while True:
        step += 1
        loss = 1.0 / (1.0 + 0.01 * step) + 0.05 * random.random()
        recs = [{"step": step, "t": time.time(), "loss": loss, "lr": 1e-3 * (1 + step % 7), "samples_per_s": 600.0
                 + 50 * random.random(), "grad_norm": 0.5}]
        if step % 10 == 0:
            recs.append({"step": step, "t": time.time(), "val_loss": loss * 1.1})
        rep.metrics(recs)
        rep.progress(step=step, epoch=0, loss=loss, lr=1e-3, samples_per_s=640.0, eta_s=100.0)
        time.sleep(interval)


def _start(reaper, root: Path, start: int):
    code = (f"from tests.browser.test_training_curves import run_split_writer; "
            f"run_split_writer({str(root / 'run')!r}, {start}, 0.03)")
    return reaper.popen([sys.executable, "-c", code], cwd=REPO_ROOT, env=_env())


def _series(page, name):
    return page.evaluate("""(name) => {
        const m = Bokeh.documents[0].get_model_by_name(name);
        if (!m) return null;
        const d = m.data, g = (k) => Array.from(d instanceof Map ? d.get(k) : d[k]);
        return {x: g('x'), y: g('y')};
    }""", name)


def _artifacts(tmp_path) -> Path:
    d = Path(os.environ.get("KEEL_ARTIFACTS") or tmp_path) / "training_curves"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _continuous(s) -> bool:
    return s is not None and len(s["y"]) >= 20 and all(v is not None and v == v for v in s["y"])


@contextlib.contextmanager
def _session(tmp_path, chromium_path):
    """A dashboard over a split-record writer, and one Chromium page on it; everything killed after."""
    from playwright.sync_api import sync_playwright

    root = tmp_path / "s"
    root.mkdir()
    port = free_port()
    cfg = write_config(root, port, refresh=1.0, heartbeat_timeout=5.0)
    reaper = ProcessReaper()
    try:
        state = {"root": root, "reaper": reaper, "writer": _start(reaper, root, 0)}
        start_dashboard(reaper, cfg, port)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1500, "height": 1300})
                page.goto(f"http://127.0.0.1:{port}/", wait_until="load", timeout=T * 1000)
                page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0", timeout=T * 1000)
                state["page"] = page
                wait_until(lambda: _continuous(_series(page, "metrics:trainer")), T, what="a loss line")
                yield state
            finally:
                browser.close()
    finally:
        reaper.reap()
    assert not any(p.name() == "chromium" and p.ppid() == os.getpid() for p in psutil.process_iter())


def _js_equals_numpy(page, name: str, weight: float) -> bool:
    import numpy as np

    from dashboard.smoothing import ema

    got = page.evaluate("""(name) => {
        const d = Bokeh.documents[0].get_model_by_name(name).data;
        const col = (k) => Array.from(d instanceof Map ? d.get(k) : d[k]);
        return {x: col('x'), y: col('y'), s: (window.keel_smoothed || {})[name] || null}; }""", name)
    if not got["s"] or len(got["s"]) != len(got["y"]) or len(got["y"]) < 20:
        return False  # not drawn yet, or drawn from an older version of the data
    as_array = lambda v: np.array([np.nan if a is None else a for a in v], dtype=float)  # noqa: E731
    want = ema(as_array(got["x"]), as_array(got["y"]), weight)
    return bool(np.allclose(as_array(got["s"]), want, rtol=1e-9, atol=1e-12, equal_nan=True))


def test_curves_are_continuous_and_smoothing_follows_the_slider(tmp_path, chromium_path):
    art = _artifacts(tmp_path)
    with _session(tmp_path, chromium_path) as st:
        page = st["page"]
        names = ["metrics:trainer", "metrics:trainer:lr", "metrics:trainer:samples_per_s"]
        wait_until(lambda: all(_continuous(_series(page, n)) for n in names), T, what="continuous lines")
        val = wait_until(lambda: (s := _series(page, "metrics:trainer:val_loss")) and len(s["y"]) >= 3 and s,
                         T, what="validation points")
        assert all(v == v for v in val["y"])
        page.screenshot(path=str(art / "1-continuous.png"), full_page=True)

        # Hold the writer still while comparing: points streamed in at 10 updates a second otherwise
        # leave the stashed smoothed series a point behind the source on a loaded machine.
        os.kill(st["writer"].pid, signal.SIGSTOP)

        def smoothed():
            return page.evaluate("() => (window.keel_smoothed || {})['metrics:trainer'] || null")
        wait_until(lambda: smoothed() is not None, T, what="a smoothed series drawn")
        page.evaluate("() => { Bokeh.documents[0].get_model_by_name('smoothing').value = 0.0; }")
        raw_like = wait_until(lambda: (s := smoothed()) and (r := _series(page, "metrics:trainer"))
                              and len(s) == len(r["y"]) and s == r["y"] and s, T, what="weight 0 = raw")
        page.evaluate("() => { Bokeh.documents[0].get_model_by_name('smoothing').value = 0.95; }")
        smooth = wait_until(lambda: (s := smoothed()) and s != _series(page, "metrics:trainer")["y"] and s,
                            T, what="weight 0.95 differs from raw")
        assert max(smooth) - min(smooth) < max(raw_like) - min(raw_like)
        # what the browser drew is dashboard.smoothing.ema (the debiased, time-weighted EMA), not some other average
        wait_until(lambda: _js_equals_numpy(page, "metrics:trainer", 0.95), T, what="the page's EMA = smoothing.ema")
        page.screenshot(path=str(art / "2-smoothed.png"), full_page=True)
        page.evaluate("() => { Bokeh.documents[0].get_model_by_name('log_toggle:loss').active = true; }")
        y_axis = """() => { const f = Bokeh.documents[0].get_model_by_name('loss_plot');
                            return {scale: f.y_scale.type, ticker: f.left[0].ticker.type,
                                    start: f.y_range.start, end: f.y_range.end}; }"""
        log_y = wait_until(lambda: (a := page.evaluate(y_axis))["scale"] == "LogScale" and a, T, what="log loss plot")
        assert log_y["ticker"] == "LogTicker"
        # the range refits the data on the log scale: positive, and holding every drawn loss point
        drawn = [v for v in _series(page, "metrics:trainer")["y"] if v is not None and v == v]
        wait_until(lambda: 0 < (a := page.evaluate(y_axis))["start"] <= min(drawn) and a["end"] >= max(drawn), T,
                   what="the log range around the loss")
        # two animation frames: the browser has painted the plot on its new scale (a condition, not a fixed sleep)
        page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(true))))")
        page.screenshot(path=str(art / "4-log-loss.png"), full_page=True)
        page.evaluate("() => { Bokeh.documents[0].get_model_by_name('log_toggle:loss').active = false; }")
        back = wait_until(lambda: (a := page.evaluate(y_axis))["scale"] == "LinearScale" and a, T, what="linear again")
        assert back["ticker"] == "BasicTicker"


def test_after_sigkill_and_resume_no_fold_back_lost_work_faint_and_a_restart_marker(tmp_path, chromium_path):
    art = _artifacts(tmp_path)
    with _session(tmp_path, chromium_path) as st:
        page, writer = st["page"], st["writer"]
        wait_until(lambda: len(_series(page, "metrics:trainer")["x"]) >= 100, T, what="100 steps")
        last = max(_series(page, "metrics:trainer")["x"])
        os.kill(writer.pid, signal.SIGKILL)
        wait_until(lambda: not is_alive(writer.pid), T, what="writer gone")
        writer.wait(timeout=10)
        resume = int(last) - 40
        st["writer"] = _start(st["reaper"], st["root"], resume)
        wait_until(lambda: max(_series(page, "metrics:trainer")["x"]) > last + 20, T, what="resumed points")
        wait_until(lambda: len(_series(page, "metrics:trainer:lost")["x"]) >= 20, T, what="the lost work drawn")
        page.screenshot(path=str(art / "3-resumed.png"), full_page=True)
        s = _series(page, "metrics:trainer")
        assert all(b >= a for a, b in zip(s["x"], s["x"][1:])), "the live line folds back in x"
        lost = _series(page, "metrics:trainer:lost")
        assert lost and min(lost["x"]) > resume and len(lost["x"]) >= 20, lost["x"][:5]
        gaps = [x for x, v in zip(s["x"], s["y"]) if v is None or v != v]
        assert gaps == [resume + 1], gaps  # one gap, where the trainer was down
        ev = page.evaluate("""() => { const d = Bokeh.documents[0].get_model_by_name('training_events').data;
                              return Array.from(d instanceof Map ? d.get('what') : d.what); }""")
        assert any("restart" in e and f"step {resume + 1}" in e for e in ev), ev


_PLOT_BOX = """(name) => {
    const pv = Bokeh.index.get_one(Bokeh.documents[0].get_model_by_name(name));
    const r = pv.canvas_view.el.getBoundingClientRect(), f = pv.frame.bbox;
    return {left: r.left + f.left, top: r.top + f.top, width: f.width, height: f.height};
}"""


def _x_range(page, name):
    return page.evaluate("""(name) => { const r = Bokeh.documents[0].get_model_by_name(name).x_range;
                            return [r.start, r.end]; }""", name)


def _box_zoom(page, name: str, x0: float, x1: float) -> tuple[float, float]:
    """Drag a box with the mouse over ``name``'s plot from ``x0`` to ``x1`` (fractions of its frame's
    width) and the middle 60 % of its height; the x range it zoomed to. On a loaded box a drag
    sometimes does not take (ci-local: once after the plot had moved under the mouse, as an error line
    appeared above it; once with the plot where it was measured, cause not found): it is made again,
    where the plot now is, up to three times. Three misses fail, with where the plot was each time."""
    missed = []
    for _ in range(3):
        box, whole = page.evaluate(_PLOT_BOX, name), _x_range(page, name)
        page.mouse.move(box["left"] + x0 * box["width"], box["top"] + 0.2 * box["height"])
        page.mouse.down()
        page.mouse.move(box["left"] + x1 * box["width"], box["top"] + 0.8 * box["height"], steps=8)
        page.mouse.up()
        # the plot takes the range on the mouse-up; a busy page may hold it a little (read before the
        # redraw, the range read was the whole run's)
        try:
            r = wait_until(lambda: (r := _x_range(page, name)) != whole and r[1] - r[0] < 0.5 * (
                whole[1] - whole[0]) and r, 10, what="the box zoom applied")
            return r[0], r[1]
        except AssertionError:
            missed.append((box, whole, _x_range(page, name)))
    raise AssertionError(f"the box zoom missed {name} three times (box, range before, after): {missed}")


def test_x_axis_choice_and_a_box_zoom_are_redrawn_by_the_server(tmp_path, chromium_path):
    art = _artifacts(tmp_path)
    with _session(tmp_path, chromium_path) as st:
        page = st["page"]
        wait_until(lambda: len(_series(page, "metrics:trainer")["x"]) >= 80, T, what="80 steps")
        page.evaluate("() => { Bokeh.documents[0].get_model_by_name('x_mode').value = 'rel'; }")

        def relative():  # ms since the first record, rising
            x = _series(page, "metrics:trainer")["x"]
            return x[0] == 0 and x[-1] > 1000 and all(b > a for a, b in zip(x, x[1:])) and x
        wait_until(relative, T, what="x as time since the first record")
        label = page.evaluate("() => Bokeh.documents[0].get_model_by_name('loss_plot').below[0].axis_label")
        assert label == "time since the run's first record"
        page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(true))))")
        page.screenshot(path=str(art / "5-relative-time.png"), full_page=True)
        page.evaluate("() => { Bokeh.documents[0].get_model_by_name('x_mode').value = 'step'; }")
        wait_until(lambda: _series(page, "metrics:trainer")["x"][0] == 1, T, what="x as the step again")

        # a real box zoom over the middle of the loss plot, with the mouse
        page.evaluate("""() => { const p = Bokeh.documents[0].get_model_by_name('loss_plot');
                         p.toolbar.active_drag = p.toolbar.tools.find(t => t.type === 'BoxZoomTool'); }""")
        lo, hi = _box_zoom(page, "loss_plot", 0.3, 0.6)

        def windowed():  # the server sent only the visible range: every point inside, one beyond each edge
            x = _series(page, "metrics:trainer")["x"]
            return len(x) > 5 and x[0] <= lo < x[1] and x[-2] <= hi <= x[-1] and x
        x = wait_until(windowed, T, what=f"the zoomed range {lo:.1f}-{hi:.1f} redrawn by the server")
        assert all(b - a == 1 for a, b in zip(x, x[1:])), "a zoomed range shows every step"
        page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(true))))")
        page.screenshot(path=str(art / "6-zoomed.png"), full_page=True)
        page.evaluate("(name) => Bokeh.index.get_one(Bokeh.documents[0].get_model_by_name(name)).reset()",
                      "loss_plot")
        wait_until(lambda: _series(page, "metrics:trainer")["x"][0] == 1
                   and _series(page, "metrics:trainer")["x"][-1] > hi, T, what="the whole run after a reset")
