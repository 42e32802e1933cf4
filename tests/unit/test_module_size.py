"""Small modules with one job: no module of what ships (keel, trainer, dashboard, monitoring) over 400 lines."""

from __future__ import annotations

from tests.support import REPO_ROOT

MAX_LINES = 400
SHIPPED = ("keel", "trainer", "dashboard", "monitoring")


def test_no_shipped_module_is_over_400_lines():
    sizes = {str(p.relative_to(REPO_ROOT)): len(p.read_text().splitlines())
             for pkg in SHIPPED for p in (REPO_ROOT / pkg).rglob("*.py")}
    assert len(sizes) > 50  # the packages were found
    assert {p: n for p, n in sizes.items() if n > MAX_LINES} == {}
