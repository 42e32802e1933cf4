"""The backend a rendered ``keel.json`` describes, limited to that stack's processes."""

from __future__ import annotations

from keel.control.base import ControlBackend
from keel.control.supervisord import SupervisordBackend
from keel.control.systemd import SystemdBackend
from keel.render.contract import StackFile

__all__ = ["backend_for"]


def backend_for(stack: StackFile, *, timeout: float | None = None) -> ControlBackend:
    """Names come from keel.json (``program``, ``unit``: computed once, by keel.render.resolve).

    ``timeout`` defaults to the slowest process's stop timeout plus 10 s: a stop waits for it (then SIGKILL).
    """
    control, processes = stack.control, stack.processes
    if timeout is None:
        timeout = max((p.stop.timeout for p in processes.values()), default=0.0) + 10.0
    if control.backend == "supervisord":
        programs = {name: p.program for name, p in processes.items()}
        return SupervisordBackend(control.socket, programs, timeout=timeout, mode=control.mode, config=control.config)
    units = {name: p.unit for name, p in processes.items()}
    return SystemdBackend(units, target=control.target, timeout=timeout)
