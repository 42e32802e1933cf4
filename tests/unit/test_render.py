"""Rendering: golden files, supervisor's own parser, escaping, refusal of what cannot be carried."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from supervisor.options import ServerOptions

from keel.config.load import load_config
from keel.config.model import KeelConfig
from keel.render.templates import RenderError, render, sd_command, sd_environment
from keel.render.resolve import Context
from tests.golden_update import BACKENDS, ENVIRONMENTS, GOLDEN, golden_name, golden_render
from tests.support import REPO_ROOT


@pytest.mark.parametrize("env", ENVIRONMENTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_golden_files(env, backend):
    """A change to configs/ or templates/ shows up here; `make golden` regenerates, review the diff."""
    rendered = {golden_name(f): f.text for f in golden_render(env, backend)}
    golden_dir = GOLDEN / f"{env}-{backend}"
    on_disk = {str(p.relative_to(golden_dir)): p.read_text() for p in golden_dir.rglob("*") if p.is_file()}
    assert sorted(rendered) == sorted(on_disk), "rendered file set differs from tests/golden (run `make golden`)"
    for name, text in rendered.items():
        assert text == on_disk[name], f"{golden_dir.name}/{name} differs from the golden file (run `make golden`)"


def test_rendering_is_deterministic():
    first = [(f.path, f.text) for f in golden_render("prod", "systemd")]
    second = [(f.path, f.text) for f in golden_render("prod", "systemd")]
    assert first == second


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_every_file_has_the_generated_header(env):
    for file in golden_render(env, "supervisord") + golden_render(env, "systemd"):
        head = json.loads(file.text)["generated"] if file.path.endswith(".json") else file.text.splitlines()[0]
        assert f"generated from configs/base.yaml + configs/{env}.yaml" in head and "do not edit" in head, file.path


def _ctx(tmp_path: Path, backend: str = "supervisord") -> Context:
    return Context(env="t", code_dir=tmp_path, build_dir=tmp_path / "build", sources=("base.yaml", "t.yaml"), backend=backend)


def _config(command: list[str], environment: dict[str, str], tmp_path: Path) -> KeelConfig:
    return KeelConfig.model_validate(
        {
            "project": "p",
            "paths": {"root": str(tmp_path)},
            "processes": {
                "worker": {
                    "kind": "command",
                    "command": command,
                    "environment": environment,
                    "stop": {"signal": "INT", "timeout": "42s"},
                }
            },
        }
    )


def _parse_supervisord(conf: Path) -> dict:
    for sub in ("log", "run"):  # supervisord checks that its log and pidfile dirs exist
        (conf.parent / "var" / sub).mkdir(parents=True, exist_ok=True)
    options = ServerOptions()
    options.realize(args=["-c", str(conf)])
    return {pc.name: pc for group in options.process_group_configs for pc in group.process_configs}


def _render_and_parse(tmp_path: Path, command: list[str], environment: dict[str, str]):
    files = render(_config(command, environment, tmp_path), _ctx(tmp_path), install=False)
    conf = tmp_path / "supervisord.conf"
    conf.write_text(next(f.text for f in files if f.path == "supervisord.conf"))
    return _parse_supervisord(conf)["p-worker"]


TRICKY = {
    "PERCENT": "100% sure %(ENV_HOME)s",
    "QUOTE": 'say "hi" twice',
    "APOS": "it's",
    "SPACES": "  padded value  ",
    "DOLLAR": "$HOME ${USER} $$",
    "UNICODE": "héllo wörld ✓ 日本",
    "COMMA": "a,b=c,d",
    "EMPTY": "",
    "HASH": "a#b;c",
    "BACKSLASH": "C:\\path\\to",
}


def test_tricky_values_round_trip_through_supervisors_parser(tmp_path):
    command = ["/bin/echo", "100%", "it's", 'a "quoted" word', "$HOME", "x;y", "", "ü"]
    program = _render_and_parse(tmp_path, command, TRICKY)
    assert shlex.split(program.command) == command
    for key, value in TRICKY.items():
        assert program.environment[key] == value, key
    assert program.stopsignal.name == "SIGINT"
    assert program.stopwaitsecs == 42
    assert program.stopasgroup and program.killasgroup


@pytest.mark.parametrize(
    "value, reason",
    [
        ("\"quoted at both ends\"", "starts or ends with a quote"),
        ("both ' and \" inside", "both ' and \""),
        ("a ;comment", "start of a comment"),
        ("a #comment", "start of a comment"),
    ],
)
def test_values_supervisord_cannot_carry_are_refused(tmp_path, value, reason):
    with pytest.raises(RenderError) as info:
        render(_config(["/bin/true"], {"BAD": value}, tmp_path), _ctx(tmp_path), install=False)
    assert info.value.path == "processes.worker.environment.BAD"
    assert reason in info.value.message


def test_command_with_inline_comment_is_refused(tmp_path):
    with pytest.raises(RenderError) as info:
        render(_config(["/bin/echo", "a ;b"], {}, tmp_path), _ctx(tmp_path), install=False)
    assert info.value.path == "processes.worker.command"


env_values = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\n\r"), max_size=30)
arguments = st.lists(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\n\r"), max_size=20), min_size=1, max_size=5)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=env_values, args=arguments)
def test_property_accepted_values_round_trip_exactly(tmp_path, value, args):
    """Every value the renderer accepts comes back exactly from supervisor's parser; the rest is refused."""
    command = ["/bin/echo", *args]
    try:
        program = _render_and_parse(tmp_path, command, {"VALUE": value})
    except RenderError:
        return  # refused, never written
    assert program.environment["VALUE"] == value
    assert shlex.split(program.command) == command


def test_systemd_quoting_escapes_specifiers_and_variables():
    assert sd_command(["/usr/bin/python", "100%", "$HOME", 'a "b"', "c\\d"]) == (
        '"/usr/bin/python" "100%%" "$$HOME" "a \\"b\\"" "c\\\\d"'
    )
    assert sd_environment("K", 'v "%h" $X') == '"K=v \\"%%h\\" $X"'
    with pytest.raises(RenderError):
        sd_command(["/bin/echo", ";"])


def test_change_to_dashboard_leaves_trainer_files_identical(tmp_path):
    base = load_config("dev", REPO_ROOT / "configs").config
    moved = load_config("dev", REPO_ROOT / "configs", ["processes.dashboard.port=5010"]).config
    ctx = _ctx(tmp_path)
    before = {f.path: f.text for f in render(base, ctx, install=False)}
    after = {f.path: f.text for f in render(moved, ctx, install=False)}
    assert before["trainer.json"] == after["trainer.json"]
    assert before["dashboard.json"] != after["dashboard.json"]

    def section(text: str, name: str) -> str:
        return text.split(f"[program:keel-{name}]")[1].split("\n[")[0]

    assert section(before["supervisord.conf"], "trainer") == section(after["supervisord.conf"], "trainer")
    assert section(before["supervisord.conf"], "dashboard") != section(after["supervisord.conf"], "dashboard")


def test_torchrun_command_and_rank_status_names(tmp_path):
    config = load_config("prod", REPO_ROOT / "configs").config
    ctx = _ctx(tmp_path)
    stack = json.loads(next(f.text for f in render(config, ctx, install=False) if f.path == "keel.json"))
    trainer = stack["processes"]["trainer"]
    assert trainer["command"][1:] == [
        "--nproc-per-node", "2", "--nnodes", "1", "--standalone", "-m", "trainer", "--config", str(ctx.build_dir / "trainer.json"),
    ]
    assert trainer["command"][0].endswith("/torchrun")
    assert trainer["status_names"] == ["trainer.rank0", "trainer.rank1"]


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_shipped_environments_parse_with_supervisor_and_match_keel_json(env, tmp_path):
    """Every rendered program, as supervisord itself reads it, runs the command and environment keel.json describes."""
    files = {f.path: f.text for f in golden_render(env, "supervisord")}
    stack = json.loads(files["keel.json"])
    for sub in ("log", "run"):
        (tmp_path / sub).mkdir()
    if "supervisord.conf" in files:
        text = files["supervisord.conf"]
    else:  # include mode: the fragment inside a minimal host supervisord.conf
        text = f"[supervisord]\nlogfile={tmp_path}/log/s.log\npidfile={tmp_path}/run/s.pid\n" + files["keel.conf"]
    text = text.replace(stack["paths"]["log_dir"], str(tmp_path / "log")).replace(stack["paths"]["run_dir"], str(tmp_path / "run"))
    text = text.replace("directory=/opt/keel\n", f"directory={tmp_path}\n")  # supervisord checks it exists
    text = text.replace("\nuser=keel\n", "\nuser=root\n")  # and that the user exists on this host
    conf = tmp_path / "supervisord.conf"
    conf.write_text(text)
    options = ServerOptions()
    options.realize(args=["-c", str(conf)])
    programs = {pc.name: pc for group in options.process_group_configs for pc in group.process_configs}
    assert set(programs) == {p["program"] for p in stack["processes"].values()}
    for name, proc in stack["processes"].items():
        program = programs[proc["program"]]
        assert shlex.split(program.command) == proc["command"]
        assert program.environment["KEEL_PROCESS"] == name
        assert program.environment["KEEL_CONFIG"] == proc["config_file"]
        assert program.stopsignal.name == "SIG" + proc["stop"]["signal"]
        assert program.stopwaitsecs == int(proc["stop"]["timeout"])
        assert program.stopasgroup and program.killasgroup
        assert program.priority == proc["priority"]
