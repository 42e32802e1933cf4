"""Where a stack's files are: the checkout, its configs/, build/<env>/keel.json (and loading it), the runtime dirs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from keel.host.dirs import prepare_process_dirs
from keel.render.contract import ContractError, StackFile, load_process_file, load_stack

# The checkout (or release) keel runs from: rendered commands name it, configs/ is found in it.
CODE_DIR = Path(__file__).resolve().parents[2]


def build_root() -> Path:
    """Where build/<env>/ lives: the checkout's build/, or $KEEL_BUILD_ROOT (tests, read-only checkouts)."""
    return Path(os.environ.get("KEEL_BUILD_ROOT") or CODE_DIR / "build").resolve()


def config_dir(given: Path | None = None) -> Path:
    """--config-dir, else the checkout's own configs/ (not the working directory's: running
    /srv/keel/current/bin/render-config from elsewhere must not pick up a stray configs/)."""
    return given if given is not None else CODE_DIR / "configs"


def stack_path(env: str) -> Path:
    """The rendered keel.json of an environment."""
    return build_root() / env / "keel.json"


def load_rendered_stack(env: str) -> StackFile:
    """The environment's keel.json through the contract; ContractError naming the file (and the key)."""
    path = stack_path(env)
    if not path.exists():
        raise ContractError(str(path), "", f"not rendered yet (run bin/render-config {env})")
    return load_stack(path)


def make_dirs(stack: StackFile, names: Iterable[str]) -> None:
    """The dirs supervisord and the processes need before they start (0750: status files are not public).

    Each process's own dirs are made by keel.host.dirs from its resolved file, as the process itself
    would: run as root, this is what gives a process's tmp dir to its `user:` before it starts
    unprivileged. An unknown user raises ProcessDirError (an OSError naming the user)."""
    paths = stack.paths
    for directory in (paths.run_dir, paths.log_dir, paths.checkpoint_dir):
        os.makedirs(directory, mode=0o750, exist_ok=True)
    for name in names:
        prepare_process_dirs(load_process_file(stack.processes[name].config_file))
