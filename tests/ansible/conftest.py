import pytest

from tests.ansible.fleet import make_fleet, snapshot


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A frozen copy of the working tree to pack releases from."""
    return snapshot(tmp_path_factory.mktemp("source") / "keel")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, source):
    """Three simulated hosts; every stack they run is taken down at the end, and anything left is killed by pid."""
    fleet = make_fleet(tmp_path_factory.mktemp("fleet"), source)
    try:
        yield fleet
    finally:
        fleet.down()
