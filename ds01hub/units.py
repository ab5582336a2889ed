"""Sizes (`32g`, `512m`, `1.5G`) and durations (`48h`, `1h30m`, `7d`) to numbers and back.

The YAML limits file and the command line speak Docker's units (binary multiples, one-letter
suffixes, case-insensitive) and DS01's durations; everything inside ds01hub works in bytes and
seconds. Parsing is strict: a value that is not clearly a size or a duration is an error naming
the accepted forms, never a silent guess.
"""

from __future__ import annotations

import math
import re

__all__ = [
    "UnitError",
    "parse_size",
    "format_size",
    "parse_duration",
    "format_duration",
]


class UnitError(ValueError):
    """A size or duration that cannot be read; the message says which forms are accepted."""


_SIZE_MULTIPLIERS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "m": 1 << 20,
    "g": 1 << 30,
    "t": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
SIZE_FORMS = "a number of bytes or a number with k/m/g/t (binary, like Docker): 512m, 32g, 1.5G"


def parse_size(value: str | int | float) -> int:
    """Bytes from `32g`, `512m`, `1.5G`, `64GiB`, `1024` (plain numbers are bytes)."""
    if isinstance(value, bool):
        raise UnitError(f"{value!r} is not a size; use {SIZE_FORMS}")
    if isinstance(value, int | float):
        if value < 0 or math.isnan(value) or math.isinf(value):
            raise UnitError(f"{value!r} is not a size (negative); use {SIZE_FORMS}")
        return int(value)
    if not isinstance(value, str):
        raise UnitError(f"{value!r} is not a size; use {SIZE_FORMS}")
    match = _SIZE_RE.match(value)
    if not match:
        raise UnitError(f"{value!r} is not a size; use {SIZE_FORMS}")
    number, unit = match.groups()
    return int(float(number) * _SIZE_MULTIPLIERS[unit.lower()])


def format_size(n_bytes: int) -> str:
    """The shortest exact Docker spelling: 34359738368 -> '32g', 1610612736 -> '1536m'."""
    for suffix, size in (("t", 1 << 40), ("g", 1 << 30), ("m", 1 << 20), ("k", 1 << 10)):
        if n_bytes >= size and n_bytes % size == 0:
            return f"{n_bytes // size}{suffix}"
    return str(n_bytes)


_DURATION_SECONDS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*([wdhms])", re.IGNORECASE)
_DURATION_RE = re.compile(r"^\s*(?:(?:\d+(?:\.\d+)?|\.\d+)\s*[wdhms]\s*)+$", re.IGNORECASE)
DURATION_FORMS = "a number with w/d/h/m/s: 30m, 48h, 0.5h, 7d, 1h30m (or a number of seconds)"


def parse_duration(value: str | int | float) -> float:
    """Seconds from `48h`, `30m`, `0.25h`, `7d`, `1h30m`, `90s`; plain numbers are seconds."""
    if isinstance(value, bool):
        raise UnitError(f"{value!r} is not a duration; use {DURATION_FORMS}")
    if isinstance(value, int | float):
        if value < 0 or math.isnan(value) or math.isinf(value):
            raise UnitError(f"{value!r} is not a duration (negative); use {DURATION_FORMS}")
        return float(value)
    if not isinstance(value, str) or not _DURATION_RE.match(value):
        raise UnitError(f"{value!r} is not a duration; use {DURATION_FORMS}")
    return float(
        sum(
            float(number) * _DURATION_SECONDS[unit.lower()]
            for number, unit in _DURATION_PART_RE.findall(value)
        )
    )


def format_duration(seconds: float) -> str:
    """Compact and exact to the second: 5400 -> '1h30m', 172800 -> '2d', 0 -> '0s'."""
    remaining = int(round(seconds))
    if remaining == 0:
        return "0s"
    parts = []
    for unit in ("d", "h", "m", "s"):
        count, remaining = divmod(remaining, _DURATION_SECONDS[unit])
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)
