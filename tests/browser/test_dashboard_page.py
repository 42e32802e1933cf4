"""The dashboard in a real headless Chromium, against a real `python -m dashboard` and a writer process.

One server, one writer and one browser page are shared by the module (each
test leaves them as it found them); every test reads what the page shows.
"""

from __future__ import annotations

import json
import os
import signal

import psutil
import pytest

from tests.integration.test_dashboard_server import start_dashboard, start_writer, write_config
from tests.support import ProcessReaper, free_port, is_alive, wait_until

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# Generous: these are upper bounds on a loaded 2-core CI box; a healthy run returns in a second or two.
T = 60

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A run dir fed by a writer, and the dashboard serving it."""
    root = tmp_path_factory.mktemp("dash")
    port = free_port()
    cfg = write_config(root, port, refresh=1.0, heartbeat_timeout=5.0, log_tail_lines=40)
    reaper = ProcessReaper()
    try:
        state = {"root": root, "port": port, "reaper": reaper}
        state["writer"] = start_writer(reaper, root, interval=0.05)
        state["server"] = start_dashboard(reaper, cfg, port)
        yield state
    finally:
        reaper.reap()


@pytest.fixture(scope="module")
def page(stack, chromium_path, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(profile), executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1300},
        )
        try:
            pg = ctx.new_page()
            pg.goto(f"http://127.0.0.1:{stack['port']}/", wait_until="load", timeout=T * 1000)
            pg.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0", timeout=T * 1000)
            yield pg
        finally:
            ctx.close()
    # nothing of this browser may outlive the module
    left = [p for p in psutil.process_iter(["cmdline"]) if str(profile) in " ".join(p.info["cmdline"] or [])]
    wait_until(lambda: not any(is_alive(p.pid) for p in left), T, what="chromium gone")


def source_len(page, name: str, column: str = "step") -> int:
    """Length of a column of a named ColumnDataSource in the browser's document (-1: no such model)."""
    return page.evaluate(
        """([name, column]) => {
            const m = Bokeh.documents[0].get_model_by_name(name);
            if (!m) return -1;
            const d = m.data;
            const col = d instanceof Map ? d.get(column) : d[column];
            return col ? col.length : -1;
        }""",
        [name, column],
    )


def last_value(page, name: str, column: str = "step") -> float | None:
    """The newest value of a column in the browser (lengths stop growing at the rollover)."""
    return page.evaluate(
        """([name, column]) => {
            const m = Bokeh.documents[0].get_model_by_name(name);
            if (!m) return null;
            const d = m.data;
            const col = d instanceof Map ? d.get(column) : d[column];
            return col && col.length ? col[col.length - 1] : null;
        }""",
        [name, column],
    )


def div_text(page, css_class: str) -> str:
    """The text a Bokeh Div shows (it lives in the element's shadow root)."""
    loc = page.locator(f".{css_class}")
    if loc.count() == 0:
        return ""
    return loc.first.evaluate(
        "e => Array.from((e.shadowRoot || e).children).filter(c => c.tagName !== 'STYLE')"
        ".map(c => c.textContent).join('\\n')"
    )


def table_rows(page) -> dict[str, str]:
    """The process table as the browser renders it: first cell (name) -> the whole row's text."""
    # textContent per cell: no layout needed, so a busy renderer still answers
    cells_per_row = page.locator(".slick-row").evaluate_all(
        "rows => rows.map(r => Array.from(r.querySelectorAll('.slick-cell')).map(c => c.textContent.trim()))"
    )
    return {cells[0]: " ".join(cells) for cells in cells_per_row if cells}


def row_has(page, name: str, *words: str):
    def check():
        row = table_rows(page).get(name, "")
        return row if all(w in row.split() or w in row for w in words) else None

    return check


def test_process_table_lists_the_stack_with_states(page):
    wait_until(row_has(page, "trainer", "running", "ok"), T, what="trainer running/ok")
    wait_until(row_has(page, "dashboard", "running"), T, what="dashboard row")
    wait_until(row_has(page, "watchdog", "missing"), T, what="watchdog missing (no status file)")
    header = div_text(page, "keel-header")
    assert "keel" in header and "test" in header and "health" in header


def test_loss_plot_grows_as_the_writer_writes(page):
    wait_until(lambda: source_len(page, "metrics:trainer") > 0, T, what="loss points")
    n0, step0 = source_len(page, "metrics:trainer"), last_value(page, "metrics:trainer")
    wait_until(lambda: source_len(page, "metrics:trainer") >= min(n0 + 10, 500), T, what="more loss points")
    wait_until(lambda: last_value(page, "metrics:trainer") >= step0 + 10, T, what="newer steps")
    # the loss line's values ("y": each metric is its own series, dashboard.curves) match its steps
    # (read in one evaluation: the source is redrawn between two)
    assert page.evaluate("""() => { const d = Bokeh.documents[0].get_model_by_name('metrics:trainer').data;
                            const g = (k) => (d instanceof Map ? d.get(k) : d[k]);
                            return g('y').length === g('step').length && g('y').length > 0; }""")


def test_no_gpu_is_said_not_hidden(page):
    wait_until(lambda: "no GPU" in div_text(page, "keel-gpu-note"), T, what="no-GPU note")
    assert page.locator(".keel-gpu-note").first.is_visible()


def test_corrupt_status_file_is_shown_as_corrupt(page, stack):
    bad = stack["root"] / "run" / "ghost.status.json"
    bad.write_bytes(b'{"schema_version": 1, "name": "gho')
    try:
        wait_until(row_has(page, "ghost", "corrupt"), T, what="ghost row corrupt")
        wait_until(lambda: "status ghost: corrupt" in div_text(page, "keel-errors"), T, what="error line for ghost")
        bad.write_bytes(json.dumps({"schema_version": 99}).encode())
        wait_until(row_has(page, "ghost", "unknown version"), T, what="ghost row unknown version")
    finally:
        bad.unlink()
    wait_until(lambda: "ghost" not in table_rows(page), T, what="ghost row gone")


def test_keeps_updating_after_status_files_are_deleted_and_recreated(page, stack):
    root, run = stack["root"], stack["root"] / "run"
    old = stack["writer"]
    os.kill(old.pid, signal.SIGKILL)  # the trainer dies without a goodbye
    wait_until(lambda: not is_alive(old.pid), T, what="writer gone")
    old.wait(timeout=10)
    # the one health vocabulary (keel.watch.verdicts): a gone pid is unhealthy, and the note says why
    wait_until(row_has(page, "trainer", "unhealthy", f"pid {old.pid} is gone"), T, what="trainer shown unhealthy (pid gone)")
    wait_until(lambda: "as of" in div_text(page, "keel-training"), T, what="training numbers marked as old")
    for p in ("trainer.status.json", "trainer.metrics.jsonl"):
        (run / p).unlink()
    wait_until(row_has(page, "trainer", "missing"), T, what="trainer missing")
    last_old = last_value(page, "metrics:trainer")
    stack["writer"] = start_writer(stack["reaper"], root, interval=0.05)
    wait_until(row_has(page, "trainer", "running", "ok"), T, what="trainer back")
    # the new writer starts again at step 1: its points arrive after the old ones, and keep coming
    first_new = wait_until(lambda: (v := last_value(page, "metrics:trainer")) is not None and v < last_old and v,
                           T, what="the new run's first points")
    wait_until(lambda: last_value(page, "metrics:trainer") >= first_new + 10, T, what="points after recreate")


# Where the newest log line is, against the scroll box that holds it, as the browser lays them out.
_NEWEST_LINE_BOX = """(marker) => {
    for (const host of document.querySelectorAll('.keel-logs')) {
        const root = host.shadowRoot || host;
        for (const pre of root.querySelectorAll('pre')) {
            const box = pre.closest('.keel-log-box') || pre, text = pre.firstChild;  // the box that scrolls
            const at = text ? text.data.indexOf(marker) : -1;
            if (at < 0) continue;
            const range = document.createRange();
            range.setStart(text, at);
            range.setEnd(text, at + marker.length);
            const line = range.getBoundingClientRect(), view = box.getBoundingClientRect();
            return {line_top: line.top, line_bottom: line.bottom, box_top: view.top, box_bottom: view.bottom,
                    overflows: box.scrollHeight > box.clientHeight + 1};
        }
    }
    return null;
}"""


def test_a_long_log_opens_at_its_newest_line(page, stack):
    """40 lines do not fit the log box: it must show its end, as ``tail`` does, not its oldest lines
    (which read as a stale log: found by looking at a screenshot of ``make run``)."""
    log = stack["root"] / "log" / "watchdog.log"  # no process of this stack writes it
    marker = f"newest line {os.getpid()}"
    with open(log, "a") as f:
        f.writelines(f"older line {i}\n" for i in range(60))
        f.write(marker + "\n")
    try:
        at = wait_until(lambda: page.evaluate(_NEWEST_LINE_BOX, marker), T, what="the newest log line on the page")
        assert at["overflows"], at  # the box is too short for the log: what it opens at matters
        assert at["box_top"] <= at["line_top"] and at["line_bottom"] <= at["box_bottom"] + 1, \
            f"the newest log line is scrolled out of its box: {at}"
    finally:
        log.unlink()


def test_screenshot_is_not_blank(page, tmp_path):
    from PIL import Image

    wait_until(lambda: source_len(page, "metrics:trainer") > 5, T, what="some points to draw")
    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    img = Image.open(shot).convert("RGB")
    assert img.width >= 1000 and img.height >= 800
    colors = img.getcolors(maxcolors=1 << 20) or []
    # a blank page is one or two colours; a drawn dashboard has text, lines and badges
    assert len(colors) > 50
    white = max(c for c, rgb in colors if rgb == (255, 255, 255)) if any(
        rgb == (255, 255, 255) for _, rgb in colors) else 0
    assert white < 0.97 * img.width * img.height
