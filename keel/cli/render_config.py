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
import sys
from pathlib import Path

from keel.config.load import ConfigError, display_path
from keel.render.contract import StackFile
from keel.stack.paths import make_dirs
from keel.stack.rendering import render_environment, stack_of


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


def apply_include_mode(stack: StackFile) -> str:
    """include mode: ask the host supervisord to reread and update our programs (only changed ones restart)."""
    from keel.control.base import BackendUnavailable, ControlError
    from keel.control.factory import backend_for

    socket = stack.control.socket
    try:
        changes = backend_for(stack).apply()
    except BackendUnavailable:
        return f"supervisord at {socket} not running: start it, then `bin/launch apply {stack.environment}`"
    except ControlError as exc:
        return f"supervisord at {socket}: applying the config failed: {exc}"
    return (f"supervisord at {socket}: reread and updated ({'; '.join(changes) if changes else 'nothing changed'}; "
            "only changed programs restart)")


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
        message = apply_include_mode(stack)
        if not args.quiet:
            print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
