"""The real `python -m dashboard`: the Host header check (DNS rebinding) and change-driven reads."""

from __future__ import annotations

import http.client
import re

import pytest

from tests.browser.test_dashboard_page import CHROMIUM_ARGS
from tests.integration.test_dashboard_server import T, log_events, start_dashboard, start_writer, write_config
from tests.support import free_port, wait_until

pytestmark = pytest.mark.slow


def get(port: int, host: str | None, path: str = "/") -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=T)
    try:
        conn.putrequest("GET", path, skip_host=True)
        if host is not None:
            conn.putheader("Host", host)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


def refusals(cfg) -> list[dict]:
    return log_events(cfg.parent, "host_refused")


def test_a_foreign_host_header_gets_403_and_a_log_line(tmp_path, reaper):
    port = free_port()
    cfg = write_config(tmp_path, port)
    start_dashboard(reaper, cfg, port)
    status, body = get(port, f"evil.example:{port}")
    assert status == 403 and "not served under that host name" in body
    assert get(port, "evil.example")[0] == 403
    # the websocket upgrade and Bokeh's static files go through the same check
    assert get(port, f"evil.example:{port}", "/ws")[0] == 403
    assert get(port, f"evil.example:{port}", "/static/js/bokeh.min.js")[0] == 403
    wait_until(lambda: refusals(cfg), T, what="the refusal's log line")
    line = refusals(cfg)[0]
    assert line["host"] == f"evil.example:{port}" and line["level"] in ("warning", "WARNING"), line
    # the controls: loopback names (any port: a tunnel) and the page's own names get the page
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost:8080", f"[::1]:{port}"):
        status, body = get(port, host)
        assert status == 200 and "bokeh" in body.lower(), (host, status)


def test_an_allowed_origin_name_is_served_and_an_unlisted_ip_is_not(tmp_path, reaper):
    port = free_port()
    cfg = write_config(tmp_path, port, origins=[f"dash.example:{port}"])
    start_dashboard(reaper, cfg, port)
    assert get(port, f"dash.example:{port}")[0] == 200
    assert get(port, f"dash.example:{port + 1}")[0] == 403
    assert get(port, f"10.0.0.5:{port}")[0] == 403


def _shown_step(page) -> int | None:
    """The step the page's training summary shows, read from the browser's own document."""
    text = page.evaluate("() => { const m = Bokeh.documents[0].get_model_by_name('training');"
                         " return m ? m.text : '' }")
    m = re.search(r"step <b>(\d+)", text or "")
    return int(m.group(1)) if m else None


@pytest.mark.browser
def test_status_writes_reach_an_open_page_without_waiting_for_the_refresh(tmp_path, reaper, chromium_path):
    from playwright.sync_api import sync_playwright

    port = free_port()
    # Full cycles and the sessions' own timers 30 s apart: only a change-driven read and push explain a new step.
    cfg = write_config(tmp_path, port, refresh=30.0)
    start_writer(reaper, tmp_path, interval=0.2)
    start_dashboard(reaper, cfg, port)
    profile = tmp_path / "chromium-profile"
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(str(profile), executable_path=chromium_path, headless=True,
                                                    args=CHROMIUM_ARGS)
        try:
            page = ctx.new_page()
            page.goto(f"http://127.0.0.1:{port}/", wait_until="load", timeout=T * 1000)
            page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0", timeout=T * 1000)
            wait_until(lambda: _shown_step(page) is not None, T, interval=0.1, what="a step on the page")
            seen = {_shown_step(page)}
            # refresh is 30 s: four steps within 25 s can only come from change-driven pushes
            wait_until(lambda: seen.add(_shown_step(page)) or len(seen) >= 4, 25, interval=0.05,
                       what="three more steps pushed to the page")
        finally:
            ctx.close()
    assert None not in seen  # the step stayed on the page while it moved (never blanked between pushes)
