"""Sizes (`32g`, `512m`, `1.5G`) and durations (`48h`, `1h30m`, `7d`) to numbers and back.

The YAML limits file and the command line speak Docker's units (binary multiples, one-letter
suffixes, case-insensitive) and DS01's durations; everything inside ds01hub works in bytes and
seconds. Parsing is strict: a value that is not clearly a size or a duration is an error naming
the accepted forms, never a silent guess.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

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
# Digits are bounded so that a huge number is an error, never a float overflow or a slow int.
_NUMBER = r"(\d{1,18}(?:\.\d{1,18})?|\.\d{1,18})"
_SIZE_RE = re.compile(r"^\s*" + _NUMBER + r"\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_MAX_TEXT = 64  # characters of a size or duration text worth matching at all
SIZE_FORMS = "a number of bytes or a number with k/m/g/t (binary, like Docker): 512m, 32g, 1.5G"


def parse_size(value: str | int | float) -> int:
    """Bytes from `32g`, `512m`, `1.5G`, `64GiB`, `32 gb`, `1024` (plain numbers are bytes).
    Units are binary whatever the spelling (`GB` = `GiB` = `g`), as Docker reads them."""
    if isinstance(value, bool):
        raise UnitError(f"{value!r} is not a size; use {SIZE_FORMS}")
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise UnitError(f"{value!r} is not a size (not a finite number); use {SIZE_FORMS}")
        if value < 0:
            raise UnitError(f"{value!r} is not a size (negative); use {SIZE_FORMS}")
        return int(value)
    if not isinstance(value, str) or len(value) > _MAX_TEXT:
        raise UnitError(f"{_shown(value)} is not a size; use {SIZE_FORMS}")
    match = _SIZE_RE.match(value)
    if not match:
        raise UnitError(f"{value!r} is not a size; use {SIZE_FORMS}")
    number, unit = match.groups()
    return int(Fraction(number) * _SIZE_MULTIPLIERS[unit.lower()])


def _shown(value: object) -> str:
    """A bounded repr for these messages (a limits file may hold a megabyte in one value)."""
    text = repr(value) if isinstance(value, str) else f"a {type(value).__name__}"
    return text if len(text) <= 40 else text[:37] + "..."


def format_size(n_bytes: int) -> str:
    """The shortest exact Docker spelling: 34359738368 -> '32g', 1610612736 -> '1536m'."""
    for suffix, size in (("t", 1 << 40), ("g", 1 << 30), ("m", 1 << 20), ("k", 1 << 10)):
        if n_bytes >= size and n_bytes % size == 0:
            return f"{n_bytes // size}{suffix}"
    return str(n_bytes)


_DURATION_SECONDS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION_PART_RE = re.compile(_NUMBER + r"\s*([wdhms])", re.IGNORECASE)
_DURATION_RE = re.compile(r"^\s*(?:" + _NUMBER + r"\s*[wdhms]\s*)+$", re.IGNORECASE)
DURATION_FORMS = "a number with w/d/h/m/s: 30m, 48h, 0.5h, 7d, 1h30m (or a number of seconds)"


def parse_duration(value: str | int | float) -> float:
    """Seconds from `48h`, `30m`, `0.25h`, `7d`, `1h30m`, `90s`; plain numbers are seconds."""
    if isinstance(value, bool):
        raise UnitError(f"{value!r} is not a duration; use {DURATION_FORMS}")
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise UnitError(
                f"{value!r} is not a duration (not a finite number); use {DURATION_FORMS}"
            )
        if value < 0:
            raise UnitError(f"{value!r} is not a duration (negative); use {DURATION_FORMS}")
        if value > _MAX_SECONDS:
            raise UnitError(f"{_shown(str(value))} seconds is not a duration (too long)")
        return float(value)
    if not isinstance(value, str) or len(value) > _MAX_TEXT or not _DURATION_RE.match(value):
        raise UnitError(f"{_shown(value)} is not a duration; use {DURATION_FORMS}")
    return float(
        sum(
            Fraction(number) * _DURATION_SECONDS[unit.lower()]
            for number, unit in _DURATION_PART_RE.findall(value)
        )
    )


_MAX_SECONDS = 10**18  # float() of anything below is exact enough and finite


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
