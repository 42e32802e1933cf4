"""Rendered systemd units pass `systemd-analyze verify` cleanly and score well on `security`.

systemd is not PID 1 here, so units cannot be started; these are the checks that can run.
`verify` exits 0 on unknown keys, so its stderr must be empty.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import in_ci
from tests.golden_update import ENVIRONMENTS, golden_render


@pytest.fixture(autouse=True)
def systemd_analyze() -> None:
    """Missing systemd-analyze is a failure in CI (as a missing chromium is), elsewhere a skip."""
    if shutil.which("systemd-analyze") is None:
        if in_ci():
            pytest.fail("systemd-analyze is not installed and CI=true: run `make deps` (make test does)")
        pytest.skip("systemd-analyze is not installed: `sudo apt-get install -y systemd`")


# Upper bounds on `systemd-analyze security` exposure (0 best, 10 worst), from the issue.
MAX_EXPOSURE = {"dashboard": 2.5, "trainer": 3.0, "watchdog": 4.5}


def write_units(env: str, directory: Path) -> list[Path]:
    paths = []
    for file in golden_render(env, "systemd"):
        if file.path.startswith("systemd/"):
            path = directory / Path(file.path).name
            path.write_text(file.text)
            paths.append(path)
    return paths


def exposure(unit: Path) -> float:
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=60, cwd=unit.parent,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout + done.stderr)
    assert match, f"no exposure score in: {done.stdout[-500:]} {done.stderr[-500:]}"
    return float(match.group(1))


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_units_verify_with_empty_stderr(env, tmp_path):
    units = write_units(env, tmp_path)
    assert {u.name for u in units} == {"keel-trainer.service", "keel-dashboard.service", "keel-watchdog.service", "keel.target"}
    done = subprocess.run(["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    # verify reads the commands' executables: a missing /opt/keel/.venv/bin/python is reported, nothing else may be.
    problems = [line for line in done.stderr.splitlines() if "/opt/keel/.venv/bin/" not in line and line.strip()]
    assert problems == [], "\n".join(problems)
    assert done.returncode in (0, 1)


@pytest.mark.parametrize("env", ["dev", "prod"])
def test_security_exposure_within_bounds(env, tmp_path):
    units = {u.stem.removeprefix("keel-"): u for u in write_units(env, tmp_path) if u.suffix == ".service"}
    scores = {name: exposure(unit) for name, unit in units.items()}
    for name, score in scores.items():
        assert score <= MAX_EXPOSURE[name], f"{env} {name}: exposure {score} > {MAX_EXPOSURE[name]}"


def test_exposure_scale_calibration(tmp_path):
    """The yardstick: a bare unit scores about 9.2, so the scores above mean something."""
    bare = tmp_path / "bare.service"
    bare.write_text("[Service]\nExecStart=/usr/bin/true\n")
    assert exposure(bare) >= 9.0
