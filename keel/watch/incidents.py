"""Incident bundles on disk: ``<run_dir>/incidents/<time>-<process>/``, written whole or not at all.

A bundle is a directory: ``summary.json`` (what happened, the stuck thread, the status
and resource sample), ``stacks.txt`` (every thread, the stuck one first), ``stacks.json``,
``log.txt`` (the process's last log lines) and ``metrics.jsonl`` (its last metrics records).
It is built in a hidden temp directory beside the others and renamed into place, so a
reader (``bin/launch incidents``, the page) sees a complete bundle or none; the oldest
bundles beyond ``keep`` are deleted after each write.

Also the readers (``list_incidents``, ``load_incident``) that keel.stack and the
dashboard use, so the layout is known in this one module.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from keel.fs.atomic import atomic_write_text, fsync_dir
from keel.fs.tail import last_lines
from keel.status.paths import INCIDENTS_DIR
from keel.watch.stacks import ProcessStacks, format_stacks, stuck_thread, user_frame

__all__ = ["Incident", "incident_id", "list_incidents", "load_incident", "newest_bundle", "newest_incident", "prune",
           "stuck_words", "tail_jsonl", "tail_lines", "write_incident"]

SUMMARY = "summary.json"
BUNDLE_FILES = (SUMMARY, "stacks.txt", "stacks.json", "log.txt", "metrics.jsonl")  # write_incident writes these
_TEMP_PREFIX = ".tmp-"
_STALE_TEMP_AGE = 3600.0  # a temp dir this old is a writer killed mid-write, not one at work


def incident_id(wall: float, process: str) -> str:
    """``20261202T171500.123Z-trainer``: sorts by time as text; no colons (safe in any path)."""
    t = datetime.fromtimestamp(wall, timezone.utc)
    return f"{t:%Y%m%dT%H%M%S}.{t.microsecond // 1000:03d}Z-{process}"


def incidents_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / INCIDENTS_DIR


@dataclass
class Incident:
    """Everything one bundle holds. ``complete`` is False when the capture deadline cut something short."""

    id: str
    process: str
    pid: int | None
    wall: float
    verdict: dict[str, Any]  # {"level", "rule", "reason"}
    action: str  # restart | give_up | on_demand
    capture_seconds: float = 0.0
    complete: bool = True
    stacks: list[ProcessStacks] = field(default_factory=list)
    status: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    log_file: str | None = None
    resources: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """summary.json: enough to list the incident and point at the stuck line without opening other files."""
        t = stuck_thread(self.stacks)
        f = user_frame(t) if t is not None else None
        return {
            "id": self.id, "process": self.process, "pid": self.pid,
            "time": datetime.fromtimestamp(self.wall, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "verdict": self.verdict, "action": self.action,
            "capture_seconds": round(self.capture_seconds, 3), "complete": self.complete,
            "stuck": None if t is None else {
                "pid": t.pid, "thread": t.name or t.thread_id,
                "function": f.function if f else None, "file": f.file if f else None, "line": f.line if f else None,
                "frames": [f"{x.function} ({x.where()})" for x in t.frames],
            },
            "stacks": [{"pid": s.pid, "role": s.role, "state": s.state, "method": s.method, "threads": len(s.threads),
                        "errors": s.errors} for s in self.stacks],
            "status": self.status, "resources": self.resources, "log_file": self.log_file,
            "log_lines": len(self.log), "metrics_records": len(self.metrics), "notes": self.notes,
            "files": list(BUNDLE_FILES),
        }


def write_incident(run_dir: str | os.PathLike, incident: Incident, keep: int) -> Path:
    """Write the bundle atomically (temp dir, then rename), prune beyond ``keep``; returns its directory."""
    root = incidents_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / incident.id
    n = 1
    while final.exists():  # two in the same millisecond (on demand + watchdog): keep both
        final = root / f"{incident.id}.{n}"
        n += 1
    incident.id = final.name
    tmp = root / f"{_TEMP_PREFIX}{final.name}"
    tmp.mkdir()
    try:
        files = {
            SUMMARY: json.dumps(incident.summary(), indent=2, default=str, allow_nan=True) + "\n",
            "stacks.txt": format_stacks(incident.stacks),
            "stacks.json": json.dumps([s.to_json() for s in incident.stacks], indent=1, default=str) + "\n",
            "log.txt": "\n".join(incident.log) + ("\n" if incident.log else ""),
            "metrics.jsonl": "".join(json.dumps(r, default=str, allow_nan=True) + "\n" for r in incident.metrics),
        }
        for name, text in files.items():
            atomic_write_text(tmp / name, text)
        os.rename(tmp, final)  # the bundle appears whole
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(root)
    prune(root, keep)
    return final


def _bundles(root: Path) -> list[Path]:
    try:
        return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def prune(root: Path, keep: int, *, now: float | None = None) -> list[str]:
    """Delete the oldest bundles beyond ``keep`` and stale temp dirs; returns the names removed."""
    removed = []
    bundles = _bundles(root)
    for p in bundles[: max(0, len(bundles) - keep)]:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    now = time.time() if now is None else now
    for p in root.glob(f"{_TEMP_PREFIX}*"):
        try:
            if now - p.stat().st_mtime > _STALE_TEMP_AGE:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
        except OSError:
            pass
    return removed


def _summary(p: Path) -> dict[str, Any]:
    try:
        summary = json.loads((p / SUMMARY).read_text())
    except (OSError, ValueError) as exc:
        summary = {"id": p.name, "error": f"unreadable {SUMMARY}: {exc}"}
    summary["path"] = str(p)
    return summary


def list_incidents(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every bundle's summary, newest first; an unreadable summary is listed with its error."""
    return [_summary(p) for p in reversed(_bundles(incidents_dir(run_dir)))]


def newest_bundle(run_dir: str | os.PathLike) -> str | None:
    """The newest bundle's id (one directory listing, no summary read), or None."""
    bundles = _bundles(incidents_dir(run_dir))
    return bundles[-1].name if bundles else None


def newest_incident(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The newest bundle's summary (with its ``path``), or None: one listing and one file read."""
    bundles = _bundles(incidents_dir(run_dir))
    return _summary(bundles[-1]) if bundles else None


def stuck_words(stuck: dict[str, Any] | None) -> str:
    """"stuck in f (file:line)" from a summary's ``stuck``, or "no stacks": the words every reader shows."""
    if not stuck or not stuck.get("function"):
        return "no stacks"
    return f"stuck in {stuck['function']} ({stuck['file']}:{stuck['line']})"


def load_incident(run_dir: str | os.PathLike, incident: str) -> tuple[dict[str, Any], dict[str, str]]:
    """(summary, {file name: text}) of one bundle, by id or unique id prefix ("latest" for the newest).

    LookupError naming what exists when there is no such incident.
    """
    bundles = _bundles(incidents_dir(run_dir))
    if incident == "latest":
        matches = bundles[-1:]
    else:
        matches = [p for p in bundles if p.name == incident] or [p for p in bundles if p.name.startswith(incident)]
    if len(matches) != 1:
        known = ", ".join(p.name for p in bundles[-5:]) or "none"
        what = "no incident" if not matches else f"{len(matches)} incidents match"
        raise LookupError(f"{what} {incident!r} in {incidents_dir(run_dir)} (latest: {known})")
    p = matches[0]
    texts = {}
    for child in sorted(p.iterdir()):
        try:
            texts[child.name] = child.read_text(errors="replace")
        except OSError as exc:
            texts[child.name] = f"(unreadable: {exc})"
    summary = json.loads(texts.get(SUMMARY, "{}") or "{}")
    summary["path"] = str(p)
    return summary, texts


# -- tails, read without loading whole files ------------------------------------------------------


def tail_lines(path: str | os.PathLike, count: int) -> list[str]:
    """The last ``count`` lines of a file ([] when missing or unreadable: a bundle notes what it lacks)."""
    try:
        return last_lines(path, count)
    except OSError:
        return []


def tail_jsonl(path: str | os.PathLike, count: int) -> list[dict[str, Any]]:
    """The last ``count`` JSON records of a .jsonl file (a torn or foreign line is skipped)."""
    out = []
    for line in tail_lines(path, count + 1):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out[-count:] if count else []
