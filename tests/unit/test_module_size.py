"""Small modules with one job: no module of what ships (keel, trainer, dashboard, monitoring) or of its
tests over 400 lines. bench/ is not held to it yet: isolation_bench.py (~900 lines) is one script."""

from __future__ import annotations

from tests.support import REPO_ROOT

MAX_LINES = 400
HELD = ("keel", "trainer", "dashboard", "monitoring", "tests")


def test_no_module_is_over_400_lines():
    sizes = {str(p.relative_to(REPO_ROOT)): len(p.read_text().splitlines())
             for pkg in HELD for p in (REPO_ROOT / pkg).rglob("*.py")}
    assert len(sizes) > 100  # the packages were found
    assert {p: n for p, n in sizes.items() if n > MAX_LINES} == {}
