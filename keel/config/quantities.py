"""Durations and sizes as people write them: `90s`, `5m`, `1h30m`, `512MiB`, `24GiB`.

Small pure converters (supervisor's datatypes.py is the model). Each raises
ValueError with the message the config loader shows after `file:line: key.path:`.
"""

from __future__ import annotations

import math
import re

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "K": 1000,
    "KB": 1000,
    "M": 1000**2,
    "MB": 1000**2,
    "G": 1000**3,
    "GB": 1000**3,
    "T": 1000**4,
    "TB": 1000**4,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
    "TIB": 1024**4,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)")


def parse_duration(value: object) -> float:
    """Seconds from `90s`, `5m`, `1h30m`, `250ms`, or a bare number of seconds. Must be > 0."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 90s, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().replace(" ", "")
        pos, seconds = 0, 0.0
        for match in _DURATION_PART.finditer(text):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
            pos = match.end()
        if text.startswith("-"):
            raise ValueError(f'a duration must be positive, got "{value}"')
        if not text or pos != len(text):
            try:
                seconds = float(text)
            except ValueError:
                raise ValueError(f'expected a duration like 90s, 5m or 1h, got "{value}"') from None
    else:
        raise ValueError(f"expected a duration like 90s, got {type(value).__name__} {value!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f'a duration must be positive, got "{value}"')
    return seconds


def parse_size(value: object) -> int:
    """Bytes from `512MiB`, `24GiB`, `1.5GB`, or a bare number of bytes. Must be > 0."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 512MiB, got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, float) and value.is_integer():
        size = int(value)
    elif isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise ValueError(f'expected a size like 512MiB or 24GiB, got "{value}"')
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    else:
        raise ValueError(f"expected a size like 512MiB, got {value!r}")
    if size <= 0:
        raise ValueError(f'a size must be positive, got "{value}"')
    return size


def format_duration(seconds: float) -> str:
    """The inverse, for messages and docs: 90 -> `1m30s`, 0.25 -> `250ms`."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    out, rest = [], round(seconds, 3)
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if rest >= length:
            count = int(rest // length)
            out.append(f"{count}{unit}")
            rest -= count * length
    if rest or not out:
        out.append(f"{rest:g}s")
    return "".join(out)


def format_size(size: int) -> str:
    """1073741824 -> `1GiB`; sizes that are not whole binary units stay in bytes."""
    for unit, length in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= length and size % length == 0:
            return f"{size // length}{unit}"
    return f"{size}B"
