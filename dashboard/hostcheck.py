"""The Host header check (DNS rebinding): a request naming a host we do not serve gets 403.

A page on ``http://evil.example:5006/`` whose name the attacker re-points at 127.0.0.1
talks to the dashboard as same-origin: its Origin equals its Host, which tornado
(>= 6.6) accepts for the websocket before Bokeh's origin list is asked. The Host it
sends still says ``evil.example``, so every request is refused unless its Host is:

- a loopback name: ``localhost`` or a loopback IP literal (127.0.0.0/8, ``[::1]``), on
  any port: a browser sends these only for a URL that names them, which rebinding
  cannot make, and an SSH tunnel (``ssh -L 8080:localhost:5006``) arrives with its own
  local port;
- or one of the configured names (``allow_origins``, the same list the websocket
  Origin is checked against), matched by Bokeh's own ``check_allowlist``: a listed name
  with a port needs that port, a listed name without one matches any port, ``*``
  wildcards as Bokeh has them. Other IP literals (``10.0.0.5:5006``) are not special:
  list them.

A request without a Host header (HTTP/1.0) is tornado's "127.0.0.1": allowed (browsers
always send one). The refusal is one log line per foreign host per ``LOG_EVERY_S``,
counting the ones not logged, so a hostile page cannot flood the log.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable

from bokeh.server.util import check_allowlist
from tornado.httputil import HTTPServerRequest
from tornado.routing import Matcher, Rule
from tornado.web import Application, RequestHandler

from keel.config.netaddr import is_loopback

log = logging.getLogger("dashboard.hostcheck")
LOG_EVERY_S = 60.0


def split_host(host: str) -> tuple[str, str | None]:
    """``name:port`` -> (name, port); ``[::1]:5006`` -> ("::1", "5006"); the port is None when absent."""
    host = host.strip()
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        return name, rest[1:] if rest.startswith(":") and rest[1:] else None
    if host.count(":") == 1:
        name, port = host.split(":")
        return name, port or None
    return host, None  # a bare name, or a bare IPv6 literal (no brackets: no port)


def host_allowed(host: str, allowed: Iterable[str]) -> bool:
    """Is ``host`` (a Host header) one we serve? See the module docstring for the rules."""
    name, port = split_host(host)
    if not name:
        return False
    if is_loopback(name):
        return True
    if port is not None and not port.isdigit():
        return False
    return check_allowlist(f"{name.lower()}:{port or 80}", [a.lower() for a in allowed])


class RefusedHosts:
    """Counts and logs refusals: at most one line per host per ``LOG_EVERY_S`` seconds."""

    def __init__(self, mono: Callable[[], float] = time.monotonic) -> None:
        self._mono = mono
        self._last: dict[str, tuple[float, int]] = {}  # host -> (last logged, refused since)
        self.total = 0

    def refused(self, host: str, path: str, remote: str | None) -> None:
        self.total += 1
        now = self._mono()
        last, quiet = self._last.get(host, (None, 0))
        if last is not None and now - last < LOG_EVERY_S:
            self._last[host] = (last, quiet + 1)
            return
        if len(self._last) > 1000:  # many distinct hosts: forget the old ones rather than grow
            self._last.clear()
        self._last[host] = (now, 0)
        log.warning("refused a request with foreign Host %r (%s from %s; %d more since the last line): "
                    "possible DNS rebinding; add the name to dashboard.allow_origins if it is yours",
                    host[:200], path[:200], remote, quiet,
                    extra={"event": "host_refused", "host": host[:200], "path": path[:200], "remote": remote,
                           "not_logged": quiet})


class _ForeignHost(Matcher):
    """Matches every request whose Host is not allowed (so the rule routes it to the refusal)."""

    def __init__(self, allowed: list[str]) -> None:
        self.allowed = allowed

    def match(self, request: HTTPServerRequest) -> dict[str, Any] | None:
        return None if host_allowed(request.host or "", self.allowed) else {}


def refusal_handler(refusals: RefusedHosts) -> type[RequestHandler]:
    class RefuseHost(RequestHandler):
        """403 for any method, the websocket upgrade included (it is a GET first)."""

        def prepare(self) -> None:
            refusals.refused(self.request.host or "", self.request.path, self.request.remote_ip)
            self.set_status(403)
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            self.finish("403: this dashboard is not served under that host name\n")

    return RefuseHost


def install(app: Application, allowed: Iterable[str], refusals: RefusedHosts | None = None) -> RefusedHosts:
    """Put the check in front of every route of ``app`` (a tornado Application: Bokeh's, the
    login pages and static files included); returns the refusal counter."""
    refusals = refusals or RefusedHosts()
    rule = Rule(_ForeignHost(list(allowed)), refusal_handler(refusals))
    # tornado routes by the first matching rule of its default router; ours goes first.
    app.default_router.rules.insert(0, app.default_router.process_rule(rule))
    return refusals


def install_on_server(server: Any, allowed: Iterable[str]) -> RefusedHosts:
    """``install`` on a bokeh ``Server``'s tornado application. Bokeh does not expose it
    publicly (``extra_patterns`` only adds routes after its own), hence the checked lookup."""
    app = getattr(server, "_tornado", None)
    if not isinstance(app, Application):
        raise RuntimeError("bokeh.server.server.Server has no tornado application at ._tornado: "
                           "the Host check cannot be installed (bokeh changed?)")
    return install(app, allowed)
