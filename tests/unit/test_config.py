"""Config loading: merging, overrides, and one-line errors that name the file, line and key."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

from keel.config.load import ConfigError, deep_merge, load_config
from tests.support import REPO_ROOT


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    """A copy of the real configs/ to break."""
    target = tmp_path / "configs"
    shutil.copytree(REPO_ROOT / "configs", target)
    return target


def write_env(cfg: Path, text: str, name: str = "dev") -> Path:
    path = cfg / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def error_of(cfg: Path, env: str = "dev", overrides: list[str] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(env, cfg, list(overrides))
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    return message


@pytest.mark.parametrize("env", ["dev", "staging", "prod"])
def test_shipped_environments_validate(env):
    loaded = load_config(env, REPO_ROOT / "configs")
    assert set(loaded.config.processes) == {"trainer", "dashboard", "watchdog"}


def test_maps_merge_and_lists_replace():
    merged = deep_merge({"a": {"x": 1, "y": [1, 2]}, "b": 1}, {"a": {"y": [3]}, "c": 2})
    assert merged == {"a": {"x": 1, "y": [3]}, "b": 1, "c": 2}


def test_overlay_changes_only_what_it_names():
    dev = load_config("dev", REPO_ROOT / "configs").config
    assert dev.processes["trainer"].checkpoint.every_seconds == 10.0  # dev.yaml
    assert dev.processes["trainer"].checkpoint.keep == 3  # base.yaml
    assert dev.processes["dashboard"].port == 5006


def test_set_overrides_are_yaml_typed(cfg):
    loaded = load_config("dev", cfg, ["processes.trainer.gpus=[0,1]", "processes.dashboard.port=5010"])
    assert loaded.config.processes["trainer"].gpus == [0, 1]
    assert loaded.config.processes["dashboard"].port == 5010


def test_unknown_key_names_file_line_and_suggests(cfg):
    write_env(cfg, """\
        processes:
          trainer:
            restart:
              polcy: always
        """)
    assert error_of(cfg) == "configs/dev.yaml:4: processes.trainer.restart.polcy: unknown key (did you mean 'policy'?)".replace(
        "configs/", f"{cfg.relative_to(Path.cwd()) if cfg.is_relative_to(Path.cwd()) else cfg}/"
    )


def test_bad_duration_points_at_the_line(cfg):
    write_env(cfg, """\
        # a comment
        processes:
          trainer:
            stop:
              timeout: soon
        """)
    message = error_of(cfg)
    assert message.endswith('dev.yaml:5: processes.trainer.stop.timeout: expected a duration like 90s, 5m or 1h, got "soon"')


@pytest.mark.parametrize(
    "override, expected",
    [
        ("processes.trainer.health.heartbeat_timeout=0s", "a duration must be positive"),
        ("processes.trainer.health.heartbeat_timeout=-5s", "a duration must be positive"),
        ("processes.trainer.limits.memory=12XB", 'expected a size like 512MiB or 24GiB, got "12XB"'),
        ("processes.trainer.limits.memory=0", "a size must be positive"),
        ("processes.trainer.batch_size=many", "processes.trainer.batch_size: Input should be a valid integer"),
        ("processes.trainer.gpus=banana", "expected a list of GPU indices like [0, 1], auto:N, or []"),
        ("processes.trainer.gpus=auto:0", "auto:N needs N >= 1"),
        ("processes.trainer.gpus=auto:65", "asks for more GPUs than a host has"),
        ("processes.trainer.gpus=[0,0]", "processes.trainer.gpus[1]: GPU 0 is already given to processes.trainer"),
        ("processes.dashboard.gpus=[0]", "a dashboard never gets GPUs"),
        ("processes.watchdog.gpus=auto:1", "a watchdog never gets GPUs"),
        ("processes.trainer.kind=foo", "processes.trainer.kind: kind must be one of trainer, dashboard, watchdog, command"),
        ("processes.trainer.stpo.timeout=5s", "unknown key (did you mean 'stop'?)"),
        ("processes.trainr.gpus=[]", "processes.trainr: no such process (did you mean 'trainer'?)"),
        ("processes.trainer.environment.X=true", "a boolean is ambiguous"),
        ("processes.trainer.environment.bad-name=1", "processes.trainer.environment.bad-name:"),
        ("processes.dashboard.address=0.0.0.0", "is not loopback: list the allowed origins"),
        ("processes.trainer.limits.gpu_memory=0.5", "gpu_memory is set but the process has no GPUs"),
        ("processes.dashboard.auth.required=true", "auth.required needs password_hash or password_file"),
        ("python=relative/python", "python must be an absolute path"),
        ("processes.trainer.health.heartbeat_interval=1m", "must be shorter than heartbeat_timeout"),
        ("processes.trainer.launcher=torchrun", None),
    ],
)
def test_bad_values_get_one_clear_line(cfg, override, expected):
    if expected is None:  # a valid override, for contrast with the next case
        load_config("dev", cfg, [override])
        expected, override = "torchrun needs an explicit GPU list", "processes.trainer.gpus=auto:2"
        message = error_of(cfg, overrides=["processes.trainer.launcher=torchrun", override])
        assert message.startswith(f"--set {override}: ") and expected in message
        return
    message = error_of(cfg, overrides=[override])
    assert message.startswith(f"--set {override}: ")
    assert expected in message


def test_duplicate_gpu_across_processes(cfg):
    write_env(cfg, """\
        processes:
          trainer:
            gpus: [0, 1]
          evaluator:
            kind: command
            command: /usr/bin/true
            gpus: [1, 2]
        """)
    message = error_of(cfg)
    assert message.endswith("dev.yaml:7: processes.evaluator.gpus[0]: GPU 1 is already given to processes.trainer")


def test_duplicate_port(cfg):
    write_env(cfg, """\
        processes:
          api:
            kind: command
            command: /usr/bin/true
            port: 5006
        """)
    assert "processes.api.port: port 5006 is already used by processes.dashboard" in error_of(cfg)


@pytest.mark.parametrize("name", ["bad name", "50%", "Trainer", "x" * 41])
def test_bad_process_names(cfg, name):
    write_env(cfg, f"""\
        processes:
          "{name}":
            kind: command
            command: /usr/bin/true
        """)
    assert "must match [a-z][a-z0-9_-]*" in error_of(cfg)


def test_newline_in_environment_value(cfg):
    write_env(cfg, """\
        processes:
          trainer:
            environment:
              GREETING: "hello\\nworld"
        """)
    message = error_of(cfg)
    assert "dev.yaml:4: processes.trainer.environment.GREETING: an environment value cannot contain a newline" in message


def test_unknown_environment_lists_known(cfg):
    assert error_of(cfg, env="prdo") == (
        f"unknown environment 'prdo' (no {_shown(cfg / 'prdo.yaml')}); known: dev, prod, staging"
    )


def test_any_yaml_beside_base_is_an_environment(cfg):
    write_env(cfg, "processes:\n  dashboard:\n    port: 7000\n", name="lab")
    assert load_config("lab", cfg).config.processes["dashboard"].port == 7000


def test_malformed_yaml_names_the_line(cfg):
    write_env(cfg, "processes:\n  trainer:\n    stop: [\n")
    assert error_of(cfg).endswith("dev.yaml:4: malformed YAML: expected the node content, but found '<stream end>'")


def test_duplicate_yaml_key(cfg):
    write_env(cfg, "processes:\n  trainer:\n    gpus: []\n    gpus: [1]\n")
    assert error_of(cfg).endswith("dev.yaml:4: processes.trainer.gpus: duplicate key")


def test_unreadable_file(cfg):
    (cfg / "dev.yaml").write_bytes(b"\xff\xfe\x00bad")
    assert "dev.yaml: cannot read" in error_of(cfg)


def test_top_level_must_be_a_mapping(cfg):
    write_env(cfg, "- a\n- b\n")
    assert error_of(cfg).endswith("dev.yaml:1: the top level must be a mapping of keys, got list")


def test_missing_base(tmp_path):
    (tmp_path / "dev.yaml").write_text("{}\n")
    assert "base.yaml: no such file" in error_of(tmp_path)


def test_systemd_needs_absolute_program(cfg):
    write_env(cfg, """\
        backend: systemd
        processes:
          api:
            kind: command
            command: serve --port 1
        """)
    assert "processes.api.command: systemd needs an absolute path for the program, got 'serve'" in error_of(cfg)


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
