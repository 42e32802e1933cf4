"""keel.control's supervisord backend against a real supervisord: one process and the whole stack (apply,
start_all, stop_all, shutdown), include mode, a socket that never answers."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest

from keel.control.base import BackendUnavailable, NoSuchProcess, NotRunning
from keel.control.supervisord import SupervisordBackend
from tests.integration.test_watchdog_fixtures import (
    program_section,
    short_dir,
    start_supervisord,
    stop_supervisord,
    write_supervisord_conf,
)
from tests.support import PYTHON, is_alive, wait_until


# --------------------------------------------------------------------------- supervisord, for real

SLEEPER = f"{PYTHON} -c 'import time; time.sleep(600)'"
OURS = {"work": "keel-work", "idle": "keel-idle"}


def _programs(extra: str = "") -> str:
    return (program_section("keel-work", SLEEPER) + program_section("keel-idle", SLEEPER, autostart=False)
            + program_section("stranger", SLEEPER) + extra)


@pytest.fixture
def supervisord(reaper):
    d = short_dir()
    conf = write_supervisord_conf(d, _programs(), {})
    proc = start_supervisord(reaper, conf, d / "s.sock")
    backend = SupervisordBackend(str(d / "s.sock"), {**OURS, "ghost": "keel-ghost"}, timeout=10.0)
    backend.conf = conf  # type: ignore[attr-defined]
    wait_until(lambda: backend.status()["work"].state == "RUNNING", 10, what="work running")
    yield backend
    stop_supervisord(proc, d)


@pytest.mark.slow
def test_supervisord_status_start_stop_restart_signal(supervisord):
    st = supervisord.status()
    assert set(st) == {"work", "idle"}  # the other program is not ours
    assert st["idle"].state == "STOPPED" and st["work"].pid and is_alive(st["work"].pid)

    old = st["work"].pid
    supervisord.restart("work")
    new = wait_until(lambda: (i := supervisord.status()["work"]).state == "RUNNING" and i.pid != old and i.pid, 10)
    wait_until(lambda: not is_alive(old), 5, what="old pid gone")

    supervisord.signal("work", signal.SIGSTOP)
    wait_until(lambda: _proc_status(new) == "stopped", 5, what="SIGSTOP delivered")
    supervisord.signal("work", signal.SIGCONT)
    wait_until(lambda: _proc_status(new) != "stopped", 5, what="SIGCONT delivered")

    supervisord.stop("work")
    assert supervisord.status()["work"].state == "STOPPED" and not is_alive(new)
    supervisord.stop("work")  # stopping a stopped process is fine
    with pytest.raises(NotRunning):
        supervisord.signal("work", signal.SIGTERM)
    supervisord.start("work")
    supervisord.start("work")  # already started: fine
    wait_until(lambda: supervisord.status()["work"].state == "RUNNING", 10)


@pytest.mark.slow
def test_supervisord_errors_are_typed(supervisord, tmp_path):
    with pytest.raises(NoSuchProcess):
        supervisord.restart("ghost")  # in our map, unknown to supervisord: BAD_NAME
    with pytest.raises(NoSuchProcess):
        supervisord.stop("stranger")  # not ours: refused without a call
    down = SupervisordBackend(str(tmp_path / "no.sock"), {"work": "keel-work"}, timeout=1.0)
    with pytest.raises(BackendUnavailable):
        down.status()


@pytest.mark.slow
def test_supervisord_apply_restarts_only_what_changed_and_whole_stack_ops(supervisord):
    """apply = reread + update: a changed program restarts, an unchanged one keeps its pid, an added
    one starts; start_all starts what is stopped; stop_all stops ours only."""
    pids = {n: i.pid for n, i in supervisord.status().items()}
    assert supervisord.apply() == []  # nothing changed on disk: nothing restarts
    assert supervisord.status()["work"].pid == pids["work"]

    changed = _programs(program_section("keel-extra", SLEEPER)).replace(
        "[program:keel-idle]\ncommand=" + SLEEPER, "[program:keel-idle]\ncommand=" + SLEEPER.replace("600", "601"))
    supervisord.conf.write_text(supervisord.conf.read_text().replace(_programs(), changed))
    supervisord.programs["extra"] = "keel-extra"
    supervisord._by_program["keel-extra"] = "extra"
    assert sorted(supervisord.apply()) == ["keel-extra: added", "keel-idle: changed, restarted"]
    wait_until(lambda: supervisord.status()["extra"].state == "RUNNING", 10, what="added program autostarted")
    assert supervisord.status()["work"].pid == pids["work"]  # unchanged: not restarted

    assert supervisord.start_all() == ["idle"]
    wait_until(lambda: supervisord.status()["idle"].state == "RUNNING", 10, what="idle started")
    running = [i.pid for i in supervisord.status().values()]
    supervisord.stop_all()
    assert {i.state for i in supervisord.status().values()} == {"STOPPED"}
    assert not any(is_alive(pid) for pid in running)
    stranger = supervisord._call("getProcessInfo", "stranger")
    assert stranger["statename"] == "RUNNING"  # not ours: left alone


@pytest.mark.slow
def test_supervisord_include_mode_leaves_the_host_alone(supervisord):
    include = SupervisordBackend(supervisord.socket_path, OURS, timeout=10.0, mode="include")
    stranger = supervisord._call("getProcessInfo", "stranger")["pid"]
    conf = supervisord.conf
    conf.write_text(conf.read_text().replace("[program:stranger]\ncommand=" + SLEEPER,
                                             "[program:stranger]\ncommand=" + SLEEPER.replace("600", "601")))
    assert include.apply() == []  # another project's change is not ours to apply
    include.shutdown()  # stops our programs, never the host's supervisord
    assert supervisord.running() and supervisord._call("getProcessInfo", "stranger")["pid"] == stranger
    down = SupervisordBackend(supervisord.socket_path + ".none", OURS, mode="include", timeout=1.0)
    with pytest.raises(BackendUnavailable, match="host supervisord"):
        down.apply()


@pytest.mark.slow
def test_supervisord_standalone_apply_starts_it_and_shutdown_stops_it(reaper):
    d = short_dir()
    try:
        conf = write_supervisord_conf(d, program_section("keel-work", SLEEPER), {})
        conf.write_text(conf.read_text().replace("nodaemon=true", "nodaemon=false"))  # as keel renders it
        backend = SupervisordBackend(str(d / "s.sock"), {"work": "keel-work"}, timeout=15.0, config=str(conf))
        assert not backend.running()
        assert backend.apply() == [f"started supervisord ({conf})"]
        daemon = int((d / "supervisord.pid").read_text())
        reaper.track(daemon)
        worker = wait_until(lambda: backend.status()["work"].pid, 10, what="work started by the new supervisord")
        assert backend.apply() == []  # running now: reread + update, nothing changed
        backend.shutdown()
        assert not backend.running()
        wait_until(lambda: not is_alive(daemon) and not is_alive(worker), 15, what="supervisord and work gone")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _proc_status(pid: int) -> str:
    import psutil

    try:
        return psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return "gone"


def test_supervisord_socket_that_never_answers_is_unavailable():
    """A socket that accepts and never answers: the call ends with BackendUnavailable from the socket timeout."""
    import socket

    d = short_dir()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        srv.bind(str(d / "s.sock"))
        srv.listen(1)  # accepts the connection, never answers
        backend = SupervisordBackend(str(d / "s.sock"), {"w": "keel-w"}, timeout=0.3)
        with pytest.raises(BackendUnavailable) as exc:
            backend.status()
        assert isinstance(exc.value.__cause__, TimeoutError)
    finally:
        srv.close()
        Path(d / "s.sock").unlink(missing_ok=True)
        d.rmdir()


# A program that ignores SIGTERM (a torchrun agent in its rendezvous), and says so in a file once it does.
STUBBORN = (f"{PYTHON} -c 'import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "pathlib.Path(sys.argv[1]).write_text(\"ignoring\"); time.sleep(600)' {ready}")


@pytest.mark.slow
def test_supervisord_stops_and_shutdowns_wait_out_a_stop_another_caller_began(reaper):
    """The watchdog stops the trainer (STOPPING: a torchrun agent ignores SIGTERM) as `bin/launch down` runs.

    stop_all waits for that stop too; while a process is still STOPPING, a shut-down supervisord answers
    every call with SHUTDOWN_STATE, which is "still going", not a failure (the multinode rollback's
    `down` failed on it), and an `apply` (the `up` after a `down`) waits for it to exit, then starts anew."""
    d = short_dir()
    try:
        ready = d / "ready"
        conf = write_supervisord_conf(d, program_section("keel-stub", STUBBORN.format(ready=ready), stopwaitsecs=2)
                                      + program_section("keel-work", SLEEPER), {})
        conf.write_text(conf.read_text().replace("nodaemon=true", "nodaemon=false"))
        programs = {"stub": "keel-stub", "work": "keel-work"}
        backend = SupervisordBackend(str(d / "s.sock"), programs, timeout=15.0, config=str(conf))
        watchdog = SupervisordBackend(str(d / "s.sock"), programs, timeout=15.0, stop_wait=False)

        def started() -> tuple[int, int]:
            wait_until(ready.exists, 10, what="stub ignoring SIGTERM")
            daemon = int((d / "supervisord.pid").read_text())
            reaper.track(daemon)
            return daemon, backend.status()["stub"].pid

        backend.apply()
        daemon, stub = started()
        watchdog.stop("stub")
        assert backend.status()["stub"].state == "STOPPING"
        backend.stop_all()  # returns once SIGKILL ended the stub's stop, 2 s on
        assert {n: i.state for n, i in backend.status().items()} == {"stub": "STOPPED", "work": "STOPPED"}
        assert _proc_status(stub) in ("gone", "zombie")

        ready.unlink()
        backend.start_all()
        _, stub = started()
        backend._call("shutdown")  # another `down`: supervisord now waits 2 s for the stub, answering SHUTDOWN_STATE
        assert backend._daemon_state() == "shutting down"
        assert backend.apply() == [f"started supervisord ({conf})"]
        assert _proc_status(stub) in ("gone", "zombie")
        # the old supervisord closes its socket a moment before its process exits
        wait_until(lambda: not is_alive(daemon), 15, what="the old supervisord gone")
        ready.unlink(missing_ok=True)
        daemon, stub = started()

        watchdog.shutdown()  # without waiting for the stops it asks: its own wait sees SHUTDOWN_STATE until the end
        assert not backend.running()
        assert _proc_status(stub) in ("gone", "zombie")
        wait_until(lambda: not is_alive(daemon), 15, what="supervisord gone")
    finally:
        shutil.rmtree(d, ignore_errors=True)
