"""Put rendered files on disk: atomically, and only when their text changed.

An unchanged file keeps its inode and mtime, so `supervisorctl update` and
systemd's daemon-reload see no change for a process whose settings did not move.
A changed file is written to a temp file in the same directory and renamed over
the old one (os.replace), so a reader sees the old file or the new one, never a
mix, and a failure leaves the old file as it was.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

from keel.fs.atomic import atomic_write_text
from keel.render.templates import RenderedFile


class OutputError(OSError):
    """An output file could not be written; carries the path."""


@dataclass(frozen=True)
class WriteResult:
    path: Path
    changed: bool


def target_path(file: RenderedFile, out_dir: Path) -> Path:
    path = Path(file.path)
    return path if path.is_absolute() else out_dir / path


def _current_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return None  # unreadable or not ours: it will be replaced


def check_writable(files: list[RenderedFile], out_dir: Path) -> None:
    """Fail before writing anything when an output directory cannot be created or written."""
    for file in files:
        directory = target_path(file, out_dir).parent
        probe = directory
        while not probe.exists():
            probe = probe.parent
        if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK) or _read_only_fs(probe):
            raise OutputError(f"{directory}: cannot write here (read-only or no permission)")


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def write_files(files: list[RenderedFile], out_dir: Path) -> list[WriteResult]:
    """Write every file that changed. Checks all directories first so a bad one writes nothing."""
    check_writable(files, out_dir)
    results = []
    for file in files:
        path = target_path(file, out_dir)
        if _current_text(path) == file.text:
            results.append(WriteResult(path, False))
            continue
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, file.text, file.mode)
        except OSError as exc:
            raise OutputError(f"{path}: cannot write: {exc.strerror or exc}") from None
        results.append(WriteResult(path, True))
    return results


def diff_files(files: list[RenderedFile], out_dir: Path) -> str:
    """A unified diff of what write_files would change (empty when nothing would)."""
    chunks = []
    for file in files:
        path = target_path(file, out_dir)
        old = _current_text(path)
        if old == file.text:
            continue
        chunks.extend(
            difflib.unified_diff(
                (old or "").splitlines(keepends=True),
                file.text.splitlines(keepends=True),
                fromfile=str(path) if old is not None else "/dev/null",
                tofile=str(path),
            )
        )
    return "".join(chunks)
