import os
import shutil

import pytest

from tests.support import REPO_ROOT, ProcessReaper


@pytest.fixture
def reaper():
    """Start processes through `reaper.popen(...)` (or `reaper.track(pid)`); all are killed by pid at teardown."""
    r = ProcessReaper()
    yield r
    r.reap()


@pytest.fixture(scope="session")
def repo_root():
    return REPO_ROOT


def in_ci() -> bool:
    """CI sets CI=true; there nothing the suite needs may be missing."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def chromium_path():
    """Path to Debian's chromium (`make deps` installs it). Missing is a failure in CI, elsewhere a
    skip whose reason -ra prints in the summary."""
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if path is None:
        if in_ci():
            pytest.fail("chromium is not installed and CI=true: run `make deps` (make test does)")
        pytest.skip("chromium is not installed: run `make deps` (as root) or `sudo apt-get install -y chromium`")
    return path
