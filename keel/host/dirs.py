"""A process's directories: its TMPDIR, and the run, log and checkpoint dirs it writes to.

``prepare_process_dirs(resolved)`` creates them with mode 0750 whatever the umask.
When running as root and the process has a ``user:``, the process's own tmp_dir
(and every directory created here for it) belongs to that user and its primary
group; directories that already existed (the run, log and checkpoint dirs are
shared by the stack) keep their owner. Not root: nothing is chowned, the
directories belong to whoever runs (under supervisord or systemd with ``user=``,
that already is the process's user).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keel.render.contract import ProcessFile

__all__ = ["DIR_MODE", "ProcessDirError", "prepare_process_dirs"]

DIR_MODE = 0o750

# The stack's shared dirs, created first: tmp_dir normally lives under run_dir.
_SHARED_DIRS = ("run_dir", "log_dir", "checkpoint_dir")


class ProcessDirError(OSError):
    """A process directory cannot be prepared (an unknown ``user:``, a tmp_dir that is not a directory)."""


def _owner(user: str | None) -> tuple[int, int] | None:
    """(uid, primary gid) to give the process's dirs to, or None when nothing is to be chowned."""
    if not user or os.geteuid() != 0:
        return None
    import pwd  # only needed as root; keeps import light for the usual unprivileged process

    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ProcessDirError(f"user {user!r} does not exist on this host (the process's `user:`)") from None
    return entry.pw_uid, entry.pw_gid


def _make_dirs(path: Path, owner: tuple[int, int] | None) -> bool:
    """Create ``path`` and its missing parents, each 0750 and given to ``owner``. True when ``path`` was created."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    made = False
    for d in reversed(missing):
        try:
            d.mkdir(mode=DIR_MODE)
        except FileExistsError:
            made = False
            continue  # another process of the stack made it just now: it is theirs
        made = True
        # mkdir's mode is filtered by the umask; set it explicitly so a 0077 or 0022 umask gives the same result.
        os.chmod(d, DIR_MODE)
        if owner is not None:
            os.chown(d, *owner, follow_symlinks=False)
    return made


def _ensure_dir(path: Path, owner: tuple[int, int] | None, *, own_existing: bool) -> None:
    created = _make_dirs(path, owner)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        # A symlink planted here must not make root chown (or the process write) somewhere else.
        raise ProcessDirError(f"{path} exists and is not a directory")
    if created:
        return
    if st.st_uid == os.geteuid():
        os.chmod(path, DIR_MODE)
    if own_existing and owner is not None and (st.st_uid, st.st_gid) != owner:
        os.chown(path, *owner, follow_symlinks=False)
        os.chmod(path, DIR_MODE)


def prepare_process_dirs(resolved: Mapping[str, Any] | ProcessFile) -> None:
    """Create a process's run_dir, log_dir, checkpoint_dir and tmp_dir, mode 0750; idempotent.

    ``resolved`` is the resolved per-process file, as the JSON mapping or the typed
    ``keel.render.contract.ProcessFile``; it reads ``user`` (a user name or None) and
    ``paths.run_dir``, ``paths.log_dir``, ``paths.checkpoint_dir``, ``paths.tmp_dir``.
    Raises ProcessDirError naming the user when running as root and the user does not exist.
    """
    if isinstance(resolved, Mapping):
        user, paths = resolved["user"], dict(resolved["paths"])
    else:
        user, paths = resolved.user, resolved.paths.model_dump()
    owner = _owner(user)
    for key in _SHARED_DIRS:
        if paths.get(key):
            _ensure_dir(Path(paths[key]), owner, own_existing=False)
    if paths.get("tmp_dir"):
        _ensure_dir(Path(paths["tmp_dir"]), owner, own_existing=True)
