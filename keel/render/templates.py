"""Pure rendering: a validated environment -> a list of RenderedFile(path, text).

Nothing here touches the disk (keel/render/writer.py does, atomically). Jinja runs with
StrictUndefined, so a missing value is an error rather than an empty line, and
each target format has exactly one escaping filter per kind of value, defined
here and nowhere else. A value a format cannot carry safely is refused with a
RenderError naming its key path, never written.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from keel.config.model import KeelConfig
from keel.render.resolve import (
    Context,
    process_command,
    process_environment,
    process_file,
    program_name,
    resolve_paths,
    stack_file,
    supervisord_socket,
    unit_name,
)

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "templates"


class RenderError(ValueError):
    """A value that cannot be represented in the target format. `path` is its dotted key path."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


@dataclass(frozen=True)
class RenderedFile:
    """One output file. `path` is relative to the build dir unless absolute (an installed conf.d fragment)."""

    path: str
    text: str
    mode: int = 0o640


# -- supervisord escaping ---------------------------------------------------------------------
# supervisord reads its config with configparser (inline comments start at whitespace + ';' or '#',
# even inside quotes), expands `%(name)s` in command= and environment=, splits command= with
# posix shlex, and splits environment= with NON-posix shlex, stripping quote characters from the
# ends of each value (supervisor/datatypes.py: dict_of_key_value_pairs).

_INLINE_COMMENT = re.compile(r"\s[;#]")


def _check_supervisor_text(value: str, where: str) -> None:
    if any(c in value for c in "\n\r\x00"):
        raise RenderError(where, "supervisord cannot represent a newline, carriage return or NUL byte")
    if _INLINE_COMMENT.search(value):
        raise RenderError(
            where, f"supervisord would read a whitespace followed by ';' or '#' as the start of a comment: {value!r}"
        )


def sv_value(value: Any, where: str = "value") -> str:
    """A plain supervisord option value (paths, names): `%` doubled, unsafe text refused."""
    text = str(value)
    _check_supervisor_text(text, where)
    return text.replace("%", "%%")


def sv_command(argv: list[str], where: str = "command") -> str:
    """command=: posix-shell quoting (supervisord uses shlex.split), then `%` doubled."""
    text = shlex.join(argv)
    _check_supervisor_text(text, where)
    return text.replace("%", "%%")


def sv_environment(env: dict[str, str], where: str = "environment") -> str:
    """environment=KEY="value",... for supervisord's non-posix shlex split.

    Non-posix shlex has no escapes: a value is wrapped in the one quote character it does
    not contain; a value containing both, or starting or ending with a quote, cannot be
    carried (supervisord strips quote characters from both ends).
    """
    items = []
    for key, value in env.items():
        at = f"{where}.{key}"
        _check_supervisor_text(value, at)
        if value and (value[0] in "'\"" or value[-1] in "'\""):
            raise RenderError(at, f"supervisord cannot carry a value that starts or ends with a quote: {value!r}")
        if "'" in value and '"' in value:
            raise RenderError(at, f"supervisord cannot carry a value with both ' and \" in it: {value!r}")
        quote = "'" if '"' in value else '"'
        items.append(f"{key}={quote}{value}{quote}")
    return ",".join(items).replace("%", "%%")


# -- systemd escaping -------------------------------------------------------------------------
# Unit files: `%` starts a specifier everywhere; ExecStart= also expands `$VAR`; quoted words
# take C escapes (systemd.service(5) "Command lines", systemd.syntax(7) "Quoting").


def _check_systemd_text(value: str, where: str) -> None:
    if any(c in value for c in "\n\r\x00"):
        raise RenderError(where, "a systemd unit cannot carry a newline, carriage return or NUL byte")


def _sd_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def sd_value(value: Any, where: str = "value") -> str:
    """A plain unit setting (paths, names): specifiers escaped."""
    text = str(value)
    _check_systemd_text(text, where)
    return text.replace("%", "%%")


def sd_path(value: Any, where: str = "path") -> str:
    """A path in a space-separated list (ReadWritePaths=): quoted when it has spaces."""
    text = sd_value(value, where)
    return _sd_quote(text) if (" " in text or '"' in text or "\\" in text) else text


def sd_command(argv: list[str], where: str = "command") -> str:
    """ExecStart=: every word quoted, `\\` and `"` escaped, `%` -> `%%`, `$` -> `$$`."""
    words = []
    for index, arg in enumerate(argv):
        _check_systemd_text(arg, f"{where}[{index}]")
        if arg == ";":
            raise RenderError(f"{where}[{index}]", "systemd reads a lone ';' as a command separator")
        words.append(_sd_quote(arg).replace("%", "%%").replace("$", "$$"))
    return " ".join(words)


def sd_environment(key: str, value: str, where: str = "environment") -> str:
    """One Environment= assignment, quoted whole; `$` has no meaning there, `%` does."""
    _check_systemd_text(value, f"{where}.{key}")
    return _sd_quote(f"{key}={value}").replace("%", "%%")


# -- the Jinja environment --------------------------------------------------------------------


def jinja_env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters.update(
        sv=sv_value,
        sv_command=sv_command,
        sv_environment=sv_environment,
        sd=sd_value,
        sd_path=sd_path,
        sd_command=sd_command,
    )
    env.globals["sd_environment"] = sd_environment
    return env


# -- what each process looks like to a backend ------------------------------------------------

_AUTORESTART = {"always": "true", "on-failure": "unexpected", "never": "false"}
_SYSTEMD_RESTART = {"always": "always", "on-failure": "on-failure", "never": "no"}


def config_digest(process_json: str) -> str:
    """A short digest of a process's resolved file, carried in its environment.

    supervisorctl update (and systemd's unit diff) restart a program only when its own
    section changed; the digest makes a change in `<name>.json` (a dashboard port, say)
    change exactly that program's section, and nothing else's.
    """
    return hashlib.sha256(process_json.encode("utf-8")).hexdigest()[:16]


def _programs(config: KeelConfig, ctx: Context) -> list[dict[str, Any]]:
    """Per-process values shared by every template, sorted by start priority then name."""
    paths = resolve_paths(config, ctx)
    out = []
    for name, proc in sorted(config.processes.items(), key=lambda item: (item[1].priority, item[0])):
        environment = process_environment(name, proc, paths, ctx)
        environment["KEEL_CONFIG_DIGEST"] = config_digest(json_text(process_file(name, config, ctx).to_json()))
        out.append(
            {
                "name": name,
                "where": f"processes.{name}",
                "program": program_name(config, name),  # [program:...], SyslogIdentifier=
                "unit": unit_name(config, name),  # <unit>.service file name, the target's Wants=
                "proc": proc,
                "command": process_command(name, proc, config, ctx),
                "environment": environment,
                "directory": proc.working_dir or str(ctx.code_dir),
                "log_file": str(Path(paths["log_dir"]) / f"{name}.log"),
                "autorestart": _AUTORESTART[proc.restart.policy],
                "systemd_restart": _SYSTEMD_RESTART[proc.restart.policy],
                "gpu_devices": _gpu_devices(proc),
            }
        )
    return out


def _gpu_devices(proc: Any) -> list[str]:
    """Device nodes a GPU process needs under systemd's DevicePolicy=closed."""
    if proc.kind != "trainer" and proc.kind != "command" or not proc.gpus:
        return []
    common = ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"]
    if isinstance(proc.gpus, list):
        return common + [f"/dev/nvidia{g}" for g in proc.gpus]
    return common + ["char-nvidia-frontend"]  # auto:N picks at start: allow every GPU node


def _context(config: KeelConfig, ctx: Context) -> dict[str, Any]:
    paths = resolve_paths(config, ctx)
    return {
        "header": ctx.header,
        "env": ctx.env,
        "project": config.project,
        "paths": paths,
        "socket": supervisord_socket(config, paths),
        "programs": _programs(config, ctx),
        "build_dir": str(ctx.build_dir),
        "code_dir": str(ctx.code_dir),
    }


def json_text(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=False, ensure_ascii=False) + "\n"


def _render(env: jinja2.Environment, template: str, values: dict[str, Any]) -> str:
    return env.get_template(template).render(**values)


def render(config: KeelConfig, ctx: Context, *, install: bool = True) -> list[RenderedFile]:
    """Every file of one environment, for ctx.backend. `install=False` (--out) keeps all paths relative."""
    env = jinja_env()
    values = _context(config, ctx)
    files = [RenderedFile(f"{name}.json", json_text(process_file(name, config, ctx).to_json())) for name in config.processes]
    files.append(RenderedFile("keel.json", json_text(stack_file(config, ctx).to_json())))
    if ctx.backend == "systemd":
        for program in values["programs"]:
            text = _render(env, "systemd/service.j2", {**values, "p": program})
            files.append(RenderedFile(f"systemd/{program['unit']}", text, 0o644))
        files.append(RenderedFile(f"systemd/{config.project}.target", _render(env, "systemd/target.j2", values), 0o644))
        return files
    if config.supervisord.mode == "standalone":
        files.append(RenderedFile("supervisord.conf", _render(env, "supervisord/standalone.conf.j2", values)))
        if install:
            # beside build/: the checkout's root, so bare `supervisord`/`supervisorctl` there find it
            root_conf = ctx.build_dir.parent.parent / "supervisord.conf"
            files.append(RenderedFile(str(root_conf), _render(env, "supervisord/root.conf.j2", values)))
        return files
    fragment = _render(env, "supervisord/include.conf.j2", values)
    files.append(RenderedFile(f"{config.project}.conf", fragment))
    if install and config.supervisord.install:
        files.append(RenderedFile(str(Path(config.supervisord.conf_dir) / f"{config.project}.conf"), fragment, 0o644))
    return files
