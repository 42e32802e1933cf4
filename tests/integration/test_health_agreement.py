"""The page, `bin/status --json` and keel.prom agree on every process of a real stack after a real fault.

A stack rendered by bin/render-config (tests/integration/test_watchdog.py's ``Stack``)
runs under a real supervisord: two stand-in workers, the real dashboard server
(``python -m dashboard``) and the real watchdog. One worker is frozen with SIGSTOP;
the watchdog restarts it. Once it is healthy again with restarts_total 1, the
three readers must show, for every process, the same health word and the same
restart count: ``bin/status`` (a subprocess), keel.prom (parsed by
prometheus_client) and the page in headless Chromium (the process table's
ColumnDataSource in the browser's Bokeh document, and the cells it renders).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from keel.watch.prom import HEALTH_CODES
from tests.integration.test_watchdog import Stack, worker
from tests.support import REPO_ROOT, ProcessReaper, free_port, is_alive, wait_until

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# Generous upper bounds for a loaded 2-core box; a healthy run gets there in seconds.
T = 90
ENV = "test"  # the environment test_watchdog.Stack renders
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CODE_TO_WORD = {code: word for word, code in HEALTH_CODES.items()}
NO_COUNT = "—"  # what the page shows for an unknown restart count (dashboard.present.DASH)


def dashboard(port: int) -> dict:
    return {"kind": "dashboard", "port": port, "refresh": "1s", "startsecs": "1s", "stop": {"timeout": "5s"},
            "health": {"heartbeat_interval": "0.5s", "heartbeat_timeout": "10s", "startup_grace": "60s"}}


def bin_status(build_root: Path) -> dict:
    """`bin/status test --json` as a user runs it (exit 0 healthy, 1 not)."""
    env = {**os.environ, "KEEL_BUILD_ROOT": str(build_root)}
    done = subprocess.run([str(REPO_ROOT / "bin" / "status"), ENV, "--json"], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode in (0, 1), done.stdout + done.stderr
    return json.loads(done.stdout)


def status_view(doc: dict) -> dict[str, tuple[str, int | None]]:
    return {p["name"]: (p["health"], p["restarts"]) for p in doc["processes"]}


def prom_view(path: Path) -> dict[str, tuple[str, int]]:
    """keel.prom's keel_process_health (as its word) and keel_process_restarts_total per process."""
    health: dict[str, str] = {}
    restarts: dict[str, int] = {}
    for family in text_string_to_metric_families(path.read_text()):
        for sample in family.samples:
            if sample.name == "keel_process_health":
                health[sample.labels["process"]] = CODE_TO_WORD[int(sample.value)]
            elif sample.name == "keel_process_restarts_total":
                restarts[sample.labels["process"]] = int(sample.value)
    assert health.keys() == restarts.keys(), (health, restarts)
    return {name: (health[name], restarts[name]) for name in health}


PAGE_TABLE_JS = """() => {
    const m = Bokeh.documents[0].get_model_by_name("processes");
    if (!m) return null;
    const d = m.data;
    const col = k => Array.from((d instanceof Map ? d.get(k) : d[k]) || []);
    return {name: col("name"), health: col("health"), restarts: col("restarts"), note: col("note")};
}"""
# The table's cells as rendered; Playwright's CSS locator pierces the widgets' shadow roots.
PAGE_CELLS_JS = "rows => rows.map(r => Array.from(r.querySelectorAll('.slick-cell')).map(c => c.textContent.trim()))"


def page_view(page) -> dict[str, tuple[str, int | None, str, list[str]]]:
    """Per row of the page's process table: health, restart count (None for a dash), note, the rendered cells."""
    table = page.evaluate(PAGE_TABLE_JS)
    if not table:
        return {}
    rendered = {cells[0]: cells for cells in page.locator(".slick-row").evaluate_all(PAGE_CELLS_JS) if cells}
    return {
        name: (health, None if restarts == NO_COUNT else int(restarts), note, rendered.get(name, []))
        for name, health, restarts, note in zip(table["name"], table["health"], table["restarts"], table["note"])
    }


def recovered(doc: dict) -> bool:
    """The stable moment: the watchdog reports, w1 was restarted once and is ok again, everything else is ok."""
    view = status_view(doc)
    return (doc["watchdog_reporting"] and view.get("w1") == ("ok", 1)
            and all(health == "ok" for health, _ in view.values()))


def test_page_bin_status_and_prom_agree_on_every_process_after_a_restart(chromium_path):
    from playwright.sync_api import sync_playwright

    port = free_port()
    reaper = ProcessReaper()
    # stable_after 10m: no budget_reset replaces the restart as the last action during the test
    # 4s timeouts: a slow box must not get a healthy worker restarted too (w1's count must stay 1)
    calm = {"heartbeat_timeout": "4s", "progress_timeout": "4s"}
    s = Stack({"w1": worker("ok", health=calm), "w2": worker("ok", health=calm), "dashboard": dashboard(port)},
              {"stable_after": "10m"})
    build_root = s.dir / "builds"  # bin/status finds <KEEL_BUILD_ROOT>/<env>/keel.json
    build_root.mkdir()
    (build_root / ENV).symlink_to(s.build, target_is_directory=True)
    seen: set[int] = set()  # every pid of the stack, so that the end can check each is gone

    def remember() -> None:
        if s.proc is not None and s.proc.poll() is None:
            seen.update(p.pid for p in psutil.Process(s.proc.pid).children(recursive=True))

    frozen = None
    try:
        s.start(reaper)
        seen.add(s.proc.pid)
        wait_until(lambda: all_ok(bin_status(build_root)), T, interval=0.5, what="stack healthy")
        frozen = s.running_pid("w1")
        remember()
        os.kill(frozen, signal.SIGSTOP)
        wait_until(lambda: s.events("w1", "restart"), T, interval=0.2, what="the watchdog's restart event")
        (restart,) = s.events("w1", "restart")
        assert restart["rule"] in ("heartbeat_stale", "progress_stale") and restart["pid"] == frozen, restart
        wait_until(lambda: recovered(bin_status(build_root)), T, interval=0.5, what="w1 restarted once and ok")
        remember()
        assert not is_alive(frozen)

        profile = s.dir / "chromium-profile"
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(str(profile), executable_path=chromium_path, headless=True,
                                                        args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 900})
            try:
                page = ctx.new_page()
                page.goto(f"http://127.0.0.1:{port}/", wait_until="load", timeout=T * 1000)
                page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0", timeout=T * 1000)
                last: dict = {}

                def agree() -> bool:
                    # Each reader refreshes on its own clock (poll, page refresh); in the stable
                    # state they converge to one picture, and agreeing readers stay agreed.
                    doc = bin_status(build_root)
                    prom, shown = prom_view(s.run_dir / "keel.prom"), page_view(page)
                    last.update(status=doc, prom=prom, page=shown)
                    return recovered(doc) and all_agree(doc, prom, shown)

                try:
                    wait_until(agree, T, interval=0.5, what="page, bin/status and keel.prom agreeing")
                except AssertionError as exc:
                    raise AssertionError(f"{exc}: {last}") from None
                doc, prom, shown = last["status"], last["prom"], last["page"]
            finally:
                ctx.close()
            left = [p for p in psutil.process_iter(["cmdline"]) if str(profile) in " ".join(p.info["cmdline"] or [])]
            wait_until(lambda: not any(is_alive(p.pid) for p in left), T, what="chromium gone")

        # What agreed, spelt out: the restarted worker (published by the watchdog) and the unwatched watchdog.
        by_name = {p["name"]: p for p in doc["processes"]}
        assert set(by_name) == {"w1", "w2", "dashboard", "watchdog"} == set(shown)
        assert prom["w1"] == ("ok", 1) and shown["w1"][:2] == ("ok", 1)
        assert by_name["w1"]["last_action"] == "restart" and by_name["w1"]["judged_by"] == "watchdog"
        assert "watchdog" not in prom and by_name["watchdog"]["restarts"] is None and shown["watchdog"][1] is None
    finally:
        remember()
        if frozen is not None and is_alive(frozen):
            os.kill(frozen, signal.SIGCONT)
        s.stop()  # SIGTERM to supervisord, which stops its programs
        for pid in seen:
            if is_alive(pid):
                os.kill(pid, signal.SIGKILL)
        reaper.reap()
        wait_until(lambda: not any(is_alive(p) for p in seen), 30, what=f"stack gone: {sorted(seen)}")


def all_ok(doc: dict) -> bool:
    """Before the fault: the watchdog reports and every process is ok."""
    return doc["watchdog_reporting"] and all(p["health"] == "ok" for p in doc["processes"])


def all_agree(doc: dict, prom: dict, shown: dict) -> bool:
    """Every process: one health word and one restart count in bin/status, keel.prom and the page.

    The watchdog is not watched (it cannot restart itself): no keel.prom row, and its
    restart count is unknown in both others. Every other process is judged by the
    watchdog, so the page's note carries no "[local: ...]" label.
    """
    status = status_view(doc)
    if set(status) != set(shown):
        return False
    for name, (health, restarts) in status.items():
        page_health, page_restarts, note, cells = shown[name]
        if (page_health, page_restarts) != (health, restarts) or health not in cells:
            return False
        kind = next(p["kind"] for p in doc["processes"] if p["name"] == name)
        if kind == "watchdog":
            if name in prom or restarts is not None:
                return False
        elif prom.get(name) != (health, restarts) or "[local:" in note:
            return False
    return True
