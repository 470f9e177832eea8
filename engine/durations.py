"""Parsing of human-friendly durations and sizes used in ``routes.yaml``.

Durations: a number (seconds, int or float) or a string ``<number><unit>`` with unit one of
``ms``, ``s``, ``m``, ``h``, ``d`` ("500ms", "10s", "1.5m", "2h", "7d"). A bare numeric string
("30") is read as seconds. Result: float seconds, never negative.

Sizes: an int (bytes) or a string ``<number><unit>`` with unit ``B``, ``KB``, ``MB``, ``GB``
(binary multiples: 1 KB = 1024 bytes, so "20MB" = 20 * 1024 * 1024) or ``KiB``/``MiB``/``GiB``
(same values). Case-insensitive. Result: int bytes.

Both raise ``ValueError`` with a short English message (pydantic turns it into a config error).
Pure stdlib.
"""
from __future__ import annotations

import math
import re

__all__ = ["parse_duration", "parse_size", "format_duration"]

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h|d)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|kib|mb|mib|gb|gib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 1024,
    "kib": 1024,
    "mb": 1024**2,
    "mib": 1024**2,
    "gb": 1024**3,
    "gib": 1024**3,
}


def parse_duration(value: object) -> float:
    """Return ``value`` as seconds (float). See module docstring for the accepted forms."""
    if isinstance(value, bool):
        raise ValueError("invalid duration: expected a number of seconds or a string like '10s', '5m'")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION_RE.match(value)
        if not m:
            raise ValueError(
                f"invalid duration {value!r}: expected a number of seconds or "
                "<number><unit> with unit ms, s, m, h or d (e.g. '500ms', '10s', '5m', '2h', '7d')"
            )
        seconds = float(m.group(1)) * _DURATION_UNITS[(m.group(2) or "s").lower()]
    else:
        raise ValueError("invalid duration: expected a number of seconds or a string like '10s', '5m'")
    if math.isnan(seconds) or math.isinf(seconds) or seconds < 0:
        raise ValueError(f"invalid duration {value!r}: must be a finite, non-negative number")
    return seconds


def parse_size(value: object) -> int:
    """Return ``value`` as a number of bytes (int). See module docstring for the accepted forms."""
    if isinstance(value, bool):
        raise ValueError("invalid size: expected a number of bytes or a string like '512KB', '20MB'")
    if isinstance(value, int):
        size = value
    elif isinstance(value, float) and value.is_integer():
        size = int(value)
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        if not m:
            raise ValueError(
                f"invalid size {value!r}: expected a number of bytes or <number><unit> "
                "with unit B, KB, MB or GB (e.g. '512KB', '20MB')"
            )
        size = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()])
    else:
        raise ValueError("invalid size: expected a number of bytes or a string like '512KB', '20MB'")
    if size < 0:
        raise ValueError(f"invalid size {value!r}: must not be negative")
    return size


def format_duration(seconds: float) -> str:
    """Short display form ("500ms", "10s", "5m", "2h", "7d"; falls back to seconds)."""
    if seconds < 1 and seconds * 1000 == int(seconds * 1000):
        return f"{int(seconds * 1000)}ms"
    for unit, factor in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= factor and seconds % factor == 0:
            return f"{int(seconds // factor)}{unit}"
    return f"{seconds:g}s"
