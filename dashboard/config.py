"""The dashboard's settings, read from its resolved file (build/<env>/dashboard.json).

keel.render.contract reads and checks the file (strict, no defaults); this module
flattens it into a frozen ``DashboardConfig``. The stack file (keel.json) is
optional at run time: without it the process table lists whatever status files
the run dir holds, unjudged (no keel.json entry: no timeouts to judge them by). A file off the contract raises ``ConfigError`` naming the
file and the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

from keel.config.netaddr import is_loopback
from keel.render.contract import (
    ContractError, ProcessFile, StackFile, StackProcess, load_process_file, load_stack, parse_process_file,
)


class ConfigError(ValueError):
    """The resolved file is unusable; the message names the file and key."""


@dataclass(frozen=True)
class AuthConfig:
    required: bool
    username: str
    password_hash: str | None
    password_file: str | None


@dataclass(frozen=True)
class ProcessInfo:
    """One process of keel.json: its name and its typed entry, whole (health and limits for
    keel.watch.verdicts, status names, log file), read as resolve wrote it."""

    name: str
    entry: StackProcess

    @property
    def kind(self) -> str:
        return self.entry.kind

    @property
    def status_names(self) -> tuple[str, ...]:
        return tuple(self.entry.status_names)

    @property
    def log_file(self) -> str:
        return self.entry.log_file

    @property
    def heartbeat_timeout(self) -> float:
        return self.entry.health.heartbeat_timeout


@dataclass(frozen=True)
class DashboardConfig:
    project: str
    environment: str
    name: str
    run_dir: str
    log_dir: str
    address: str
    port: int
    allow_websocket_origin: tuple[str, ...]
    refresh: float
    history_points: int
    log_tail_lines: int
    keep_alive: float
    unused_session_lifetime: float
    auth: AuthConfig
    stack: str
    heartbeat_interval: float
    durability: str
    log_format: str
    log_level: str
    processes: tuple[ProcessInfo, ...]  # from keel.json; empty until load_config reads it

    @property
    def read_timeout(self) -> float:
        """How long one blocking read may take before it is reported as hung."""
        return max(1.0, 2.0 * self.refresh)


def stack_processes(stack: StackFile) -> tuple[ProcessInfo, ...]:
    """The processes of keel.json, in file order."""
    return tuple(ProcessInfo(name, p) for name, p in stack.processes.items())


def from_process_file(pf: ProcessFile, where: str) -> DashboardConfig:
    """The dashboard's view of a checked resolved file; ConfigError unless it is a dashboard's."""
    d = pf.dashboard
    if pf.kind != "dashboard" or d is None:
        raise ConfigError(f"{where}: kind: expected a dashboard's resolved file, got kind {pf.kind!r}")
    return DashboardConfig(
        project=pf.project,
        environment=pf.environment,
        name=pf.name,
        run_dir=pf.paths.run_dir,
        log_dir=pf.paths.log_dir,
        address=d.address,
        port=d.port,
        allow_websocket_origin=tuple(d.allow_websocket_origin),
        refresh=d.refresh,
        history_points=d.history_points,
        log_tail_lines=d.log_tail_lines,
        keep_alive=d.keep_alive,
        unused_session_lifetime=d.unused_session_lifetime,
        auth=AuthConfig(**d.auth.model_dump()),
        stack=d.stack,
        heartbeat_interval=pf.heartbeat_interval,
        durability=pf.durability,
        log_format=pf.log.format,
        log_level=pf.log.level,
        processes=(),
    )


def parse_config(raw: Any, *, where: str = "dashboard.json") -> DashboardConfig:
    """An already-parsed resolved dashboard file -> DashboardConfig; ConfigError naming `where` and the key."""
    try:
        return from_process_file(parse_process_file(raw, where), where)
    except ContractError as exc:
        raise ConfigError(str(exc)) from None


def load_config(path: str | os.PathLike[str]) -> DashboardConfig:
    """Read and check the resolved file, and the stack file it names when that exists."""
    try:
        cfg = from_process_file(load_process_file(path), str(path))
    except ContractError as exc:
        raise ConfigError(str(exc)) from None
    if not os.path.exists(cfg.stack):
        return cfg  # shown on the page as "no stack file"; the run dir is still read
    try:
        stack = load_stack(cfg.stack)
    except ContractError as exc:
        raise ConfigError(f"unreadable stack file: {exc}") from None
    return replace(cfg, processes=stack_processes(stack))


def check_bind(cfg: DashboardConfig) -> None:
    """Refuse a non-loopback bind without an explicit websocket-origin list."""
    if not is_loopback(cfg.address) and not cfg.allow_websocket_origin:
        raise ConfigError(
            f"refusing to listen on non-loopback address {cfg.address or '*'!r} without "
            f"dashboard.allow_websocket_origin (list the host:port names people will use)"
        )
