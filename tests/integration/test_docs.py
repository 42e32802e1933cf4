"""The docs tell the truth: runnable shell blocks run, links resolve, the config reference is fresh.

A shell block preceded by `<!-- runnable -->` in README.md or docs/*.md is executed, as
written, in a private copy of the checkout (its own var/ and build/, a free dashboard port),
with `bash -euo pipefail`: every command in it must succeed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import psutil
import pytest

from tests.support import REPO_ROOT, free_port, wait_until

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
RUNNABLE = re.compile(r"<!-- runnable -->\s*\n```(?:sh|bash)\n(.*?)```", re.S)
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def runnable_blocks() -> list[tuple[str, int, str]]:
    blocks = []
    for path in DOCS:
        text = path.read_text()
        for match in RUNNABLE.finditer(text):
            line = text[: match.start()].count("\n") + 1
            blocks.append((str(path.relative_to(REPO_ROOT)), line, match.group(1)))
    return blocks


def test_there_are_runnable_blocks():
    assert len(runnable_blocks()) >= 2


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    for target in LINK.findall(doc.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (doc.parent / target).exists(), f"{doc.name}: broken link {target}"


def test_config_reference_and_schema_are_fresh():
    done = subprocess.run([str(REPO_ROOT / ".venv" / "bin" / "python"), "-m", "keel.config.schema", "--check"],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr + " (run `make schema`)"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A copy of the working tree sharing the real .venv, with its own var/, build/ and a free port."""
    root = tmp_path_factory.mktemp("docs") / "keel"
    shutil.copytree(REPO_ROOT, root, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", "var", "build", ".git", "__pycache__", ".pytest_cache", ".hypothesis", "supervisord.conf", "tmp*"))
    (root / ".venv").symlink_to(REPO_ROOT / ".venv")
    port = free_port()
    base = root / "configs" / "base.yaml"
    base.write_text(base.read_text().replace("port: 5006", f"port: {port}"))
    yield root, port
    subprocess.run([str(root / "bin" / "launch"), "down", "dev"], capture_output=True, timeout=120)
    prefix = str(root / "build") + "/"
    left = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("KEEL_CONFIG", "").startswith(prefix):
                proc.kill()
                left.append(proc.pid)
        except psutil.Error:
            pass
    wait_until(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in left),
               15, what="docs stack gone")


@pytest.mark.slow
@pytest.mark.parametrize("source, line, block", runnable_blocks(), ids=lambda v: v if isinstance(v, str) and "\n" not in v else None)
def test_runnable_block(checkout, source, line, block):
    root, port = checkout
    script = block.replace("5006", str(port)).replace("/tmp/", f"{root}/tmp-out/")
    env = {k: v for k, v in os.environ.items() if k != "KEEL_BUILD_ROOT"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=root, capture_output=True, text=True,
                          timeout=400, env=env)
    assert done.returncode == 0, f"{source}:{line}: block failed (exit {done.returncode})\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
