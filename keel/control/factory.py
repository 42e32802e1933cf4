"""The backend a rendered ``keel.json`` describes, limited to that stack's processes."""

from __future__ import annotations

from typing import Any, Mapping

from keel.control.base import ControlBackend
from keel.control.supervisord import SupervisordBackend
from keel.control.systemd import SystemdBackend
from keel.render.contract import StackFile, parse_stack

__all__ = ["backend_for"]


def backend_for(stack: StackFile | Mapping[str, Any], *, timeout: float | None = None) -> ControlBackend:
    """Names come from keel.json (``program``, ``unit``: computed once, by keel.render.resolve).

    A keel.json still held as its JSON dict is checked against the contract first.
    ``timeout`` defaults to the slowest process's stop timeout plus 10 s: a stop waits for it (then SIGKILL).
    """
    if not isinstance(stack, StackFile):
        stack = parse_stack(stack)
    control, processes = stack.control, stack.processes
    if timeout is None:
        timeout = max((p.stop.timeout for p in processes.values()), default=0.0) + 10.0
    if control.backend == "supervisord":
        programs = {name: p.program for name, p in processes.items()}
        return SupervisordBackend(control.socket, programs, timeout=timeout, mode=control.mode, config=control.config)
    units = {name: p.unit for name, p in processes.items()}
    return SystemdBackend(units, target=control.target, timeout=timeout)
