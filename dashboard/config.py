"""The dashboard's settings, read from its resolved file (build/<env>/dashboard.json).

Pure parsing: a dict in, a frozen ``DashboardConfig`` out, or a ``ConfigError``
that names the key. The stack file (keel.json) is optional at run time: without
it the process table lists whatever status files the run dir holds.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from keel.config.netaddr import is_loopback


class ConfigError(ValueError):
    """The resolved file is unusable; the message names the file and key."""


@dataclass(frozen=True)
class AuthConfig:
    required: bool = False
    username: str = "keel"
    password_hash: str | None = None
    password_file: str | None = None


@dataclass(frozen=True)
class ProcessInfo:
    """What the dashboard needs of one process in keel.json."""

    name: str
    kind: str
    status_names: tuple[str, ...]
    log_file: str | None
    heartbeat_timeout: float | None
    progress_timeout: float | None
    startup_grace: float | None


@dataclass(frozen=True)
class DashboardConfig:
    project: str
    environment: str
    name: str
    run_dir: str
    log_dir: str | None
    address: str
    port: int
    allow_websocket_origin: tuple[str, ...]
    refresh: float
    history_points: int
    log_tail_lines: int
    keep_alive: float
    unused_session_lifetime: float
    auth: AuthConfig
    stack: str | None
    heartbeat_interval: float = 2.0
    durability: str = "none"
    log_format: str = "auto"
    log_level: str = "INFO"
    processes: tuple[ProcessInfo, ...] = field(default_factory=tuple)

    @property
    def read_timeout(self) -> float:
        """How long one blocking read may take before it is reported as hung."""
        return max(1.0, 2.0 * self.refresh)


def _get(d: dict, key: str, typ: type | tuple[type, ...], where: str, default: Any = ...) -> Any:
    if key not in d or d[key] is None:
        if default is ...:
            raise ConfigError(f"{where}.{key}: missing")
        return default
    value = d[key]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, typ) or isinstance(value, bool) and typ is not bool:
        raise ConfigError(f"{where}.{key}: expected {getattr(typ, '__name__', typ)}, got {value!r}")
    return value


def parse_stack(stack: dict) -> tuple[ProcessInfo, ...]:
    """The processes of keel.json, in file order."""
    procs = []
    for name, p in (stack.get("processes") or {}).items():
        if not isinstance(p, dict):
            raise ConfigError(f"processes.{name}: expected an object")
        health = p.get("health") or {}
        procs.append(
            ProcessInfo(
                name=name,
                kind=str(p.get("kind", "command")),
                status_names=tuple(p.get("status_names") or [name]),
                log_file=p.get("log_file"),
                heartbeat_timeout=health.get("heartbeat_timeout"),
                progress_timeout=health.get("progress_timeout"),
                startup_grace=health.get("startup_grace"),
            )
        )
    return tuple(procs)


def parse_config(raw: dict, *, where: str = "dashboard.json") -> DashboardConfig:
    """Validate a resolved dashboard file; raises ConfigError naming the key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    paths = _get(raw, "paths", dict, where)
    d = _get(raw, "dashboard", dict, where)
    dw = f"{where}: dashboard"
    a = _get(d, "auth", dict, dw, {})
    auth = AuthConfig(
        required=_get(a, "required", bool, f"{dw}.auth", False),
        username=_get(a, "username", str, f"{dw}.auth", "keel"),
        password_hash=_get(a, "password_hash", str, f"{dw}.auth", None),
        password_file=_get(a, "password_file", str, f"{dw}.auth", None),
    )
    # internals.md names it allow_websocket_origin; the config model calls it allow_origins
    origins = d.get("allow_websocket_origin", d.get("allow_origins")) or []
    if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
        raise ConfigError(f"{dw}.allow_websocket_origin: expected a list of host:port strings")
    log = raw.get("log") or {}
    cfg = DashboardConfig(
        project=_get(raw, "project", str, where, "keel"),
        environment=_get(raw, "environment", str, where, "dev"),
        name=_get(raw, "name", str, where, "dashboard"),
        run_dir=_get(paths, "run_dir", str, f"{where}: paths"),
        log_dir=_get(paths, "log_dir", str, f"{where}: paths", None),
        address=_get(d, "address", str, dw, "127.0.0.1"),
        port=_get(d, "port", int, dw, 5006),
        allow_websocket_origin=tuple(origins),
        refresh=_get(d, "refresh", float, dw, 1.0),
        history_points=_get(d, "history_points", int, dw, 2000),
        log_tail_lines=_get(d, "log_tail_lines", int, dw, 40),
        keep_alive=_get(d, "keep_alive", float, dw, 37.0),
        unused_session_lifetime=_get(d, "unused_session_lifetime", float, dw, 15.0),
        auth=auth,
        stack=_get(d, "stack", str, dw, None),
        heartbeat_interval=_get(raw, "heartbeat_interval", float, where, 2.0),
        durability=_get(raw, "durability", str, where, "none"),
        log_format=str(log.get("format", "auto")),
        log_level=str(log.get("level", "INFO")),
    )
    if cfg.refresh <= 0:
        raise ConfigError(f"{dw}.refresh: must be > 0, got {cfg.refresh}")
    if cfg.history_points < 10:
        raise ConfigError(f"{dw}.history_points: must be >= 10, got {cfg.history_points}")
    if not 0 <= cfg.port <= 65535:
        raise ConfigError(f"{dw}.port: out of range: {cfg.port}")
    if cfg.auth.required and not (cfg.auth.password_hash or cfg.auth.password_file):
        raise ConfigError(f"{dw}.auth: required needs password_hash or password_file (there is no default password)")
    return cfg


def load_config(path: str | os.PathLike) -> DashboardConfig:
    """Read and validate the resolved file, and the stack file it names when that exists."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{p}: not JSON: {exc}") from None
    cfg = parse_config(raw, where=str(p))
    if cfg.stack:
        try:
            stack = json.loads(Path(cfg.stack).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cfg  # shown on the page as "no stack file"; the run dir is still read
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{cfg.stack}: unreadable stack file: {exc}") from None
        cfg = replace(cfg, processes=parse_stack(stack))
    return cfg


def check_bind(cfg: DashboardConfig) -> None:
    """Refuse a non-loopback bind without an explicit websocket-origin list."""
    if not is_loopback(cfg.address) and not cfg.allow_websocket_origin:
        raise ConfigError(
            f"refusing to listen on non-loopback address {cfg.address or '*'!r} without "
            f"dashboard.allow_websocket_origin (list the host:port names people will use)"
        )
