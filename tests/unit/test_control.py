"""keel.control.backends: the fake, retries, systemd against a stub systemctl, supervisord for real."""

from __future__ import annotations

import signal
import stat
import time
from pathlib import Path

import pytest

from keel.control.backends import (
    BackendUnavailable,
    ControlError,
    FakeBackend,
    NoSuchProcess,
    NotRunning,
    SupervisordBackend,
    SystemdBackend,
    backend_for,
    retrying,
)
from tests.integration.test_watchdog_fixtures import (
    program_section,
    short_dir,
    start_supervisord,
    stop_supervisord,
    write_supervisord_conf,
)
from tests.support import PYTHON, is_alive, wait_until

# --------------------------------------------------------------------------- retrying and the fake


def test_retrying_retries_unavailable_with_backoff_then_succeeds():
    sleeps: list[float] = []
    outcomes = [BackendUnavailable("down"), BackendUnavailable("down"), "ok"]

    def op():
        out = outcomes.pop(0)
        if isinstance(out, Exception):
            raise out
        return out

    assert retrying(op, attempts=3, initial=0.1, sleep=sleeps.append) == "ok"
    assert sleeps == [0.1, 0.2]


def test_retrying_gives_up_after_attempts_and_never_retries_other_errors():
    calls = []

    def down():
        calls.append(1)
        raise BackendUnavailable("down")

    with pytest.raises(BackendUnavailable):
        retrying(down, attempts=2, sleep=lambda s: None)
    assert len(calls) == 2

    def missing():
        calls.append(2)
        raise NoSuchProcess("x", process="x")

    with pytest.raises(NoSuchProcess):
        retrying(missing, attempts=5, sleep=lambda s: None)
    assert calls.count(2) == 1


def test_control_errors_subclass_runtime_error_and_carry_the_process():
    e = NotRunning("not running", process="trainer", backend="supervisord")
    assert isinstance(e, ControlError) and isinstance(e, RuntimeError) and e.process == "trainer"


def test_fake_backend_records_calls_and_injects_failures():
    fake = FakeBackend()
    fake.add("trainer", pid=10)
    fake.failures["restart"] = [BackendUnavailable("boom")]
    with pytest.raises(BackendUnavailable):
        fake.restart("trainer")
    fake.restart("trainer")
    fake.stop("trainer")
    with pytest.raises(NotRunning):
        fake.signal("trainer", signal.SIGCONT)
    with pytest.raises(NoSuchProcess):
        fake.start("nope")
    assert [c[0] for c in fake.calls] == ["restart", "restart", "stop", "signal", "start"]
    assert fake.status()["trainer"].state == "STOPPED"


def test_backend_for_builds_each_backend_from_keel_json():
    stack = {
        "project": "keel",
        "control": {"backend": "supervisord", "socket": "/x/s.sock", "group": "keel"},
        "processes": {"trainer": {"program": "keel:trainer", "stop": {"timeout": 30.0}}, "dash": {}},
    }
    sup = backend_for(stack)
    assert isinstance(sup, SupervisordBackend)
    assert sup.programs == {"trainer": "keel:trainer", "dash": "keel:dash"} and sup.timeout == 40.0
    stack["control"]["backend"] = "systemd"
    sysd = backend_for(stack)
    assert isinstance(sysd, SystemdBackend) and sysd.units == {"trainer": "keel-trainer.service",
                                                               "dash": "keel-dash.service"}
    assert sysd.timeout == 40.0
    stack["control"]["backend"] = "launchd"
    with pytest.raises(ValueError, match="launchd"):
        backend_for(stack)


# --------------------------------------------------------------------------- systemd against a stub systemctl

STUB = """#!/bin/sh
# A stand-in systemctl: records its argv, answers `show` from a file, fails for unknown units.
printf '%s\\n' "$*" >> "{log}"
[ -n "$STUB_SLEEP" ] && sleep "$STUB_SLEEP"
# Like the real one, `show` of an unknown unit succeeds (LoadState=not-found); actions on it fail.
case "$*" in *" show "*) cat "{show}"; exit 0 ;; esac
for a in "$@"; do
  case "$a" in
    nope.service) echo "Failed to stop nope.service: Unit nope.service not loaded." >&2; exit 5 ;;
    dead.service) echo "Failed to kill unit dead.service: No main PID" >&2; exit 1 ;;
    broken.service) echo "Job for broken.service failed." >&2; exit 1 ;;
  esac
done
exit 0
"""

SHOW = """Id=keel-trainer.service
ActiveState=active
SubState=running
MainPID=1234
ExecMainStatus=0
Description=keel trainer

Id=keel-dashboard.service
ActiveState=activating
SubState=auto-restart
MainPID=0
ExecMainStatus=1
Description=keel dashboard

Id=keel-eval.service
ActiveState=failed
SubState=failed
MainPID=0
ExecMainStatus=137
Description=keel eval

Id=other.service
ActiveState=active
SubState=running
MainPID=99
"""


@pytest.fixture
def systemctl(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log, show = tmp_path / "calls.log", tmp_path / "show.txt"
    show.write_text(SHOW)
    stub = bindir / "systemctl"
    stub.write_text(STUB.format(log=log, show=show))
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    units = {"trainer": "keel-trainer.service", "dashboard": "keel-dashboard.service", "eval": "keel-eval.service",
             "ghost": "nope.service", "dead": "dead.service", "broken": "broken.service"}
    backend = SystemdBackend(units, timeout=5.0)
    backend.calls = lambda: log.read_text().splitlines() if log.exists() else []  # type: ignore[attr-defined]
    return backend


@pytest.mark.slow  # starts a real process
def test_systemd_status_maps_states_and_ignores_other_units(systemctl):
    st = systemctl.status()
    assert set(st) == {"trainer", "dashboard", "eval"}
    assert (st["trainer"].state, st["trainer"].pid) == ("RUNNING", 1234)
    assert (st["dashboard"].state, st["dashboard"].pid) == ("BACKOFF", None)  # auto-restart: systemd is on it
    assert (st["eval"].state, st["eval"].exit_status) == ("FATAL", 137)
    call = systemctl.calls()[0]
    assert call.startswith("--no-pager --no-ask-password show --property=") and "keel-trainer.service" in call


@pytest.mark.slow  # starts a real process
def test_systemd_actions_are_the_right_systemctl_calls(systemctl):
    systemctl.start("trainer")
    systemctl.stop("trainer")
    systemctl.restart("trainer")
    systemctl.signal("trainer", signal.SIGCONT)
    assert systemctl.calls() == [
        "--no-pager --no-ask-password start --no-block keel-trainer.service",
        "--no-pager --no-ask-password stop keel-trainer.service",
        "--no-pager --no-ask-password reset-failed keel-trainer.service",
        "--no-pager --no-ask-password restart --no-block keel-trainer.service",
        f"--no-pager --no-ask-password kill --kill-whom=main --signal={int(signal.SIGCONT)} keel-trainer.service",
    ]


@pytest.mark.slow  # starts a real process
def test_systemd_errors_are_typed(systemctl):
    with pytest.raises(NoSuchProcess):
        systemctl.stop("ghost")
    with pytest.raises(NotRunning):
        systemctl.signal("dead", signal.SIGTERM)
    with pytest.raises(ControlError) as exc:
        systemctl.start("broken")
    assert type(exc.value) is ControlError and "Job for broken.service failed" in str(exc.value)
    with pytest.raises(NoSuchProcess):
        systemctl.stop("not-in-the-stack")  # refused before any systemctl call
    assert not any("not-in-the-stack" in c for c in systemctl.calls())


def test_systemd_missing_systemctl_is_unavailable(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BackendUnavailable, match="not found"):
        SystemdBackend({"t": "keel-t.service"}).status()


@pytest.mark.slow  # starts a real process
def test_systemd_hanging_systemctl_times_out_as_unavailable(systemctl, monkeypatch):
    monkeypatch.setenv("STUB_SLEEP", "5")
    systemctl.timeout = 0.3
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable, match="timed out"):
        systemctl.restart("trainer")
    assert time.monotonic() - t0 < 3


# --------------------------------------------------------------------------- supervisord, for real

SLEEPER = f"{PYTHON} -c 'import time; time.sleep(600)'"


@pytest.fixture
def supervisord(reaper):
    d = short_dir()
    programs = program_section("work", SLEEPER) + program_section("idle", SLEEPER, autostart=False) \
        + program_section("stranger", SLEEPER)
    conf = write_supervisord_conf(d, programs, {"keel": ["work", "idle"], "other": ["stranger"]})
    proc = start_supervisord(reaper, conf, d / "s.sock")
    backend = SupervisordBackend(str(d / "s.sock"), {"work": "keel:work", "idle": "keel:idle", "ghost": "keel:ghost"},
                                 timeout=10.0)
    wait_until(lambda: backend.status()["work"].state == "RUNNING", 10, what="work running")
    yield backend
    stop_supervisord(proc, d)


@pytest.mark.slow
def test_supervisord_status_start_stop_restart_signal(supervisord):
    st = supervisord.status()
    assert set(st) == {"work", "idle"}  # the other group's program is not ours
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
    down = SupervisordBackend(str(tmp_path / "no.sock"), {"work": "keel:work"}, timeout=1.0)
    with pytest.raises(BackendUnavailable):
        down.status()


def _proc_status(pid: int) -> str:
    import psutil

    try:
        return psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return "gone"


def test_supervisord_socket_that_never_answers_times_out(tmp_path):
    import socket

    d = short_dir()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        srv.bind(str(d / "s.sock"))
        srv.listen(1)  # accepts the connection, never answers
        backend = SupervisordBackend(str(d / "s.sock"), {"w": "keel:w"}, timeout=0.3)
        t0 = time.monotonic()
        with pytest.raises(BackendUnavailable):
            backend.status()
        assert time.monotonic() - t0 < 3
    finally:
        srv.close()
        Path(d / "s.sock").unlink(missing_ok=True)
        d.rmdir()
