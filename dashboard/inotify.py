"""The run dir's changes from the kernel (inotify), read on the event loop: an unchanged run dir costs nothing.

The stat poll (dashboard.watcher.RunDirWatcher) woke a thread 20 times a second: 0.63 % of a core on an
idle dashboard, measured per thread, nearly all of it the wake-ups (a bare 20 Hz thread wake cost 0.3 %
here; the stats 17 µs a poll). An inotify descriptor on the event loop (``loop.add_reader``) wakes it only
when a file changed, and a write is seen when it lands instead of up to one poll period later.

What counts as a change is what the poll stamps: an entry of the run dir created, removed, renamed into
place (a status snapshot), written (a metrics or events log grown) or touched, and an entry coming or
going inside one of its subdirectories (the subdirectory's mtime: the runs archive, the incidents). Write
temps, lock files and the dashboard's own status file are not (the same ``ignored`` rule as the poll).

A run dir on a network filesystem gets no inotify event for a write made by another host (a torchrun
node writing its status to a shared dir): there the poll stays, as GNU ``tail -f`` does (coreutils'
remote-filesystem list). So does a run dir inotify cannot watch (no inotify, out of watches).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Callable

from inotify_simple import INotify, flags

# statfs f_type of the filesystems where other hosts write (linux/magic.h, coreutils' stat.c "remote")
REMOTE_FS = {
    0x6969: "nfs", 0x517B: "smb", 0xFF534D42: "cifs", 0xFE534D42: "smb2", 0x65735546: "fuse",
    0x00C36400: "ceph", 0x5346414F: "afs", 0x6B414653: "kafs", 0x0BD00BD0: "lustre", 0x01021997: "9p",
    0x01161970: "gfs2", 0x7461636F: "ocfs2", 0x47504653: "gpfs", 0x73757245: "coda", 0x786F4256: "vboxsf",
    0x19830326: "fhgfs", 0xAAD7AAEA: "panfs", 0x564C: "ncp", 0xBEEFDEAD: "snfs", 0x013111A8: "ibrix",
}
DIR_MASK = (flags.MODIFY | flags.ATTRIB | flags.CREATE | flags.DELETE | flags.MOVED_FROM | flags.MOVED_TO
            | flags.DELETE_SELF | flags.MOVE_SELF | flags.ONLYDIR)
SUBDIR_MASK = flags.CREATE | flags.DELETE | flags.MOVED_FROM | flags.MOVED_TO | flags.ONLYDIR  # its mtime moves
GONE = flags.DELETE_SELF | flags.MOVE_SELF | flags.UNMOUNT | flags.IGNORED


class _Statfs(ctypes.Structure):
    # f_type comes first on every Linux ABI (a long); the rest is room for the struct (120 bytes on x86_64)
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 248)]


def fs_type(path: str) -> int:
    """The statfs ``f_type`` of the filesystem holding ``path`` (OSError when it cannot be asked)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    buf = _Statfs()
    if libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return buf.f_type & 0xFFFFFFFF


def remote_fs(path: str) -> str | None:
    """The name of ``path``'s network filesystem, or None for a local one."""
    return REMOTE_FS.get(fs_type(path))


class InotifyWatch:
    """An inotify watch on ``run_dir`` and its subdirectories; ``read()`` drains it: was there a change?

    Raises OSError when the run dir cannot be watched (missing, no inotify, out of watches)."""

    def __init__(self, run_dir: str, ignored: Callable[[str], bool]) -> None:
        self.run_dir = run_dir
        self._ignored = ignored
        self._ino = INotify(nonblocking=True)
        self._subdirs: dict[int, str] = {}  # watch descriptor -> subdirectory name
        self.events = 0  # events read, ignored ones too (tests wait on it)
        self.gone = False  # the run dir was removed, moved or unmounted: its watch has ended
        try:
            self._top = self._ino.add_watch(run_dir, DIR_MASK)
            with os.scandir(run_dir) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        self._watch_subdir(e.name)
        except BaseException:
            self._ino.close()
            raise

    def fileno(self) -> int:
        return self._ino.fileno()

    def _watch_subdir(self, name: str) -> None:
        try:
            self._subdirs[self._ino.add_watch(os.path.join(self.run_dir, name), SUBDIR_MASK)] = name
        except OSError:  # gone again, or a file by now: its own event says so
            pass

    def read(self) -> bool:
        """Every queued event: True when one is a change (an overflowed queue and a vanished run dir are)."""
        try:
            evs = self._ino.read(timeout=0)
        except BlockingIOError:  # woken for nothing (another reader drained it)
            return False
        changed = False
        for ev in evs:
            self.events += 1
            if ev.mask & flags.Q_OVERFLOW:  # events were lost: assume the worst
                changed = True
            elif ev.wd == self._top:
                if ev.mask & GONE:
                    self.gone = changed = True
                    continue
                if ev.mask & flags.ISDIR and ev.mask & (flags.CREATE | flags.MOVED_TO):
                    self._watch_subdir(ev.name)
                changed = changed or not self._ignored(ev.name)
            elif ev.wd in self._subdirs:
                if ev.mask & flags.IGNORED:  # the subdirectory went (its removal was the top's event)
                    del self._subdirs[ev.wd]
                else:
                    changed = True
        return changed

    def close(self) -> None:
        self._ino.close()
