"""The real `python -m dashboard` process: binding rules, origins, auth, own status, SIGTERM, SIGKILL.

Also holds the helpers the browser tests share: a resolved config in tmp_path
and a writer process that publishes a trainer's status and metrics through the
real status layer (ProcessReporter).
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.resolved import edit_resolved, resolve_stack
from tests.support import PYTHON, REPO_ROOT, free_port, is_alive, wait_until

pytestmark = pytest.mark.slow

# Upper bounds for waits on a loaded 2-core box; a healthy run returns well before.
T = 60


# --------------------------------------------------------------------------- helpers (shared)


def write_config(root: Path, port: int, *, origins: list[str] | None = None, auth: dict | None = None,
                 refresh: float = 0.3, history_points: int = 500, heartbeat_timeout: float = 3.0,
                 log_tail_lines: int = 5) -> Path:
    """`root/dashboard.json` and `root/keel.json` (trainer, dashboard, watchdog), by the real resolver."""
    (root / "run").mkdir(parents=True, exist_ok=True)
    (root / "log").mkdir(parents=True, exist_ok=True)
    health = {"heartbeat_interval": 0.5, "heartbeat_timeout": heartbeat_timeout,
              "progress_timeout": 10.0, "startup_grace": 5.0}
    dashboard: dict = {"kind": "dashboard", "port": port, "refresh": refresh, "history_points": history_points,
                       "log_tail_lines": log_tail_lines, "keep_alive": 5.0, "unused_session_lifetime": 15.0, "health": health}
    if origins is not None:
        dashboard["allow_origins"] = origins
    if auth is not None:
        dashboard["auth"] = auth
    resolve_stack(root, {
        "trainer": {"kind": "trainer", "health": health},
        "dashboard": dashboard,
        "watchdog": {"kind": "watchdog", "health": health},
    })
    return root / "dashboard.json"


def run_writer(run_dir: str, name: str = "trainer", interval: float = 0.05, log_file: str | None = None,
               work_ms: float = 0.0) -> None:
    """A stand-in trainer: one step every `interval` s through the real ProcessReporter, until SIGTERM."""
    from keel.status.models import State
    from keel.status.reporter import ProcessReporter

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    rep = ProcessReporter(run_dir, name, "trainer", heartbeat_interval=0.5)
    rep.start({"run_id": "test"})
    rep.set_state(State.RUNNING)
    log = open(log_file, "a", buffering=1) if log_file else None
    step = 0
    while not stop:
        step += 1
        t_end = time.perf_counter() + work_ms / 1000.0
        while time.perf_counter() < t_end:  # a little CPU work, like a real step
            pass
        loss = 1.0 / (1.0 + 0.01 * step)
        rec = {"step": step, "loss": loss, "lr": 1e-3, "samples_per_s": 640.0, "grad_norm": 0.5}
        if step % 10 == 0:
            rec["val_loss"] = loss * 1.1
        rep.metrics([rec])
        rep.progress(step=step, epoch=step // 100, loss=loss, lr=1e-3, samples_per_s=640.0, eta_s=1000.0 - step)
        if log and step % 10 == 0:
            log.write(json.dumps({"ts": "2026-01-01T00:00:00", "level": "info", "message": f"step {step}"}) + "\n")
        time.sleep(interval)
    rep.close()


def start_writer(reaper, root: Path, name: str = "trainer", interval: float = 0.05, work_ms: float = 0.0):
    code = (f"from tests.integration.test_dashboard_server import run_writer; "
            f"run_writer({str(root / 'run')!r}, {name!r}, {interval}, {str(root / 'log' / (name + '.log'))!r}, {work_ms})")
    proc = reaper.popen([PYTHON, "-c", code], cwd=REPO_ROOT, env=_env())
    wait_until(lambda: (root / "run" / f"{name}.status.json").exists(), T, what="writer's first status")
    return proc


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), CUDA_VISIBLE_DEVICES="")
    env.pop("KEEL_CONFIG", None)
    return env


def start_dashboard(reaper, cfg: Path, port: int, *, expect_ready: bool = True) -> subprocess.Popen:
    """Start `python -m dashboard`; wait until it answers HTTP on `port`."""
    err = open(cfg.parent / "dashboard.stderr", "ab")
    proc = reaper.popen([PYTHON, "-m", "dashboard", "--config", str(cfg)], cwd=REPO_ROOT, env=_env(),
                        stdout=err, stderr=err)
    if expect_ready:
        def up() -> bool:
            assert proc.poll() is None, (cfg.parent / "dashboard.stderr").read_text()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/login-probe", timeout=2)
            except urllib.error.HTTPError:
                return True  # it answered (404): listening
            except OSError:
                return False
            return True
        wait_until(up, T, interval=0.2, what="dashboard listening")
    return proc


def read_status(root: Path, name: str) -> dict:
    return json.loads((root / "run" / f"{name}.status.json").read_text())


def session_token(port: int, opener=None) -> str:
    """Load the page (creating a session) and pull its signed token out of the HTML."""
    opener = opener or urllib.request.build_opener()
    html = opener.open(f"http://127.0.0.1:{port}/", timeout=T).read().decode()
    m = re.search(r'"token":\s*"([^"]+)"', html) or re.search(r'token&quot;:&quot;([^&]+)&', html)
    assert m, html[:500]
    return m.group(1)


async def _ws_connect(port: int, token: str, origin: str, cookie: str | None = None):
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    headers = {"Origin": origin}
    if cookie:
        headers["Cookie"] = cookie
    req = HTTPRequest(f"ws://127.0.0.1:{port}/ws", headers=headers)
    return await websocket_connect(req, subprotocols=["bokeh", token])


def ws_status(port: int, token: str, origin: str, cookie: str | None = None) -> int:
    """101 when the websocket opens and Bokeh answers (its ACK), 0 when the server
    accepts the handshake but closes at once, else the HTTP status it answered."""
    from tornado.httpclient import HTTPClientError

    async def go() -> int:
        try:
            conn = await _ws_connect(port, token, origin, cookie)
        except HTTPClientError as exc:
            return exc.code
        first = await asyncio.wait_for(conn.read_message(), T)
        conn.close()
        return 101 if first is not None else 0

    return asyncio.run(go())


# --------------------------------------------------------------------------- tests


def test_refuses_non_loopback_address_without_origin_list(tmp_path, reaper):
    # The model refuses this (keel.config.load), so only a hand edit of the resolved file gets here.
    cfg = write_config(tmp_path, free_port())
    edit_resolved(cfg, {"dashboard.address": "0.0.0.0", "dashboard.allow_websocket_origin": []})
    proc = start_dashboard(reaper, cfg, 0, expect_ready=False)
    assert proc.wait(timeout=T) == 2
    err = (tmp_path / "dashboard.stderr").read_text().strip().splitlines()
    assert len(err) == 1 and "non-loopback" in err[0] and "allow_websocket_origin" in err[0], err


def test_refuses_auth_required_without_a_password_hash(tmp_path, reaper):
    # The model refuses this (AuthSettings), so only a hand edit of the resolved file gets here.
    cfg = write_config(tmp_path, free_port())
    edit_resolved(cfg, {"dashboard.auth.required": True})
    proc = start_dashboard(reaper, cfg, 0, expect_ready=False)
    assert proc.wait(timeout=T) == 2
    assert "no default password" in (tmp_path / "dashboard.stderr").read_text()


def test_serves_writes_own_status_and_exits_0_on_sigterm_with_a_session_open(tmp_path, reaper):
    port = free_port()
    cfg = write_config(tmp_path, port)
    start_writer(reaper, tmp_path)
    proc = start_dashboard(reaper, cfg, port)

    def running() -> dict | None:
        try:
            s = read_status(tmp_path, "dashboard")
        except (OSError, ValueError):
            return None
        return s if s["state"] == "running" and s["payload"]["last_refresh"] else None

    first = wait_until(running, T, what="dashboard status running")
    assert first["kind"] == "dashboard" and first["pid"] == proc.pid
    # progress moves every refresh: the watchdog can tell a hung dashboard
    wait_until(lambda: read_status(tmp_path, "dashboard")["progress_mono"] > first["progress_mono"], 10,
               what="dashboard progress moving")
    # no torch in the running server, not even as a shared library
    maps = Path(f"/proc/{proc.pid}/maps").read_text()
    assert "libtorch" not in maps and "/torch/" not in maps
    # the page loads the BokehJS bundles it uses and not MathJax (1.8 MB) or WebGL (dashboard.server)
    html = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=T).read().decode()
    scripts = set(re.findall(r"static/js/(bokeh[a-z-]*)\.min\.js", html))
    assert scripts == {"bokeh", "bokeh-widgets", "bokeh-tables"}, scripts

    # an open websocket session; SIGTERM must close it and exit 0 promptly
    async def session_then_term() -> tuple[int, float, str | None]:
        conn = await _ws_connect(port, session_token(port), f"http://127.0.0.1:{port}")
        wait_until(lambda: read_status(tmp_path, "dashboard")["payload"]["sessions"] >= 1, T, what="session counted")
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        while True:  # read until the server closes the socket
            msg = await asyncio.wait_for(conn.read_message(), T)
            if msg is None:
                break
        code = await asyncio.get_running_loop().run_in_executor(None, proc.wait, T)
        return code, time.monotonic() - t0, conn.close_reason

    code, _took, _reason = asyncio.run(session_then_term())
    assert code == 0
    # a clean stop, not the forced exit the server falls back to after SHUTDOWN_DEADLINE
    assert "forced_exit" not in (tmp_path / "dashboard.stderr").read_text()
    final = read_status(tmp_path, "dashboard")
    assert final["state"] == "stopped"


def log_events(root: Path, event: str) -> list[dict]:
    """The dashboard's JSON log records of one ``event`` (its stderr, as supervisord would keep it)."""
    out = []
    for line in (root / "dashboard.stderr").read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("event") == event:
            out.append(rec)
    return out


def test_each_new_tab_takes_a_page_built_ahead(tmp_path, reaper):
    # dashboard.spare: one page is built after the server loads and again once a tab's whole page is in
    # its Document (REST_AFTER_S without a browser to say it is ready): every tab here gets one
    port = free_port()
    cfg = write_config(tmp_path, port)
    start_writer(reaper, tmp_path)
    start_dashboard(reaper, cfg, port)
    for tab in (1, 2):
        wait_until(lambda: len(log_events(tmp_path, "spare_built")) >= tab, T, what=f"spare page {tab} built")
        session_token(port)
        pages = wait_until(lambda: log_events(tmp_path, "tab_page")[tab - 1:], T, what=f"tab {tab} served")
        assert pages[0]["from_spare"] is True, pages


def test_websocket_from_a_foreign_origin_is_refused(tmp_path, reaper):
    port = free_port()
    cfg = write_config(tmp_path, port)
    start_dashboard(reaper, cfg, port)
    token = session_token(port)
    assert ws_status(port, token, "http://evil.example") == 403
    assert ws_status(port, token, f"http://evil.example:{port}") == 403
    # the control: the same token from the page's own origin is accepted
    assert ws_status(port, session_token(port), f"http://127.0.0.1:{port}") == 101


def test_explicit_origin_list_replaces_the_default(tmp_path, reaper):
    port = free_port()
    cfg = write_config(tmp_path, port, origins=[f"dash.example:{port}"])
    start_dashboard(reaper, cfg, port)
    # localhost is in the default list but not in this one. (An Origin equal to the
    # request's Host header is same-origin and tornado >= 6.6 accepts it before asking.)
    assert ws_status(port, session_token(port), f"http://localhost:{port}") == 403
    assert ws_status(port, session_token(port), f"http://dash.example:{port}") == 101


def test_auth_login_required_and_checked(tmp_path, reaper):
    from dashboard.auth import hash_password

    port = free_port()
    pw_file = tmp_path / "dashboard.pw"
    pw_file.write_text(hash_password("s3cret-horse") + "\n")
    cfg = write_config(tmp_path, port, auth={"required": True, "username": "keel", "password_file": str(pw_file)})
    start_dashboard(reaper, cfg, port)
    base = f"http://127.0.0.1:{port}"

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a, **k):
            return None

    # not logged in: the page redirects to the login form, the websocket is refused
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.build_opener(NoRedirect).open(base + "/", timeout=10)
    assert e.value.code == 302 and e.value.headers["Location"].startswith("/login")

    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    with pytest.raises(urllib.error.HTTPError) as e:
        opener.open(base + "/login", data=urllib.parse.urlencode({"username": "keel", "password": "wrong"}).encode(),
                    timeout=10)
    assert e.value.code == 401
    assert not list(jar)
    resp = opener.open(base + "/login", data=urllib.parse.urlencode(
        {"username": "keel", "password": "s3cret-horse"}).encode(), timeout=10)
    assert resp.status == 200 and "Bokeh" in resp.read().decode()
    cookie = "; ".join(f"{c.name}={c.value}" for c in jar)
    token = session_token(port, opener)
    assert ws_status(port, token, base, cookie=None) == 0
    assert ws_status(port, token, base, cookie=cookie) == 101


def test_sigkill_of_the_dashboard_leaves_the_trainer_alone(tmp_path, reaper):
    port = free_port()
    cfg = write_config(tmp_path, port, refresh=0.1)
    writer = start_writer(reaper, tmp_path, interval=0.01, work_ms=5.0)
    dash = start_dashboard(reaper, cfg, port)
    token = session_token(port)  # a live session, so the server is busy
    assert token

    def step() -> int:
        return read_status(tmp_path, "trainer")["payload"]["step"]

    wait_until(lambda: (tmp_path / "run" / "dashboard.status.json").exists(), T, what="dashboard status")
    before = step()
    wait_until(lambda: step() > before, T, what="the writer steps while the dashboard serves")
    os.kill(dash.pid, signal.SIGKILL)
    wait_until(lambda: not is_alive(dash.pid), T, what="dashboard gone")
    # the trainer neither stalls nor dies with the dashboard: it holds nothing the trainer waits
    # on (what the fault costs in steps/s is bench/isolation_bench.py's to measure)
    dead_at = step()
    wait_until(lambda: step() > dead_at + 10, T, what="the writer steps on after the dashboard died")
    assert is_alive(writer.pid)
    # the trainer's files are intact: a valid snapshot, whole metrics lines, no temp files
    from keel.status.reader import StatusReader

    st = StatusReader(tmp_path / "run").read("trainer")
    assert st and st.state.value == "running"
    lines = (tmp_path / "run" / "trainer.metrics.jsonl").read_text().splitlines()
    assert lines and all(json.loads(x)["step"] for x in lines[:-1])
    # a writer's temp file exists for an instant during each write; one that stays is a leftover
    def temps() -> set[str]:
        return {p for p in os.listdir(tmp_path / "run") if p.startswith(".") or ".tmp" in p}

    first = temps()
    seen = step()
    wait_until(lambda: step() > seen + 5, T, what="a few more writes")  # each replaces its temp file
    assert not (first & temps())
    assert psutil.Process(writer.pid).status() != psutil.STATUS_ZOMBIE
