"""Load an environment: base.yaml, overlaid by <env>.yaml, then `--set` overrides, validated.

Maps merge key by key; lists and scalars replace. Every error is a `ConfigError`
whose text is one line naming the file and line of the offending key and its
dotted path, e.g.::

    configs/prod.yaml:14: processes.trainer.stop.timeout: expected a duration like 90s, got "soon"

Line numbers come from the YAML node tree (yaml.compose), so they point at the key
the user wrote, in the file that last set it.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from keel.config.model import KINDS, NAME_PATTERN, KeelConfig

PathKey = tuple[str | int, ...]


class KeelYamlLoader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1's base-60 numbers.

    YAML 1.1 reads an unquoted `nnodes: 1:4` (an elastic range) as 64 and `12:30` as 750:
    a value the user wrote would be silently turned into another. Here such a scalar stays
    the string it looks like, and the model accepts or refuses it with file:line.
    """


KeelYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
# The same int/float patterns as PyYAML's resolver.py, less the sexagesimal alternatives.
KeelYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"""^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$""", re.X),
    list("-+0123456789"),
)
KeelYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9_]+(?:[eE][-+][0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """One YAML document as data, with keel's loader (see KeelYamlLoader)."""
    return yaml.load(text, Loader=KeelYamlLoader)  # noqa: S506 - a SafeLoader subclass


class ConfigError(ValueError):
    """A bad configuration: the message is the one line a user sees."""


@dataclass(frozen=True)
class Source:
    """Where a key was set: a file and line, or a --set argument."""

    label: str
    line: int | None = None

    def __str__(self) -> str:
        return f"{self.label}:{self.line}" if self.line is not None else self.label


@dataclass
class LoadedConfig:
    """A validated environment and where it came from."""

    env: str
    config: KeelConfig
    files: list[Path]
    config_dir: Path
    raw: dict[str, Any] = field(repr=False, default_factory=dict)
    marks: dict[PathKey, Source] = field(repr=False, default_factory=dict)

    def locate(self, dotted_path: str) -> Source:
        """Where a dotted key path (`processes.trainer.command[2]`) was set."""
        parts: list[str | int] = []
        for piece in dotted_path.replace("[", ".[").split("."):
            if piece.startswith("[") and piece.endswith("]") and piece[1:-1].isdigit():
                parts.append(int(piece[1:-1]))
            elif piece:
                parts.append(piece)
        return _locate(tuple(parts), self.marks)


def display_path(path: Path) -> str:
    """Paths in messages are relative to the working directory when they are under it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def dotted(path: PathKey) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def known_environments(config_dir: Path) -> list[str]:
    """Every <name>.yaml beside base.yaml is an environment."""
    return sorted(p.stem for p in config_dir.glob("*.yaml") if p.stem != "base" and not p.name.startswith("."))


# -- YAML with line numbers -------------------------------------------------------------------


def _walk_marks(node: yaml.Node, path: PathKey, label: str, marks: dict[PathKey, Source]) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                raise ConfigError(f"{label}:{key_node.start_mark.line + 1}: {dotted(path + (key,))}: duplicate key")
            seen.add(key)
            marks[path + (key,)] = Source(label, key_node.start_mark.line + 1)
            _walk_marks(value_node, path + (key,), label, marks)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            marks[path + (index,)] = Source(label, item.start_mark.line + 1)
            _walk_marks(item, path + (index,), label, marks)


def load_yaml_file(path: Path) -> tuple[dict[str, Any], dict[PathKey, Source]]:
    """Parse one YAML file into (data, key path -> source line). Errors name the file and line."""
    label = display_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{label}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{label}: cannot read: {exc}") from None
    try:
        node = yaml.compose(text, Loader=KeelYamlLoader)
        data = parse_yaml(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark else ""
        problem = " ".join(str(exc.problem or exc.context or "malformed YAML").split())
        raise ConfigError(f"{label}{line}: malformed YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{label}: malformed YAML: {' '.join(str(exc).split())}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{label}:1: the top level must be a mapping of keys, got {type(data).__name__}")
    marks: dict[PathKey, Source] = {(): Source(label, 1)}
    _walk_marks(node, (), label, marks)
    return data, marks


# -- merging and overrides --------------------------------------------------------------------


def deep_merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """Maps merge key by key; anything else in the overlay (lists, scalars, null) replaces."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> tuple[list[str], Any]:
    """`processes.trainer.gpus=[0,1]` -> (['processes', 'trainer', 'gpus'], [0, 1]). Values are YAML-typed."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text}: expected KEY.PATH=VALUE")
    parts = key.strip().split(".")
    if any(not p for p in parts):
        raise ConfigError(f"--set {text}: empty key in {key!r}")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text}: value is not valid YAML: {' '.join(str(exc).split())}") from None
    return parts, value


def apply_override(data: dict[str, Any], parts: list[str], value: Any, text: str) -> None:
    """Set one key, creating missing sections; the model then rejects keys that do not exist.

    A process must already exist: `--set processes.trainr.gpus=[]` is a typo, not a new process.
    """
    if parts[0] == "processes" and len(parts) > 2 and parts[1] not in (data.get("processes") or {}):
        known = sorted(data.get("processes") or {})
        raise ConfigError(f"--set {text}: processes.{parts[1]}: no such process{_did_you_mean(parts[1], known)}")
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {text}: {'.'.join(parts[: depth + 1])} is not a mapping")
        node = child
    node[parts[-1]] = value


def _inner_model(name: str, annotation: Any) -> Any:
    """The model a field leads to: a BaseModel, 'process' for the processes map, else None."""
    if name == "processes":
        return "process"
    for arg in get_args(annotation) or (annotation,):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# -- validation errors -> one line ------------------------------------------------------------


def _strip_union_tags(loc: tuple[Any, ...]) -> PathKey:
    """Pydantic puts the discriminator tag into the location (processes.trainer.trainer.port); drop it."""
    loc = tuple(loc)
    if len(loc) >= 3 and loc[0] == "processes" and loc[2] in KINDS:
        loc = loc[:2] + loc[3:]
    # typed unions add the member type's name, e.g. gpus.list[int] or gpus.str; drop those too
    return tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or "(" in p or p in {"str", "float", "int", "bool"})))


def _locate(path: PathKey, marks: dict[PathKey, Source]) -> Source:
    """The source of a key: its own mark, else a key set under it (a --set), else its nearest parent's."""
    if path in marks:
        return marks[path]
    for key, source in marks.items():
        if key[: len(path)] == path and len(key) > len(path):
            return source
    for cut in range(len(path), -1, -1):
        source = marks.get(path[:cut])
        if source is not None:
            return source
    return Source("config")


def _message(error: dict[str, Any], data: dict[str, Any], path: PathKey) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        options = _allowed_keys(path[:-1], data)
        return f"unknown key{_did_you_mean(str(path[-1]), options)}"
    if kind == "missing":
        return "required key is missing"
    if kind == "union_tag_not_found" or kind == "union_tag_invalid":
        return f"kind must be one of {', '.join(KINDS)}"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"expected one of {expected}, got {error.get('input')!r}"
    if kind == "string_pattern_mismatch":
        return f"{error.get('input')!r} must match {error.get('ctx', {}).get('pattern', '')}"
    message = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            message = message[len(prefix) :]
    return message


def _allowed_keys(parent: PathKey, data: dict[str, Any]) -> list[str]:
    from keel.config.model import CommandProcess, DashboardProcess, TrainerProcess, WatchdogProcess

    by_kind = {"trainer": TrainerProcess, "dashboard": DashboardProcess, "watchdog": WatchdogProcess, "command": CommandProcess}
    model: Any = KeelConfig
    node: Any = data
    for part in parent:
        node = node.get(part) if isinstance(node, dict) else None
        if model == "process":
            model = by_kind.get(node.get("kind") if isinstance(node, dict) else None)
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return []
        model = _inner_model(part, model.model_fields[part].annotation)
    if model == "process":
        return []
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def format_validation_error(exc: ValidationError, data: dict[str, Any], marks: dict[PathKey, Source]) -> str:
    """The first error as one line: `file:line: key.path: message` (more errors are counted)."""
    errors = exc.errors()
    first = errors[0]
    path = _strip_union_tags(first["loc"])
    if first["type"] in ("union_tag_not_found", "union_tag_invalid"):
        path = path + ("kind",)
    field = getattr(first.get("ctx", {}).get("error"), "field", None)
    if field is not None:
        path = path + (field,)
    line = f"{_locate(path, marks)}: {dotted(path)}: {_message(first, data, path)}"
    if len(errors) > 1:
        line += f" (and {len(errors) - 1} more)"
    return line


# -- cross-field checks -----------------------------------------------------------------------


def cross_field_errors(config: KeelConfig) -> list[tuple[PathKey, str]]:
    """Checks that span processes: names, GPU and port conflicts, GPUs on the wrong kinds, backend needs."""
    import re

    from keel.config.netaddr import is_loopback

    errors: list[tuple[PathKey, str]] = []
    gpu_owner: dict[int, str] = {}
    port_owner: dict[int, str] = {}
    for name, proc in config.processes.items():
        base: PathKey = ("processes", name)
        if not re.match(NAME_PATTERN, name) or len(name) > 40:
            errors.append((base, f"process name {name!r} must match [a-z][a-z0-9_-]* (at most 40 characters)"))
            continue
        if proc.kind in ("dashboard", "watchdog") and proc.gpus:
            errors.append((base + ("gpus",), f"a {proc.kind} never gets GPUs (it must not touch CUDA)"))
        if isinstance(proc.gpus, list):
            for index, gpu in enumerate(proc.gpus):
                if gpu in gpu_owner:
                    errors.append((base + ("gpus", index), f"GPU {gpu} is already given to processes.{gpu_owner[gpu]}"))
                gpu_owner.setdefault(gpu, name)
        elif isinstance(proc.gpus, str) and proc.gpu_auto_count() > 64:
            errors.append((base + ("gpus",), f"auto:{proc.gpu_auto_count()} asks for more GPUs than a host has (at most 64)"))
        port = getattr(proc, "port", None)
        if port is not None:
            if port in port_owner:
                errors.append((base + ("port",), f"port {port} is already used by processes.{port_owner[port]}"))
            port_owner.setdefault(port, name)
        if proc.kind == "trainer" and proc.launcher == "torchrun" and isinstance(proc.gpus, str):
            errors.append((base + ("gpus",), "torchrun needs an explicit GPU list (with auto:N every rank would pick its own GPUs)"))
        if proc.kind == "dashboard" and proc.allow_origins is None and not is_loopback(proc.address):
            errors.append((base + ("address",), f"{proc.address} is not loopback: list the allowed origins in allow_origins (host:port)"))
        if proc.limits.gpu_memory is not None and not proc.gpus:
            errors.append((base + ("limits", "gpu_memory"), "gpu_memory is set but the process has no GPUs"))
        if config.backend == "systemd":
            if proc.command and not os.path.isabs(proc.command[0]):
                errors.append((base + ("command",), f"systemd needs an absolute path for the program, got {proc.command[0]!r}"))
            if proc.working_dir and not os.path.isabs(proc.working_dir):
                errors.append((base + ("working_dir",), "systemd needs an absolute working_dir"))
    if config.python is not None and not os.path.isabs(config.python):
        errors.append((("python",), f"python must be an absolute path, got {config.python!r}"))
    return errors


# -- entry point ------------------------------------------------------------------------------


def load_config(env: str, config_dir: Path | str = "configs", overrides: list[str] = ()) -> LoadedConfig:
    """Load, merge, override and validate one environment. Raises ConfigError with one line."""
    config_dir = Path(config_dir)
    base_path = config_dir / "base.yaml"
    if not base_path.is_file():
        raise ConfigError(f"{display_path(base_path)}: no such file (is {display_path(config_dir)} a keel config dir?)")
    if env == "base" or not env or "/" in env or env.startswith("."):
        raise ConfigError(f"{env!r} is not an environment name; known: {', '.join(known_environments(config_dir))}")
    env_path = config_dir / f"{env}.yaml"
    if not env_path.is_file():
        known = known_environments(config_dir)
        raise ConfigError(
            f"unknown environment {env!r} (no {display_path(env_path)}); known: {', '.join(known) or 'none'}"
        )
    base, base_marks = load_yaml_file(base_path)
    overlay, env_marks = load_yaml_file(env_path)
    data = deep_merge(base, overlay)
    marks = {**base_marks, **env_marks}
    for text in overrides:
        parts, value = parse_override(text)
        apply_override(data, parts, value, text)
        key: PathKey = tuple(parts)
        for stale in [k for k in marks if k[: len(key)] == key]:
            del marks[stale]
        marks[key] = Source(f"--set {text}")
    try:
        config = KeelConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, data, marks)) from None
    problems = cross_field_errors(config)
    if problems:
        path, message = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigError(f"{_locate(path, marks)}: {dotted(path)}: {message}{more}")
    return LoadedConfig(env=env, config=config, files=[base_path, env_path], config_dir=config_dir, raw=data, marks=marks)
