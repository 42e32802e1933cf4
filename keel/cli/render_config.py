"""`bin/render-config`: validate an environment and render its supervisord or systemd files.

    bin/render-config dev                                  # write build/dev/ (and ./supervisord.conf)
    bin/render-config prod --backend systemd --out /tmp/units
    bin/render-config staging --check                      # validate and render in memory; exit 0 or 2
    bin/render-config prod --diff                          # what would change on disk
    bin/render-config dev --set processes.dashboard.port=5010

Exit codes: 0 ok (with --diff: 0 also when there are changes), 2 bad config or arguments,
1 an output could not be written. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from keel.config.load import ConfigError, LoadedConfig, display_path, load_config

CODE_DIR = Path(__file__).resolve().parents[2]


def build_root() -> Path:
    """Where build/<env>/ lives: the checkout's build/, or $KEEL_BUILD_ROOT (tests, read-only checkouts)."""
    return Path(os.environ.get("KEEL_BUILD_ROOT") or CODE_DIR / "build").resolve()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="render-config",
        description="Validate configs/base.yaml + configs/<env>.yaml and render the files that run the stack.",
        epilog="Errors name the file, line and key: configs/prod.yaml:14: processes.trainer.stop.timeout: ...",
    )
    parser.add_argument("env", help="environment name: any <env>.yaml beside base.yaml in the config dir")
    parser.add_argument(
        "--backend", choices=("supervisord", "systemd"), help="render for this backend instead of the config's `backend`"
    )
    parser.add_argument("--out", type=Path, help="write everything into this directory (default: build/<env>/); installs nothing")
    parser.add_argument("--config-dir", type=Path, default=None, help="where base.yaml and <env>.yaml live (default: configs/)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
        help="override one key; VALUE is YAML (e.g. processes.trainer.gpus=[0,1]); repeatable",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="validate and render in memory; write nothing")
    mode.add_argument("--diff", action="store_true", help="print a unified diff of what would change; write nothing")
    parser.add_argument("--no-reload", action="store_true", help="include mode: do not ask the host supervisord to reread/update")
    parser.add_argument("--no-mkdirs", action="store_true", help="do not create the run, log, checkpoint and tmp dirs")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    return parser


def _config_dir(args: argparse.Namespace) -> Path:
    """--config-dir, else the checkout's own configs/ (not the working directory's: running
    /srv/keel/current/bin/render-config from elsewhere must not pick up a stray configs/)."""
    return args.config_dir if args.config_dir is not None else CODE_DIR / "configs"


def _sources(loaded: LoadedConfig) -> tuple[str, ...]:
    """File names for the header, stable wherever the command runs from."""
    out = []
    for path in loaded.files:
        resolved = path.resolve()
        try:
            out.append(str(resolved.relative_to(CODE_DIR)))
        except ValueError:
            out.append(str(resolved))
    return tuple(out)


def make_dirs(stack: dict, names: list[str]) -> None:
    """The dirs supervisord and the processes need before they start (0750: status files are not public)."""
    paths = stack["paths"]
    wanted = [paths["run_dir"], paths["log_dir"], paths["checkpoint_dir"]]
    wanted += [os.path.join(paths["run_dir"], "tmp", name) for name in names]
    for directory in wanted:
        os.makedirs(directory, mode=0o750, exist_ok=True)


def reload_supervisord(socket: str, programs: list[str]) -> str:
    """include mode: ask the host supervisord to reread and update (only changed programs restart)."""
    if not os.path.exists(socket):
        return f"supervisord at {socket} not running: start it, then `supervisorctl update`"
    for args in (["reread"], ["update", *programs]):
        done = supervisorctl(socket, *args, timeout=60)
        if done.returncode != 0:
            return f"supervisorctl {' '.join(args)} failed: {(done.stdout + done.stderr).strip()}"
    return f"supervisord at {socket}: reread and updated {', '.join(programs)} (only changed programs restart)"


def render_environment(
    env: str,
    config_dir: Path | None = None,
    overrides: list[str] = (),
    backend: str | None = None,
    out: Path | None = None,
):
    """Validate and render one environment in memory: (loaded config, context, files, build dir).

    The one render path for bin/render-config, bin/launch and bin/doctor. Raises ConfigError
    (with file:line) for a bad config and for a value the target format cannot carry.
    """
    # Imported here: loading and validating must stay fast and light for --check.
    from keel.render.templates import RenderError, render
    from keel.render.resolve import Context

    overrides = list(overrides) + ([f"backend={backend}"] if backend else [])
    loaded = load_config(env, _config_dir(argparse.Namespace(config_dir=config_dir)), overrides)
    build_dir = (out or build_root() / env).resolve()
    ctx = Context(env=env, code_dir=CODE_DIR, build_dir=build_dir, sources=_sources(loaded), backend=loaded.config.backend)
    try:
        files = render(loaded.config, ctx, install=out is None)
    except RenderError as exc:
        raise ConfigError(f"{loaded.locate(exc.path)}: {exc}") from None
    return loaded, ctx, files, build_dir


def stack_of(files) -> dict:
    """keel.json among the rendered files, parsed."""
    return json.loads(next(f.text for f in files if f.path == "keel.json"))


def supervisorctl(socket: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the venv's supervisorctl against a unix socket."""
    ctl = shutil.which("supervisorctl", path=os.path.dirname(sys.executable)) or shutil.which("supervisorctl") or "supervisorctl"
    return subprocess.run([ctl, "-s", f"unix://{socket}", *args], capture_output=True, text=True, timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        loaded, ctx, files, build_dir = render_environment(
            args.env, args.config_dir, args.overrides, args.backend, args.out)
    except ConfigError as exc:
        print(f"render-config: {exc}", file=sys.stderr)
        return 2

    from keel.render.writer import diff_files, write_files

    config = loaded.config
    backend = ctx.backend

    if args.check:
        if not args.quiet:
            print(f"{args.env}: valid ({len(config.processes)} processes, {backend}, {len(files)} files rendered, nothing written)")
        return 0
    if args.diff:
        sys.stdout.write(diff_files(files, build_dir))
        return 0
    try:
        results = write_files(files, build_dir)
        stack = stack_of(files)
        if args.out is None and not args.no_mkdirs:
            make_dirs(stack, list(config.processes))
    except OSError as exc:
        print(f"render-config: {exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        changed = [r for r in results if r.changed]
        print(f"{args.env}: {backend} ({config.supervisord.mode if backend == 'supervisord' else 'units'}), "
              f"processes: {', '.join(config.processes)}")
        print(f"wrote {len(changed)} of {len(results)} files into {display_path(build_dir)}"
              + (" (the rest unchanged)" if len(changed) < len(results) else ""))
        for result in results:
            print(f"  {'changed ' if result.changed else 'same    '} {display_path(result.path)}")
    if (backend == "supervisord" and config.supervisord.mode == "include" and args.out is None
            and config.supervisord.reload and not args.no_reload):
        message = reload_supervisord(stack["control"]["socket"], [p["program"] for p in stack["processes"].values()])
        if not args.quiet:
            print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
