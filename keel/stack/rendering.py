"""The one render path for bin/render-config, bin/launch and bin/doctor: validate an environment,
render its files in memory, and (for launch) write them and make the runtime dirs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from keel.config.load import ConfigError, LoadedConfig, load_config
from keel.render.contract import StackFile, parse_stack
from keel.stack.paths import CODE_DIR, build_root, config_dir, make_dirs


def _sources(loaded: LoadedConfig) -> tuple[str, ...]:
    """File names for the header, stable wherever the command runs from."""
    out = []
    for path in loaded.files:
        resolved = path.resolve()
        try:
            out.append(str(resolved.relative_to(CODE_DIR)))
        except ValueError:
            out.append(str(resolved))
    return tuple(out)


def render_environment(
    env: str,
    given_config_dir: Path | None = None,
    overrides: Iterable[str] = (),
    backend: str | None = None,
    out: Path | None = None,
):
    """Validate and render one environment in memory: (loaded config, context, files, build dir).

    Raises ConfigError (with file:line) for a bad config and for a value the target format cannot carry.
    """
    # Imported here: loading and validating must stay fast and light for --check.
    from keel.render.resolve import Context
    from keel.render.templates import RenderError, render

    overrides = list(overrides) + ([f"backend={backend}"] if backend else [])
    loaded = load_config(env, config_dir(given_config_dir), overrides)
    build_dir = (out or build_root() / env).resolve()
    ctx = Context(env=env, code_dir=CODE_DIR, build_dir=build_dir, sources=_sources(loaded), backend=loaded.config.backend)
    try:
        files = render(loaded.config, ctx, install=out is None)
    except RenderError as exc:
        raise ConfigError(f"{loaded.locate(exc.path)}: {exc}") from None
    return loaded, ctx, files, build_dir


def stack_of(files) -> StackFile:
    """keel.json among the rendered files, through the contract."""
    return parse_stack(json.loads(next(f.text for f in files if f.path == "keel.json")))


def render_and_write(env: str, given_config_dir: Path | None, overrides: Iterable[str],
                     backend: str | None = None) -> StackFile:
    """Render like bin/render-config, write build/<env>/ and make the runtime dirs; return keel.json.

    A bad config raises ConfigError and writes nothing."""
    from keel.render.writer import write_files

    _, _, files, build_dir = render_environment(env, given_config_dir, overrides, backend)
    write_files(files, build_dir)
    stack = stack_of(files)
    make_dirs(stack, list(stack.processes))
    return stack
