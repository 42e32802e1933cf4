"""bin/render-config as a user runs it: exit codes, one-line errors, atomic and change-only writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO_ROOT

RENDER = str(REPO_ROOT / "bin" / "render-config")


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([RENDER, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    target = tmp_path / "configs"
    shutil.copytree(REPO_ROOT / "configs", target)
    return target


def snapshot(directory: Path) -> dict[str, tuple[int, int, bytes]]:
    return {str(p.relative_to(directory)): (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_help_documents_every_flag():
    done = run("--help")
    assert done.returncode == 0
    for flag in ("--backend", "--out", "--config-dir", "--set", "--check", "--diff", "--no-reload", "--no-mkdirs", "--quiet"):
        assert flag in done.stdout


def test_writes_files_and_summary(cfg, tmp_path):
    out = tmp_path / "out"
    done = run("dev", "--config-dir", str(cfg), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "processes: trainer, dashboard, watchdog" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["dashboard.json", "keel.json", "supervisord.conf", "trainer.json", "watchdog.json"]
    stack = json.loads((out / "keel.json").read_text())
    assert stack["processes"]["trainer"]["config_file"] == str(out / "trainer.json")


def test_unchanged_files_keep_inode_and_mtime(cfg, tmp_path):
    out = tmp_path / "out"
    assert run("dev", "--config-dir", str(cfg), "--out", str(out)).returncode == 0
    for path in out.iterdir():  # an hour back: a rewrite, however soon, would show as a new mtime
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns - 3600 * 10**9))
    before = snapshot(out)
    done = run("dev", "--config-dir", str(cfg), "--out", str(out), "--set", "processes.dashboard.port=5010")
    assert done.returncode == 0
    after = snapshot(out)
    assert after["trainer.json"] == before["trainer.json"]  # same inode, mtime, bytes
    assert after["dashboard.json"][2] != before["dashboard.json"][2]
    assert after["dashboard.json"][0] != before["dashboard.json"][0]  # replaced by rename, not rewritten in place


def test_check_writes_nothing(cfg, tmp_path):
    out = tmp_path / "out"
    done = run("staging", "--config-dir", str(cfg), "--out", str(out), "--check")
    assert done.returncode == 0 and "valid" in done.stdout
    assert not out.exists()


def test_diff_shows_changes_and_writes_nothing(cfg, tmp_path):
    out = tmp_path / "out"
    assert run("dev", "--config-dir", str(cfg), "--out", str(out)).returncode == 0
    before = snapshot(out)
    done = run("dev", "--config-dir", str(cfg), "--out", str(out), "--diff", "--set", "processes.dashboard.port=5010")
    assert done.returncode == 0
    assert '-    "port": 5006,' in done.stdout and '+    "port": 5010,' in done.stdout
    assert "trainer.json" not in done.stdout
    assert snapshot(out) == before
    assert run("dev", "--config-dir", str(cfg), "--out", str(out), "--diff").stdout == ""


def test_bad_config_exits_2_with_one_line_and_writes_nothing(cfg, tmp_path):
    out = tmp_path / "out"
    assert run("dev", "--config-dir", str(cfg), "--out", str(out)).returncode == 0
    before = snapshot(out)
    (cfg / "dev.yaml").write_text("processes:\n  trainer:\n    stop:\n      timeout: soon\n")
    done = run("dev", "--config-dir", str(cfg), "--out", str(out))
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].endswith('dev.yaml:4: processes.trainer.stop.timeout: expected a duration like 90s, 5m or 1h, got "soon"')
    assert snapshot(out) == before


def test_unrepresentable_value_is_refused_with_its_line(cfg, tmp_path):
    (cfg / "dev.yaml").write_text("processes:\n  trainer:\n    environment:\n      NOTE: 'a ;comment'\n")
    done = run("dev", "--config-dir", str(cfg), "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert "dev.yaml:4: processes.trainer.environment.NOTE: supervisord would read" in done.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_environment_and_bad_arguments(cfg):
    done = run("nope", "--config-dir", str(cfg))
    assert done.returncode == 2 and "known: dev, prod, staging" in done.stderr
    assert run("dev", "--backend", "docker").returncode == 2
    done = run("dev", "--config-dir", str(cfg), "--set", "processes.trainer.nonexistent=1", "--check")
    assert done.returncode == 2 and "processes.trainer.nonexistent: unknown key" in done.stderr


def test_systemd_backend_out_dir(cfg, tmp_path):
    out = tmp_path / "units"
    done = run("prod", "--config-dir", str(cfg), "--backend", "systemd", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (out / "systemd").iterdir()) == [
        "keel-dashboard.service", "keel-trainer.service", "keel-watchdog.service", "keel.target"]


def test_prod_out_writes_the_include_fragment(cfg, tmp_path):
    out = tmp_path / "prod"
    done = run("prod", "--config-dir", str(cfg), "--out", str(out))
    assert done.returncode == 0, done.stderr
    fragment = (out / "keel.conf").read_text()
    assert "[program:keel-trainer]" in fragment and "[supervisord]" not in fragment and "[group:" not in fragment
    written = [line.split()[-1] for line in done.stdout.splitlines() if line.startswith("  changed")]
    assert len(written) == 5 and all(path.startswith(str(out)) for path in written)  # --out installs nothing elsewhere


@pytest.fixture
def read_only_dir(tmp_path):
    target = tmp_path / "ro"
    target.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(target)], capture_output=True)
    if done.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a read-only tmpfs: {done.stderr!r}")
        pytest.skip("cannot mount a read-only tmpfs here")
    yield target
    subprocess.run(["umount", str(target)], check=True)


def test_read_only_output_dir(cfg, read_only_dir):
    done = run("dev", "--config-dir", str(cfg), "--out", str(read_only_dir / "build"))
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1
    assert "cannot write here (read-only or no permission)" in done.stderr
    assert list(read_only_dir.iterdir()) == []


def test_does_not_import_torch_or_bokeh():
    code = ("import sys; from keel.cli.render_config import main; main(['dev', '--check', '-q']); "
            "bad = [m for m in ('torch', 'bokeh') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_cli_modules_do_not_import_each_other():
    """Entry points are argument parsing and printing; what they share lives in keel.stack."""
    import ast

    for path in sorted((REPO_ROOT / "keel" / "cli").glob("*.py")):
        tree = ast.parse(path.read_text())
        imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in imported if m == "keel.cli" or m.startswith("keel.cli.")], path.name
