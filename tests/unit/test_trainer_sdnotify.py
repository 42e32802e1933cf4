"""sd_notify over a real unix datagram socket (path and abstract namespace)."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from trainer.sdnotify import Notifier


@pytest.fixture
def dgram(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(1.0)
    yield sock, str(path)
    sock.close()


def _recv_all(sock: socket.socket) -> list[str]:
    sock.settimeout(0.05)
    out = []
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except socket.timeout:
        return out


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_ready_watchdog_stopping_reach_a_path_socket(dgram):
    sock, path = dgram
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    assert n.enabled and n.watchdog_enabled and n.watchdog_interval == 1.0
    assert n.ready() and n.watchdog() and n.stopping()
    assert _recv_all(sock) == [f"READY=1\nMAINPID={os.getpid()}", "WATCHDOG=1", "STOPPING=1"]
    n.close()


def test_abstract_namespace_socket():
    name = f"keel-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.notify("STATUS=hi")
        sock.settimeout(1.0)
        assert sock.recv(100) == b"STATUS=hi"
    finally:
        sock.close()


def test_watchdog_is_rate_limited_to_half_of_watchdog_usec(dgram):
    sock, path = dgram
    clock = Clock()
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}, clock=clock)
    sent = []
    for _ in range(100):  # 100 steps of 10 ms = 1 s
        sent.append(n.watchdog())
        clock.now += 0.01
    assert sum(sent) == 5  # at 0, 0.2, 0.4, 0.6, 0.8
    assert _recv_all(sock) == ["WATCHDOG=1"] * 5


def test_no_watchdog_without_watchdog_usec_or_for_another_pid(dgram):
    sock, path = dgram
    assert not Notifier({"NOTIFY_SOCKET": path}).watchdog()
    assert not Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).watchdog()
    assert Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000", "WATCHDOG_PID": str(os.getpid())}).watchdog()
    assert _recv_all(sock) == ["WATCHDOG=1"]


def test_without_notify_socket_everything_is_a_no_op():
    n = Notifier({})
    assert not n.enabled
    assert not n.ready() and not n.watchdog() and not n.stopping()


def test_a_vanished_socket_never_raises(tmp_path):
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock"), "WATCHDOG_USEC": "1"})
    assert n.ready() is False
    assert n.watchdog() is False
