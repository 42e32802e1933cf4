"""Install a stack's rendered systemd units into the unit dir keel.json names (bin/launch up, systemd)."""

from __future__ import annotations

from pathlib import Path

from keel.fs.atomic import atomic_write_text
from keel.render.contract import StackFile


def install_systemd_units(stack: StackFile) -> list[Path]:
    """Copy build/<env>/systemd/* into ``control.unit_dir``, writing only what differs; the paths written."""
    unit_dir = Path(stack.control.unit_dir)
    written = []
    for unit in sorted((Path(stack.paths.build_dir) / "systemd").iterdir()):
        target = unit_dir / unit.name
        text = unit.read_text()
        if not target.exists() or target.read_text() != text:
            atomic_write_text(target, text, 0o644)
            written.append(target)
    return written
