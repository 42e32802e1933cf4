"""Resolved files for tests, built by the real model and resolver, never by hand.

    build = resolve_stack(tmp_path, {"trainer": {"kind": "trainer", "max_steps": 7}})
    build / "trainer.json", build / "keel.json"

A test states only the settings it cares about, in config terms (YAML keys,
durations as "1s"); the model fills in its defaults and validates, and
keel.render.resolve writes exactly what `bin/render-config` would. So a fixture
can never drift from the contract (keel.render.contract).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from keel.config.load import cross_field_errors
from keel.config.model import KeelConfig
from keel.render.resolve import Context, process_file, stack_file
from keel.render.templates import RenderedFile, json_text, render
from keel.render.writer import write_files
from tests.support import REPO_ROOT


def make_config(root: Path, processes: dict[str, dict[str, Any]], **top: Any) -> KeelConfig:
    """A validated environment rooted at `root` (run/, log/, checkpoints/ below it)."""
    data: dict[str, Any] = {
        "project": "keel",
        "paths": {"root": str(root), "run_dir": "run", "log_dir": "log", "checkpoint_dir": "checkpoints"},
        "processes": processes,
        **top,
    }
    config = KeelConfig.model_validate(data)
    problems = cross_field_errors(config)
    assert not problems, problems
    return config


def make_context(build_dir: Path, config: KeelConfig, env: str = "test") -> Context:
    return Context(env=env, code_dir=REPO_ROOT, build_dir=build_dir, sources=("tests/resolved.py",), backend=config.backend)


def resolve_stack(
    root: Path,
    processes: dict[str, dict[str, Any]],
    *,
    build_dir: Path | None = None,
    backend_files: bool = False,
    env: str = "test",
    **top: Any,
) -> Path:
    """Write every process's `<name>.json` and `keel.json` into build_dir (default: root); returns it.

    backend_files=True also writes what the backend runs (supervisord.conf or systemd units),
    as `bin/render-config --out` does.
    """
    build = build_dir or root
    config = make_config(root, processes, **top)
    ctx = make_context(build, config, env)
    if backend_files:
        files = render(config, ctx, install=False)
    else:
        files = [RenderedFile(f"{name}.json", json_text(process_file(name, config, ctx).to_json())) for name in config.processes]
        files.append(RenderedFile("keel.json", json_text(stack_file(config, ctx).to_json())))
    write_files(files, build)
    return build


def edit_resolved(path: Path, changes: dict[str, Any]) -> None:
    """Set dotted keys ("dashboard.address") of a resolved file in place, as a hand edit would.

    Only for tests of a consumer's own checks on values the model refuses; every key must
    already be in the file, so the edited file keeps the contract's shape.
    """
    doc = json.loads(path.read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        block = doc
        for key in parents:
            block = block[key]
        assert leaf in block, f"{path.name}: {dotted}: not in the resolved file"
        block[leaf] = value
    path.write_text(json.dumps(doc))
