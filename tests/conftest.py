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


@pytest.fixture(scope="session")
def chromium_path():
    """Path to Debian's chromium. Missing is a skip locally, a failure in CI."""
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run must install it (apt-get install -y chromium)")
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    return path
