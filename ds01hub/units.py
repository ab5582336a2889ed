"""Sizes (`32g`, `512m`, `1.5G`) and durations (`48h`, `1h30m`, `7d`) to numbers and back, and
the only formatters of sizes, durations and quotas for people.

The YAML limits file and the command line speak Docker's units (binary multiples, one-letter
suffixes, case-insensitive) and DS01's durations; everything inside ds01hub works in bytes and
seconds. Parsing is strict: a value that is not clearly a size or a duration is an error naming
the accepted forms, never a silent guess.

Two kinds of output, one function each:
- a value someone configured, exactly, in the form the limits file takes back:
  `format_size` (`32g`), `format_duration` (`1h30m`);
- a measured amount, rounded for reading: `human_size` (`1.5G`), `human_duration` (`2d 3h`).
`quota_rows` renders a user's quota (`UserOperations.quota()`) for the users' commands and the
notebook's panel alike.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

from ds01hub.errors import Ds01hubError

__all__ = [
    "UnitError",
    "parse_size",
    "format_size",
    "human_size",
    "parse_duration",
    "format_duration",
    "human_duration",
    "gpu_use",
    "quota_rows",
    "utcnow",
]


class UnitError(Ds01hubError, ValueError):
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


def human_size(n_bytes: float | None, none: str = "-") -> str:
    """A measured size, rounded: 512 -> '512B', 1.5 GiB -> '1.5G', 32 GiB -> '32G'; `none`
    for an unknown (or unlimited) one."""
    if n_bytes is None:
        return none
    for unit, size in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n_bytes >= size:
            value = n_bytes / size
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    return f"{int(n_bytes)}B"


def human_duration(seconds: float | None, none: str = "-") -> str:
    """A measured time, to its two largest units: 3725 -> '1h 2m', 7200 -> '2h', 45 -> '45s',
    90061 -> '1d 1h'; `none` for an unknown one."""
    if seconds is None:
        return none
    remaining = int(max(0, seconds))
    counts = []
    for unit in ("d", "h", "m", "s"):
        count, remaining = divmod(remaining, _DURATION_SECONDS[unit])
        counts.append((count, unit))
    first = next((i for i, (count, _) in enumerate(counts) if count), len(counts) - 1)
    shown = [f"{count}{unit}" for count, unit in counts[first : first + 2] if count]
    return " ".join(shown) or "0s"


def gpu_use(held: Sequence[tuple[str, str]], max_gpus: int | None) -> str:
    """'1 of 2 GPUs in use (slot 0: NVIDIA A100)', '0 of 1 GPU in use', '2 GPUs in use of
    unlimited (slot 0: ...; slot 1: ...)'; `held` is (slot id, name) per slot held."""
    slots = "; ".join(f"slot {slot}: {name}" for slot, name in held)
    suffix = f" ({slots})" if slots else ""
    if max_gpus is None:
        noun = "GPU" if len(held) == 1 else "GPUs"
        return f"{len(held)} {noun} in use of unlimited{suffix}"
    noun = "GPU" if max_gpus == 1 else "GPUs"
    return f"{len(held)} of {max_gpus} {noun} in use{suffix}"


def gpus_free_text(free: Mapping[str, Any]) -> str:
    """'3 of 4 whole GPUs; 1 of 2 MIG 2g.20gb slices (SIMULATED)': the GPU slots free on the
    host now, as the spawn form counts them (`GpuOffer.to_dict()`)."""

    def count(entry: Mapping[str, Any], noun: str) -> str:
        total = int(entry.get("total", 0))
        return f"{int(entry.get('free', 0))} of {total} {noun}{'' if total == 1 else 's'}"

    parts = []
    whole = free.get("whole") or {}
    if whole.get("total"):
        parts.append(count(whole, "whole GPU"))
    for profile, entry in (free.get("mig") or {}).items():
        parts.append(count(entry, f"MIG {profile} slice"))
    text = "; ".join(parts) or "none (this machine has no GPUs)"
    return text + (" (SIMULATED)" if free.get("simulated") else "")


def quota_rows(quota: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(what, in use, limit) for a user's quota (`UserOperations.quota()`): the one rendering
    of it (`container-stats`, `user-setup`, the notebook's QuotaPanel). An absent limit reads
    "unlimited"; a GPU hold without end reads "until the container is removed". The GPU row
    is one sentence (`gpu_use`) with the limit in it, so its limit cell is empty."""
    limits = quota.get("limits") or {}
    held = [(str(g.get("slot")), str(g.get("name") or "GPU")) for g in quota.get("gpus") or []]

    def cap(value: Any) -> str:
        return (
            "unlimited"
            if value is None
            else f"{value:g}"
            if isinstance(value, float)
            else str(value)
        )

    hold = limits.get("gpu_hold_after_stop")
    idle = limits.get("idle_timeout")
    free = quota.get("gpus_free")
    rows = [
        ("GPUs", gpu_use(held, limits.get("max_gpus")), ""),
        *([("GPUs free now", gpus_free_text(free), "")] if free else []),
        ("GPUs per container", "", cap(limits.get("max_gpus_per_container"))),
        ("CPUs per container", "", cap(limits.get("max_cpus"))),
        ("Memory per container", "", human_size(limits.get("memory"), none="unlimited")),
        (
            "Containers",
            f"{quota.get('running', 0)} running, {quota.get('containers', 0)} total",
            cap(limits.get("max_containers_per_user")),
        ),
        ("Idle containers stopped after", "", "never" if idle is None else format_duration(idle)),
        (
            "GPUs kept after a stop",
            "",
            "until the container is removed" if hold is None else format_duration(hold),
        ),
    ]
    return _with_sources(rows, quota.get("sources") or {})


#: Sources every user shares (ds01hub.limits.ResolvedLimits.sources): not named in quotas.
SITE_WIDE_SOURCES = frozenset({"defaults", "built-in", "policies"})
#: quota_rows' rows by label -> the limit field each shows (rows of use only have none)
QUOTA_FIELDS = {
    "GPUs": "max_gpus",
    "GPUs per container": "max_gpus_per_container",
    "CPUs per container": "max_cpus",
    "Memory per container": "memory",
    "Containers": "max_containers_per_user",
    "Idle containers stopped after": "idle_timeout",
    "GPUs kept after a stop": "gpu_hold_after_stop",
}


def _with_sources(
    rows: list[tuple[str, str, str]], sources: Mapping[str, Any]
) -> list[tuple[str, str, str]]:
    """Each limit set for the user (an override, their group, their hub group's properties)
    followed by where it came from (`(hub_groups.students)`, as `ds01hub limits` shows it),
    when the quota says (`UserOperations.quota()`'s `sources`); the site's defaults stay
    plain, so the line names only what differs from everyone's."""
    out = []
    for what, use, limit in rows:
        source = sources.get(QUOTA_FIELDS.get(what, ""))
        where = f" ({source})" if source and source not in SITE_WIDE_SOURCES else ""
        out.append((what, use + where, limit) if not limit else (what, use, limit + where))
    return out


def utcnow() -> datetime:
    """The one clock: now, timezone-aware, in UTC (what every timestamp ds01hub writes or
    compares is). Components take a `clock` argument defaulting to it, so tests set time."""
    return datetime.now(UTC)
