"""``python -m dashboard``: the embedded Bokeh server, its one collector, and clean shutdown.

The collector is created once per process and started by the application's
server-loaded hook (not per browser session). SIGTERM/SIGINT destroy the
sessions, stop the collector (its status says "stopped") and return 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import signal
import sys
import threading
import time
from typing import Any, Callable

from bokeh.application import Application
from bokeh.application.handlers.function import FunctionHandler
from bokeh.application.handlers.lifecycle import LifecycleHandler
from bokeh.core.validation import silence
from bokeh.core.validation.warnings import MISSING_RENDERERS
from bokeh.document import Document
from bokeh.server.server import Server
from bokeh.settings import settings as bokeh_settings
from tornado.ioloop import IOLoop

from keel.logs import setup_logging
from keel.status.reporter import ProcessReporter

from dashboard.auth import PasswordAuth, load_hash
from dashboard.collector import Collector
from dashboard.config import ConfigError, DashboardConfig, check_bind, is_loopback, load_config
from dashboard.hostcheck import install_on_server
from dashboard.malloc import fix_mmap_threshold
from dashboard.document import build_page, make_doc
from dashboard.page import SessionView
from dashboard.spare import SparePage

log = logging.getLogger("dashboard.server")
SHUTDOWN_DEADLINE = 10.0  # seconds; supervisord's stopwaitsecs should be longer


# The first spare page is built this long after the server loaded: after the collector's first read.
FIRST_SPARE_AFTER_S = 1.0


class CollectorHooks(LifecycleHandler):
    """Starts the shared collector when the server has loaded the application, then builds the first
    spare page (dashboard.spare)."""

    def __init__(self, collector: Collector, spare: SparePage[SessionView]) -> None:
        super().__init__()

        def loaded(server_context: Any) -> None:
            collector.start()
            spare.refill_soon(FIRST_SPARE_AFTER_S)

        self._on_server_loaded = loaded


def page_spare(collector: Collector) -> SparePage[SessionView]:
    """The server's one spare page, built and refilled on the server's loop (the caller's: call it there)."""

    def build() -> SessionView:
        t0 = time.perf_counter()
        view = build_page(collector)
        ms = round((time.perf_counter() - t0) * 1000, 1)
        log.info("spare page built in %.0f ms", ms, extra={"event": "spare_built", "ms": ms})
        return view

    return SparePage(build, lambda delay, fn: IOLoop.current().call_later(delay, fn))


def tab_page(collector: Collector, spare: SparePage[SessionView]) -> Callable[[Document], None]:
    """The application's page for a new tab: the spare's models put into the tab's Document (the next
    spare is built once the whole page went out); logs how long the tab's request held the loop for it."""

    def page(doc: Document) -> None:
        t0 = time.perf_counter()
        from_spare = spare.ready
        make_doc(doc, collector, spare.take(), spare.refill_soon)
        ms = round((time.perf_counter() - t0) * 1000, 1)
        log.info("new tab's page in %.0f ms (%s)", ms, "spare" if from_spare else "built on request",
                 extra={"event": "tab_page", "ms": ms, "from_spare": from_spare})

    return page


def websocket_origins(cfg: DashboardConfig) -> list[str]:
    """The configured origins; on loopback without a list, the two names of this host and port."""
    if cfg.allow_websocket_origin:
        return list(cfg.allow_websocket_origin)
    if not is_loopback(cfg.address):
        raise ConfigError("a non-loopback address needs dashboard.allow_websocket_origin")
    names = [f"127.0.0.1:{cfg.port}", f"localhost:{cfg.port}"]
    if cfg.address not in ("127.0.0.1", "localhost", "::1"):
        names.insert(0, f"{cfg.address}:{cfg.port}")
    return names


def build_server(cfg: DashboardConfig, collector: Collector, auth: PasswordAuth | None = None) -> Server:
    """A Bokeh Server bound as configured, with the page at "/" (call inside a running loop); every
    request's Host header is checked against the same names as the websocket Origin (dashboard.hostcheck)."""
    spare = page_spare(collector)
    app = Application(FunctionHandler(tab_page(collector, spare)), CollectorHooks(collector, spare))
    origins = websocket_origins(cfg)
    unused_ms = max(1, int(cfg.unused_session_lifetime * 1000))
    kwargs: dict[str, Any] = dict(
        address=cfg.address,
        port=cfg.port,
        allow_websocket_origin=origins,
        keep_alive_milliseconds=int(cfg.keep_alive * 1000),
        unused_session_lifetime_milliseconds=unused_ms,
        # check at least as often as the lifetime, so a closed tab is freed on time
        check_unused_sessions_milliseconds=max(500, min(unused_ms, 17_000)),
        use_index=False,
        # Session ids signed with a per-process key: a client cannot invent one.
        secret_key=secrets.token_urlsafe(32).encode(),
        sign_sessions=True,
    )
    if auth is not None:
        kwargs["auth_provider"] = auth
        kwargs["cookie_secret"] = secrets.token_urlsafe(32)
    server = Server({"/": app}, **kwargs)
    install_on_server(server, origins)
    trim_page_scripts(server)
    return server


# The BokehJS bundles the page needs. A Bokeh server sends every bundle to every page (it cannot know
# what a document will hold): MathJax alone is 1.8 MB of script, more than BokehJS itself, parsed by
# every new tab, and WebGL is unused (the page's Divs set disable_math; the plots draw on canvas).
PAGE_BUNDLES = ("bokeh", "bokeh-widgets", "bokeh-tables")


def trim_page_scripts(server: Server) -> None:
    """Serve the page with PAGE_BUNDLES only: wraps the tornado application's ``resources`` (public, but
    the application is not: the same checked lookup as the Host check's)."""
    app = getattr(server, "_tornado", None)
    if app is None or not callable(getattr(app, "resources", None)):
        raise RuntimeError("bokeh.server.server.Server has no tornado application with resources() at ._tornado")
    full = app.resources

    def resources(absolute_url: Any = None) -> Any:
        res = full(absolute_url)
        return res.clone(components=[c for c in res.components if c in PAGE_BUNDLES])

    app.resources = resources


def close_sessions(server: Server) -> int:
    """Close every session's websocket with 1001 (going away); returns how many sessions.

    The Documents are not destroyed one by one: Bokeh runs a full gc.collect() per
    destroyed Document, which only delays an exit that frees everything anyway.
    """
    sessions = server.get_sessions()
    for session in sessions:
        # Bokeh has no public "close this connection"; the ws handler's close() is
        # the clean way to tell the browser.
        for conn in list(getattr(session, "_subscribed_connections", ())):
            try:
                conn._socket.close(1001, "dashboard stopping")
            except Exception:  # noqa: BLE001 - best effort; the process exits next
                pass
    return len(sessions)


def arm_exit_deadline(seconds: float) -> threading.Timer:
    """After SIGTERM, exit within ``seconds`` even if some cleanup step hangs."""

    def force() -> None:
        log.error("clean shutdown took more than %gs; exiting now", seconds, extra={"event": "forced_exit"})
        logging.shutdown()
        os._exit(0)

    timer = threading.Timer(seconds, force)
    timer.daemon = True
    timer.start()
    return timer


async def serve(cfg: DashboardConfig, auth: PasswordAuth | None, *, ready: Callable[[str], None] | None = None) -> int:
    """Run until SIGTERM/SIGINT; 0 on a clean stop."""

    def reporter() -> ProcessReporter:
        return ProcessReporter(cfg.run_dir, cfg.name, "dashboard", durability=cfg.durability,  # type: ignore[arg-type]
                               heartbeat_interval=cfg.heartbeat_interval)

    collector = Collector(cfg, reporter_factory=reporter)
    server = build_server(cfg, collector, auth)
    server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    url = f"http://{cfg.address}:{server.port}/"
    log.info("dashboard listening on %s", url, extra={"event": "listening", "url": url})
    if ready is not None:
        ready(url)
    await stop.wait()
    log.info("stopping", extra={"event": "stopping"})
    deadline = arm_exit_deadline(SHUTDOWN_DEADLINE)
    server.unlisten()
    n = close_sessions(server)
    server.stop(wait=False)
    await collector.stop()
    log.info("stopped; closed %d session(s)", n, extra={"event": "stopped"})
    deadline.cancel()
    if collector.runner.busy():
        # A read is stuck in the kernel (hung NFS?); its thread would block interpreter exit.
        log.warning("exiting with stuck reads: %s", collector.runner.busy())
        logging.shutdown()
        os._exit(0)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m dashboard``; 2 for a configuration error."""
    ap = argparse.ArgumentParser(prog="python -m dashboard", description="keel's live dashboard (Bokeh server)")
    ap.add_argument("--config", default=os.environ.get("KEEL_CONFIG"),
                    help="resolved file, build/<env>/dashboard.json (default: $KEEL_CONFIG)")
    args = ap.parse_args(argv)
    if not args.config:
        print("dashboard: --config build/<env>/dashboard.json is required", file=sys.stderr)
        return 2
    # The dashboard never computes on a GPU; NVML (read-only metrics) does not need CUDA.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    fix_mmap_threshold()  # freed big arrays go back to the system (dashboard/malloc.py)
    try:
        cfg = load_config(args.config)
        check_bind(cfg)
        auth = PasswordAuth(cfg.auth.username, load_hash(cfg.auth)) if cfg.auth.required else None
    except ConfigError as exc:
        print(f"dashboard: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.name, fmt=cfg.log_format, level=cfg.log_level)  # type: ignore[arg-type]
    # Bokeh installs its own stderr handler when imported before logging is set up;
    # route its records through ours so supervisord's log stays one JSON line each.
    bokeh_log = logging.getLogger("bokeh")
    for handler in list(bokeh_log.handlers):
        bokeh_log.removeHandler(handler)
    bokeh_log.propagate = True
    # Plots get their lines when the first series arrives; an empty plot is expected.
    silence(MISSING_RENDERERS, True)
    # Bokeh validates every new session's document (0.14 s of the event loop for this page's 433 models, each
    # time a tab opens, before its page is sent): the page is the same code every time, so the unit tests
    # validate it once (tests/unit/test_dashboard_page.py) and the server does not.
    bokeh_settings.perform_document_validation.set_value(False)
    try:
        return asyncio.run(serve(cfg, auth))
    except OSError as exc:  # the port is taken, the address is not ours
        print(f"dashboard: cannot listen on {cfg.address}:{cfg.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
