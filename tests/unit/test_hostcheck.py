"""dashboard.hostcheck: which Host headers are served, and the refusal log's throttle."""

from __future__ import annotations

import logging

import pytest

from dashboard.hostcheck import LOG_EVERY_S, RefusedHosts, host_allowed, split_host

ALLOWED = ["127.0.0.1:5006", "localhost:5006", "dash.example:5006", "proxy.example"]


@pytest.mark.parametrize("host,parts", [
    ("a.example:80", ("a.example", "80")), ("a.example", ("a.example", None)), ("[::1]:5006", ("::1", "5006")),
    ("[::1]", ("::1", None)), ("::1", ("::1", None)), ("a.example:", ("a.example", None)),
])
def test_split_host(host, parts):
    assert split_host(host) == parts


@pytest.mark.parametrize("host", [
    "127.0.0.1:5006", "localhost:5006", "LOCALHOST:5006", "localhost", "127.0.0.1:8080",  # a tunnel's own port
    "127.1.2.3:5006", "[::1]:5006", "dash.example:5006", "DASH.example:5006", "proxy.example", "proxy.example:80",
    "proxy.example:8080",  # a listed name without a port: any port, as in Bokeh's origin check
])
def test_loopback_names_and_the_configured_ones_are_served(host):
    assert host_allowed(host, ALLOWED)


@pytest.mark.parametrize("host", [
    "evil.example:5006", "evil.example", "dash.example:5007", "dash.example",
    "10.0.0.5:5006", "0.0.0.0:5006", "localhost.evil.example:5006", "127.0.0.1.evil.example", "", ":5006",
    "dash.example:50x6",
])
def test_foreign_hosts_other_ports_and_unlisted_ips_are_refused(host):
    assert not host_allowed(host, ALLOWED)


def test_a_listed_ip_is_served_and_bokeh_wildcards_work():
    assert host_allowed("10.0.0.5:5006", ["10.0.0.5:5006"])
    assert host_allowed("10.0.0.7:5006", ["10.0.0.*:5006"]) and not host_allowed("10.0.1.7:5006", ["10.0.0.*:5006"])


def test_refusals_log_once_per_host_per_period_and_count_the_rest(caplog):
    now = [0.0]
    r = RefusedHosts(mono=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="dashboard.hostcheck"):
        for _ in range(5):
            r.refused("evil.example:5006", "/", "127.0.0.1")
        r.refused("other.example", "/ws", "127.0.0.1")
        now[0] = LOG_EVERY_S + 1
        r.refused("evil.example:5006", "/", "127.0.0.1")
    lines = [rec for rec in caplog.records if rec.event == "host_refused"]
    assert [(x.host, x.not_logged) for x in lines] == [("evil.example:5006", 0), ("other.example", 0),
                                                       ("evil.example:5006", 4)]
    assert r.total == 7
