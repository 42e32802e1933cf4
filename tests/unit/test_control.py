"""keel.control: retries, the factory on a real keel.json, systemd against a stub systemctl (supervisord for real:
test_control_supervisord). The fake lives in tests.support."""

from __future__ import annotations

import signal
import stat

import pytest

from keel.control.base import BackendUnavailable, ControlError, NoSuchProcess, NotRunning, retrying
from keel.control.factory import backend_for
from keel.control.supervisord import SupervisordBackend
from keel.control.systemd import SystemdBackend
from keel.render.contract import ContractError, parse_stack
from keel.stack.rendering import render_environment, stack_of
from tests.support import FakeBackend, is_alive, wait_until

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


def test_fake_backend_whole_stack_operations():
    fake = FakeBackend()
    fake.add("trainer", pid=10)
    fake.add("eval", state="FATAL")
    assert fake.apply() == [] and fake.start_all() == ["eval"]
    fake.shutdown()
    assert {i.state for i in fake.status().values()} == {"STOPPED"}


def _rendered_stack(env: str, backend: str | None = None):
    _, _, files, _ = render_environment(env, backend=backend)
    return stack_of(files)


def test_backend_for_takes_every_name_from_keel_json():
    """Names are computed once, by resolve: the factory copies keel.json's program/unit, never derives one."""
    stack = _rendered_stack("dev")
    sup = backend_for(stack)
    assert isinstance(sup, SupervisordBackend)
    assert sup.programs == {name: p.program for name, p in stack.processes.items()}
    assert (sup.socket_path, sup.mode, sup.config) == (stack.control.socket, "standalone", stack.control.config)
    assert sup.timeout == max(p.stop.timeout for p in stack.processes.values()) + 10.0

    sysd = backend_for(_rendered_stack("prod", backend="systemd"))
    assert isinstance(sysd, SystemdBackend)
    assert sysd.units == {name: p.unit for name, p in _rendered_stack("prod", "systemd").processes.items()}
    assert sysd.target == "keel.target"

    renamed = stack.to_json()
    renamed["processes"]["trainer"]["program"] = "elsewhere-trainer"
    assert backend_for(parse_stack(renamed)).programs["trainer"] == "elsewhere-trainer"
    del renamed["processes"]["trainer"]["program"]
    with pytest.raises(ContractError, match="processes.trainer.program: missing"):
        parse_stack(renamed)  # no fallback name: a keel.json without it never reaches backend_for


# --------------------------------------------------------------------------- systemd against a stub systemctl

STUB = """#!/bin/sh
# A stand-in systemctl: records its argv, answers `show` from a file, fails for unknown units.
printf '%s\\n' "$*" >> "{log}"
[ -n "$STUB_SLEEP" ] && {{ echo $$ > "{log}.pid"; exec sleep "$STUB_SLEEP"; }}
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
NeedDaemonReload=yes
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
    backend = SystemdBackend(units, target="keel.target", timeout=5.0)
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
    systemctl.stop("trainer", wait=False)  # the watchdog's give-up: asked for, not waited out
    systemctl.restart("trainer")
    systemctl.signal("trainer", signal.SIGCONT)
    assert systemctl.calls() == [
        "--no-pager --no-ask-password start --no-block keel-trainer.service",
        "--no-pager --no-ask-password stop keel-trainer.service",
        "--no-pager --no-ask-password stop --no-block keel-trainer.service",
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
def test_systemd_whole_stack_operations(systemctl):
    assert systemctl.apply() == ["keel-trainer.service: changed, restarted"]  # only the active unit whose file changed
    assert systemctl.calls()[1:] == [
        "--no-pager --no-ask-password daemon-reload",
        "--no-pager --no-ask-password enable keel.target",
        "--no-pager --no-ask-password try-restart keel-trainer.service",
    ]
    assert systemctl.calls()[0].startswith("--no-pager --no-ask-password show --property=Id,NeedDaemonReload")
    before = len(systemctl.calls())
    assert systemctl.start_all() == ["eval"]  # FATAL: started again; BACKOFF: systemd is on it
    assert systemctl.calls()[before + 1:] == [
        "--no-pager --no-ask-password start keel.target",
        "--no-pager --no-ask-password reset-failed keel-eval.service",
        "--no-pager --no-ask-password start --no-block keel-eval.service",
    ]
    systemctl.shutdown()
    assert systemctl.calls()[-1] == "--no-pager --no-ask-password stop keel.target"


@pytest.mark.slow  # starts a real process
def test_systemd_hanging_systemctl_is_unavailable_and_killed(systemctl, monkeypatch, tmp_path):
    monkeypatch.setenv("STUB_SLEEP", "600")
    systemctl.timeout = 0.3
    with pytest.raises(BackendUnavailable, match="timed out"):
        systemctl.restart("trainer")
    hung = int((tmp_path / "calls.log.pid").read_text())
    wait_until(lambda: not is_alive(hung), 10, what="the hung systemctl killed")
