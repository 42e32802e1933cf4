#!/usr/bin/env python3
"""Pack a keel checkout into a reproducible release archive on the Ansible controller.

    keel_pack.py SOURCE OUT_DIR [--exclude PATTERN ...] [--keep N]

Writes OUT_DIR/keel-<sha256[:16]>.tar.gz (sorted names, mtime 0, owner 0, gzip without a
timestamp), so the same tree always gives the same bytes and the same checksum: the
archive step is idempotent, and a release's marker can say exactly what it was built from.
Prints one JSON object: archive, sha256, changed (a new archive was written) and version
(`git describe --tags --always`, plus "-dirty-<sha8>" for a modified tree, or
"src-<sha12>" when SOURCE is not a git checkout).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def describe(source: Path, digest: str) -> str:
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True, check=False)

    try:
        top = git("rev-parse", "--show-toplevel")
    except FileNotFoundError:
        return f"src-{digest[:12]}"
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != source.resolve():
        return f"src-{digest[:12]}"
    described = git("describe", "--tags", "--always")
    status = git("status", "--porcelain", "--untracked-files=normal")
    version = described.stdout.strip() or f"src-{digest[:12]}"
    if status.stdout.strip():
        version += f"-dirty-{digest[:8]}"
    return version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--exclude", action="append", default=[])
    parser.add_argument("--keep", type=int, default=5, help="archives kept in OUT_DIR (newest first)")
    args = parser.parse_args(argv)

    source = args.source.resolve()
    if not (source / "bin" / "render-config").is_file():
        print(f"keel_pack: {source} is not a keel checkout (no bin/render-config)", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    tar = ["tar", "--sort=name", "--mtime=@0", "--owner=0", "--group=0", "--numeric-owner", "--format=gnu"]
    tar += [f"--exclude={pattern}" for pattern in args.exclude]
    tar += ["-C", str(source), "-cf", "-", "."]
    fd, tmp = tempfile.mkstemp(prefix=".keel-", suffix=".tar.gz", dir=args.out_dir)
    try:
        with os.fdopen(fd, "wb") as out:
            packer = subprocess.Popen(tar, stdout=subprocess.PIPE)
            zipper = subprocess.run(["gzip", "-n", "-6"], stdin=packer.stdout, stdout=out, check=False)
            packer.stdout.close()
            if packer.wait() != 0 or zipper.returncode != 0:
                print(f"keel_pack: tar/gzip of {source} failed", file=sys.stderr)
                return 1
        digest = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
        final = args.out_dir / f"keel-{digest[:16]}.tar.gz"
        changed = not final.exists()
        if changed:
            os.replace(tmp, final)
        else:
            os.unlink(tmp)
            os.utime(final)  # newest first when pruning
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    archives = sorted(args.out_dir.glob("keel-*.tar.gz"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in archives[max(args.keep, 1):]:
        if old != final:
            old.unlink()
    print(json.dumps({"archive": str(final), "sha256": digest, "changed": changed, "version": describe(source, digest)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
