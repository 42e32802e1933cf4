"""The page's text blocks as Bokeh models."""

from __future__ import annotations

from typing import Any

from bokeh.models import Div


def text_div(**kw: Any) -> Div:
    """A Div whose text is HTML and nothing else: Bokeh typesets TeX between ``$$`` in a Div by default, and a
    log line or a reason holding dollar signs must read as written (and the page loads no MathJax:
    dashboard.server)."""
    return Div(disable_math=True, **kw)
