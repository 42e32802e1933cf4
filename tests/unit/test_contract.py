"""keel.render.contract: what resolve writes is what every consumer reads, and a file off the contract is refused.

The contract's models are strict and give no field a default, so loading a rendered file
through them proves resolve wrote every key; handing the loaded files to the consumers'
own loaders (trainer, dashboard, watchdog) proves they read nothing else.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from pydantic import BaseModel

from dashboard.config import load_config as load_dashboard_config
from keel.config.load import load_config
from keel.render import contract
from keel.render.contract import ContractError, load_process_file, load_stack
from keel.render.resolve import Context
from keel.render.templates import render
from keel.render.writer import write_files
from keel.watch.settings import WatchdogSettings
from tests.support import REPO_ROOT
from trainer.settings import load_settings

ENVIRONMENTS = ("dev", "staging", "prod")
BACKENDS = ("supervisord", "systemd")


def render_into(build: Path, env: str, backend: str) -> list[str]:
    """Render a shipped environment into `build` as bin/render-config --out does; returns the written names."""
    loaded = load_config(env, REPO_ROOT / "configs")
    ctx = Context(env=env, code_dir=REPO_ROOT, build_dir=build, sources=(f"configs/{env}.yaml",), backend=backend)
    files = render(loaded.config, ctx, install=False)
    write_files(files, build)
    return [f.path for f in files]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_every_rendered_file_loads_through_the_contract_and_its_consumer(env, backend, tmp_path):
    names = render_into(tmp_path, env, backend)
    stack = load_stack(tmp_path / "keel.json")
    assert stack.format_version == contract.FORMAT_VERSION and stack.backend == backend
    assert json.loads((tmp_path / "keel.json").read_text()) == stack.to_json()  # nothing dropped on the way
    assert set(stack.processes) == {n[: -len(".json")] for n in names if n.endswith(".json") and n != "keel.json"}
    config = load_config(env, REPO_ROOT / "configs").config
    for name, proc in stack.processes.items():
        resolved = load_process_file(proc.config_file)
        assert json.loads(Path(proc.config_file).read_text()) == resolved.to_json()
        assert resolved.name == name and resolved.kind == proc.kind
        assert resolved.user == proc.user == config.processes[name].user
        assert resolved.stop_timeout == proc.stop.timeout == config.processes[name].stop.timeout
        if proc.kind == "trainer":
            settings = load_settings(proc.config_file)
            assert settings.checkpoint.every_seconds == config.processes[name].checkpoint.every_seconds
        elif proc.kind == "dashboard":
            dash = load_dashboard_config(proc.config_file)
            assert {p.name for p in dash.processes} == set(stack.processes)
        elif proc.kind == "watchdog":
            watch = WatchdogSettings.from_process_file(resolved, proc.config_file)
            assert load_stack(watch.stack) == stack
    if backend == "systemd":  # the unit files are named by keel.json's unit, computed once in resolve
        units = {Path(n).name for n in names if n.endswith(".service")}
        assert units == {p.unit for p in stack.processes.values()}


def test_prod_carries_each_process_user_for_the_host_and_control(tmp_path):
    render_into(tmp_path, "prod", "supervisord")
    stack = json.loads((tmp_path / "keel.json").read_text())  # read as a plain dict, as keel.host does today
    users = {name: (p["user"], json.loads(Path(p["config_file"]).read_text())["user"]) for name, p in stack["processes"].items()}
    assert users["trainer"] == ("keel", "keel") and users["watchdog"] == (None, None)


def _models(module) -> list[type[BaseModel]]:
    return [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, BaseModel) and v.__module__ == module.__name__]


def test_no_field_of_the_contract_has_a_default():
    """A consumer can only read what resolve wrote: nothing is filled in on the way (kind blocks of
    other kinds are absent from a file, so those four are the only optional keys)."""
    optional = {("ProcessFile", k) for k in ("trainer", "dashboard", "watchdog", "command")}
    for model in _models(contract):
        if model is contract.Frozen:
            continue
        assert model.model_config.get("strict") and model.model_config.get("extra") == "forbid", model
        for field_name, field in model.model_fields.items():
            if (model.__name__, field_name) in optional:
                assert not field.is_required()
            else:
                assert field.is_required(), f"{model.__name__}.{field_name} has a default"


def test_contract_imports_only_pydantic_and_the_standard_library():
    source = (REPO_ROOT / "keel" / "render" / "contract.py").read_text()
    imported = {line.split()[1].split(".")[0] for line in source.splitlines() if line.startswith(("import ", "from "))}
    assert imported <= {"__future__", "json", "os", "pathlib", "typing", "pydantic"}, imported


# -- a file off the contract ------------------------------------------------------------------


@pytest.fixture
def rendered(tmp_path) -> Path:
    render_into(tmp_path, "dev", "supervisord")
    return tmp_path


def _edit(path: Path, change) -> Path:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize(
    ("file", "change", "key", "reason"),
    [
        ("trainer.json", lambda d: d.update(format_version=1), "format_version", "unknown format_version 1; this keel reads 3"),
        ("trainer.json", lambda d: d.pop("format_version"), "format_version", "missing"),
        ("trainer.json", lambda d: d["trainer"]["checkpoint"].pop("every_seconds"), "trainer.checkpoint.every_seconds", "missing"),
        ("trainer.json", lambda d: d.update(stop_timeout="30"), "stop_timeout", "Input should be a valid number, got '30'"),
        ("trainer.json", lambda d: d.pop("user"), "user", "missing"),
        ("trainer.json", lambda d: d["trainer"].update(every_seconds=10), "trainer.every_seconds", "unknown key"),
        ("trainer.json", lambda d: d.update(dashboard=None), "", "a dashboard block in a trainer file"),
        ("dashboard.json", lambda d: d["dashboard"].update(allow_origins=["a:1"]), "dashboard.allow_origins", "unknown key"),
        ("keel.json", lambda d: d.update(format_version=4), "format_version", "unknown format_version 4"),
        ("keel.json", lambda d: d["processes"]["trainer"].pop("program"), "processes.trainer.program", "missing"),
        ("keel.json", lambda d: d["processes"]["watchdog"].update(port="x"), "processes.watchdog.port", "Input should be a valid integer"),
        ("keel.json", lambda d: d["control"].update(backend="docker"), "control.backend", "Input should be 'supervisord' or 'systemd'"),
    ],
)
def test_a_file_off_the_contract_is_a_contract_error_naming_file_and_key(rendered, file, change, key, reason):
    path = _edit(rendered / file, change)
    load = load_stack if file == "keel.json" else load_process_file
    with pytest.raises(ContractError) as info:
        load(path)
    assert info.value.path == str(path) and info.value.key == key
    assert str(info.value).startswith(f"{path}: {key + ': ' if key else ''}")
    assert reason in str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_unreadable_and_non_json_files_name_the_file(tmp_path):
    with pytest.raises(ContractError, match=rf"^{tmp_path}/nope.json: cannot read: No such file"):
        load_process_file(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ContractError, match=rf"^{tmp_path}/bad.json: not JSON"):
        load_stack(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ContractError, match="expected a JSON object"):
        load_stack(tmp_path / "list.json")


def test_a_consumer_refuses_another_kinds_file(rendered):
    with pytest.raises(ContractError, match="kind: expected a watchdog's resolved file"):
        WatchdogSettings.from_process_file(load_process_file(rendered / "trainer.json"), "trainer.json")


# -- KEEL_* user variables (issue 13 item 7) --------------------------------------------------


def test_a_keel_variable_is_refused_by_render_config_and_nothing_is_written(tmp_path):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "base.yaml").write_text((REPO_ROOT / "configs" / "base.yaml").read_text())
    (configs / "dev.yaml").write_text(
        "processes:\n"
        "  trainer:\n"
        "    environment:\n"
        "      MY_SETTING: ok\n"
        '      KEEL_MINE: "1"\n'
    )
    out = tmp_path / "out"
    done = subprocess.run(
        [str(REPO_ROOT / "bin" / "render-config"), "dev", "--config-dir", str(configs), "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines == [
        "render-config: configs/dev.yaml:5: processes.trainer.environment.KEEL_MINE: KEEL_* names are reserved for keel "
        "(keel sets KEEL_PROCESS, KEEL_CONFIG and KEEL_CONFIG_DIGEST itself; choose another name)"
    ]
    assert not out.exists()
    assert done.stdout == ""
