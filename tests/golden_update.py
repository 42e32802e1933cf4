"""Render every environment x backend with a fixed checkout path into tests/golden/.

    make golden      # then review `git diff tests/golden`

The renderer is pure, so the golden files depend only on configs/ and templates/,
not on where the repo is cloned.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from keel.config.load import load_config
from keel.render.templates import RenderedFile, render
from keel.render.resolve import Context

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "golden"
FIXED_CODE_DIR = Path("/opt/keel")
ENVIRONMENTS = ("dev", "staging", "prod")
BACKENDS = ("supervisord", "systemd")


def golden_render(env: str, backend: str) -> list[RenderedFile]:
    loaded = load_config(env, REPO / "configs")
    ctx = Context(
        env=env,
        code_dir=FIXED_CODE_DIR,
        build_dir=FIXED_CODE_DIR / "build" / env,
        sources=("configs/base.yaml", f"configs/{env}.yaml"),
        backend=backend,
    )
    return render(loaded.config, ctx, install=True)


def golden_name(file: RenderedFile) -> str:
    """Installed files (absolute paths) live under _abs/ in the golden tree."""
    return "_abs" + file.path if file.path.startswith("/") else file.path


def main() -> None:
    for env in ENVIRONMENTS:
        for backend in BACKENDS:
            target = GOLDEN / f"{env}-{backend}"
            shutil.rmtree(target, ignore_errors=True)
            for file in golden_render(env, backend):
                path = target / golden_name(file)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(file.text, encoding="utf-8")
            print(f"wrote {target.relative_to(REPO)}")


if __name__ == "__main__":
    main()
