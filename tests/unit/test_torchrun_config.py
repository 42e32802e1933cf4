"""torchrun settings: a multi-node job is validated (one-line errors with file:line and key) and
rendered into torchrun's elastic flags; one node keeps --standalone. The rank status names the
trainer writes are the ones keel.json lists for the local watchdog."""

from __future__ import annotations

import json
import shutil
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from keel.config.load import ConfigError, load_config
from keel.config.torchrun import TorchrunSettings, node_range
from keel.render import torchrun as tr
from keel.render.resolve import Context, process_file, stack_file
from tests.support import REPO_ROOT
from trainer.__main__ import status_name
from trainer.distributed import DistInfo
from trainer.settings import from_process_file

MULTI = """\
    processes:
      trainer:
        launcher: torchrun
        torchrun:
          nproc_per_node: 2
          nnodes: {nnodes}
{extra}
    """


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    target = tmp_path / "configs"
    shutil.copytree(REPO_ROOT / "configs", target)
    return target


def write_env(cfg: Path, nnodes: str, extra: str = "", name: str = "dev") -> Path:
    lines = "".join(f"          {line}\n" for line in textwrap.dedent(extra).splitlines() if line)
    path = cfg / f"{name}.yaml"
    path.write_text(textwrap.dedent(MULTI).replace("{nnodes}", nnodes).replace("{extra}\n", lines))
    return path


def error_of(cfg: Path, env: str = "dev") -> str:
    with pytest.raises(ConfigError) as info:
        load_config(env, cfg)
    message = str(info.value)
    assert "\n" not in message
    return message


def line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def ctx(tmp_path: Path, env: str = "dev", release: str = "v1.2.0") -> Context:
    return Context(env=env, code_dir=tmp_path / "releases" / release, build_dir=tmp_path / "build", sources=("base.yaml",), backend="supervisord")


GOOD = """\
rdzv_endpoint: node-a.internal:29400
shared_checkpoints: true
node: a
"""


# -- validation --------------------------------------------------------------------------------


def test_multi_node_without_an_endpoint_is_refused_at_its_file_and_line(cfg):
    path = write_env(cfg, "2", "shared_checkpoints: true")
    message = error_of(cfg)
    assert "processes.trainer.torchrun.rdzv_endpoint" in message and "multi-node job needs rdzv_endpoint" in message
    assert f":{line_of(path, 'torchrun:')}:" in message  # the section's line: the key itself is absent


def test_a_bad_endpoint_is_refused_at_its_own_line(cfg):
    path = write_env(cfg, "2", "rdzv_endpoint: node-a\nshared_checkpoints: true")
    message = error_of(cfg)
    assert f":{line_of(path, 'rdzv_endpoint')}: processes.trainer.torchrun.rdzv_endpoint: rdzv_endpoint must be host:port" in message


def test_multi_node_needs_the_checkpoints_declared_shared(cfg):
    write_env(cfg, "2", "rdzv_endpoint: node-a:29400")
    assert "processes.trainer.torchrun.shared_checkpoints: a multi-node job resumes on whichever node" in error_of(cfg)


@pytest.mark.parametrize("nnodes, why", [('"4:2"', "min must not exceed max"), ('"two"', "nnodes must be a number or a range"), ("0", "at least 1")])
def test_bad_node_counts_are_refused_at_their_line(cfg, nnodes, why):
    path = write_env(cfg, nnodes, GOOD)
    message = error_of(cfg)
    assert f":{line_of(path, 'nnodes')}: processes.trainer.torchrun.nnodes: " in message and why in message


def test_node_range_parses_numbers_and_ranges():
    assert node_range(1) == (1, 1) and node_range("3") == (3, 3) and node_range("1:4") == (1, 4)
    with pytest.raises(ValueError):
        node_range("0:2")


# -- rendering ---------------------------------------------------------------------------------


def test_one_node_keeps_standalone_and_rank_names(tmp_path):
    config = load_config("prod", REPO_ROOT / "configs").config
    c = ctx(tmp_path)
    stack = stack_file(config, c).to_json()
    trainer = stack["processes"]["trainer"]
    assert trainer["command"][1:6] == ["--nproc-per-node", "2", "--nnodes", "1", "--standalone"]
    assert trainer["status_names"] == ["trainer.rank0", "trainer.rank1"]
    block = process_file("trainer", config, c).to_json()["trainer"]["torchrun"]
    assert block["multi_node"] is False and block["rdzv_id"] is None and block["node"] is None


def test_multi_node_renders_the_elastic_flags(cfg, tmp_path):
    write_env(cfg, '"1:4"', GOOD + "max_restarts: 7\njoin_timeout: 90s\nlast_call_timeout: 1.5s\nclose_timeout: 10s")
    config = load_config("dev", cfg).config
    c = ctx(tmp_path)
    trainer = stack_file(config, c).to_json()["processes"]["trainer"]
    assert trainer["command"][0].endswith("/torchrun")
    assert trainer["command"][1:] == [
        "--nproc-per-node", "2", "--nnodes", "1:4",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "node-a.internal:29400", "--rdzv-id", "keel-dev-v1.2.0",
        "--rdzv-conf", "join_timeout=90,last_call_timeout=2,close_timeout=10",  # whole seconds, rounded up
        "--max-restarts", "7",
        "-m", "trainer", "--config", str(c.build_dir / "trainer.json"),
    ]  # fmt: skip
    assert "--standalone" not in trainer["command"]
    assert trainer["status_names"] == ["trainer.a.r0", "trainer.a.r1"]


def test_the_rendezvous_id_separates_environments_and_releases(cfg, tmp_path):
    write_env(cfg, "2", GOOD)
    write_env(cfg, "2", GOOD, name="staging")
    ids = set()
    for env in ("dev", "staging"):
        for release in ("v1", "v2"):
            config = load_config(env, cfg).config
            ids.add(process_file("trainer", config, ctx(tmp_path, env, release)).to_json()["trainer"]["torchrun"]["rdzv_id"])
    assert ids == {"keel-dev-v1", "keel-dev-v2", "keel-staging-v1", "keel-staging-v2"}


def test_an_explicit_rendezvous_id_and_the_host_name_default(cfg, tmp_path):
    write_env(cfg, "2", "rdzv_endpoint: 10.0.0.1:29400\nshared_checkpoints: true\nrdzv_id: job-42")
    config = load_config("dev", cfg).config
    c = replace(ctx(tmp_path), hostname="GPU-07.dc1.example")
    doc = process_file("trainer", config, c).to_json()["trainer"]["torchrun"]
    assert doc["rdzv_id"] == "job-42" and doc["node"] == "gpu-07"
    assert stack_file(config, c).to_json()["processes"]["trainer"]["status_names"] == ["trainer.gpu-07.r0", "trainer.gpu-07.r1"]


def test_the_trainer_writes_the_names_keel_json_lists(cfg, tmp_path):
    """One truth: the status names the local watchdog watches are the ones each local rank writes."""
    write_env(cfg, "2", GOOD)
    config = load_config("dev", cfg).config
    c = ctx(tmp_path)
    listed = stack_file(config, c).to_json()["processes"]["trainer"]["status_names"]
    pf = process_file("trainer", config, c)
    settings = from_process_file(pf, "trainer.json")
    # this node holds global ranks 2 and 3 in this rendezvous: names follow the local rank
    written = [status_name(settings, DistInfo(rank=2 + local, world_size=4, local_rank=local)) for local in range(2)]
    assert written == listed
    # one node: unchanged, the global rank
    one = from_process_file(process_file("trainer", load_config("staging", cfg).config, c), "trainer.json")
    assert status_name(one, DistInfo(rank=1, world_size=2, local_rank=1)) == "trainer.rank1"


def test_resolved_file_round_trips_through_the_contract(cfg, tmp_path):
    write_env(cfg, '"2:3"', GOOD)
    config = load_config("dev", cfg).config
    doc = process_file("trainer", config, ctx(tmp_path)).to_json()
    from keel.render.contract import parse_process_file

    again = parse_process_file(json.loads(json.dumps(doc)), "trainer.json")
    assert again.trainer.torchrun.nnodes == "2:3" and again.trainer.torchrun.shared_checkpoints is True


def test_rdzv_conf_and_job_id_helpers():
    settings = TorchrunSettings(nnodes=2, rdzv_endpoint="h:1", shared_checkpoints=True, join_timeout=0.2)
    resolved = tr.resolve(settings, project="p", env="e", release="r/1", hostname="h")
    assert tr.rdzv_conf(resolved) == "join_timeout=1,last_call_timeout=30,close_timeout=30"
    assert resolved["rdzv_id"] == "p-e-r-1"


def test_an_unquoted_elastic_range_stays_the_range_the_user_wrote(cfg, tmp_path):
    # YAML 1.1 reads `1:4` as the base-60 number 64; keel's loader keeps it a string.
    write_env(cfg, "1:4", GOOD)
    config = load_config("dev", cfg).config
    trainer = stack_file(config, ctx(tmp_path)).to_json()["processes"]["trainer"]
    assert trainer["command"][trainer["command"].index("--nnodes") + 1] == "1:4"
