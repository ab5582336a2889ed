"""Resource limits from one YAML file: load, validate, resolve a user's limits, reload safely.

The file has DS01's shape: `defaults`, `groups` (each with `members` and limits),
`user_overrides` (per user, with an optional `reason`), `policies` and `gpu_allocation`.
A user's limits are resolved field by field: `user_overrides` > their group > `defaults` >
ds01hub's built-in defaults.

Reading is strict and bounded (`ds01hub.strict_yaml`: libyaml, at most 1 MiB, no alias bombs,
duplicate keys refused with both lines, every value's line kept). Validation then checks every
value against what Docker and the machine accept (memory at least Docker's 6 MiB, finite CPU
counts, durations a date can still be added to, MIG layouts a GPU can hold, ...) and collects
every problem in one pass, each naming the file, the line, the key path, the (shortened) value
and the fix, so an admin fixes the file in one go. Nothing escapes as anything but
`LimitsError`: an unexpected exception becomes an `internal-error` problem naming the file.
`LimitsStore` keeps the last good configuration when a reload fails, parses off the caller's
thread under a time limit, and reports every failure (`last_error`, the log, the counters that
`ds01hub.services.ops.metrics` exports).

DS01 keys that ds01hub does not enforce (storage quotas, I/O limits, wizard texts, ...) are
accepted so a DS01 file loads unchanged, and reported as warnings by `ds01hub check-config`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import difflib
import logging
import math
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, TypeVar

from ds01hub import paths
from ds01hub.errors import Ds01hubError
from ds01hub.mig import (
    COMPUTE_SLICES,
    PROFILE_FORM,
    is_profile,
    model_compute_slices,
    parse_profile,
)
from ds01hub.strict_yaml import (
    Document,
    KeyPath,
    StrictYamlError,
    format_key_path,
    read_yaml_file,
    short_repr,
)
from ds01hub.units import (
    DURATION_FORMS,
    SIZE_FORMS,
    UnitError,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
)

__all__ = [
    "AggregateLimits",
    "EXPIRY_EVENT",
    "EXPIRY_WARN_DAYS",
    "Expiry",
    "FairShareConfig",
    "GpuAllocationConfig",
    "HUB_PROPERTY",
    "HubGroupLimits",
    "LimitsConfig",
    "LimitsError",
    "LimitsStore",
    "Policies",
    "Problem",
    "ResolvedLimits",
    "SimulatedGpuSpec",
    "SimulateConfig",
    "load_limits_or_defaults",
    "load_limits",
    "parse_group_properties",
    "parse_limits",
    "record_expired",
]

PRIORITY_RANGE = (1, 100)
#: The docker-py keywords of ResolvedLimits.host_config() -> their Engine API HostConfig names.
HOST_CONFIG_FIELDS = {
    "nano_cpus": "NanoCpus",
    "mem_limit": "Memory",
    "memswap_limit": "MemorySwap",
    "shm_size": "ShmSize",
    "ipc_mode": "IpcMode",
    "pids_limit": "PidsLimit",
    "cgroup_parent": "CgroupParent",
}
IPC_MODES = ("private", "shareable", "host", "none")
STRATEGIES = ("spread", "pack")
# DS01 spellings of the strategies.
STRATEGY_ALIASES = {"least_allocated": "spread", "round_robin": "spread", "most_allocated": "pack"}
# Legacy DS01 spellings of limit keys -> the ds01hub name.
LIMIT_ALIASES = {
    "max_mig_instances": "max_gpus",
    "gpus": "max_gpus",
    "cpus": "max_cpus",
    "max_mig_per_container": "max_gpus_per_container",  # DS01's newer spellings
    "max_gpu_slots_per_container": "max_gpus_per_container",
    "gpu_equivalents": "max_gpu_equivalents",
    "max_gpu_equivalent": "max_gpu_equivalents",
}

# -- what Docker and the machine accept (and what a sane file stays within) --------------------
MIN_MEMORY = 6 << 20  # Docker refuses less ("Minimum memory limit allowed is 6MB")
MIN_SHM = 1 << 20  # 0 means Docker's default 64m; below 1m nothing useful fits
MAX_SIZE = 1 << 46  # 64 TiB: more than any machine has; 99999999t overflows Docker's int64
MIN_CPUS, MAX_CPUS = 0.01, 4096.0  # Docker's --cpus resolution is 0.01
MAX_GPU_COUNT = 1024  # GPU slots per user or container (a machine has at most 64 x 7)
MAX_PIDS = 1 << 22  # the kernel's PID_MAX_LIMIT
MAX_CONTAINERS = 10_000
MAX_DURATION = 3650 * 86400.0  # 10 years: far past any hold, and a date can still be added
MAX_NAME = 256  # characters of a user or group name
MAX_TEXT = 1000  # characters of a reason or description
MAX_IMAGES = 1000
MAX_SIMULATED_GPUS = 64
MIN_GPU_MEMORY, MAX_GPU_MEMORY = 1 << 30, 1 << 40  # a simulated GPU: 1g .. 1t
MIG_COMPUTE_SLICES = COMPUTE_SLICES  # every MIG-capable GPU has at most 7 compute slices ...
MIG_MEMORY_SLICES = 8  # ... and its memory in 8 slices
MAX_PROBLEMS = 100  # listed; more are counted
MAX_WARNINGS = 50
MAX_FAIRSHARE_WEIGHT = 1000.0  # points of priority fair share may add (priorities are 1..100)
MAX_SHARE = 1_000_000.0
DEFAULT_PARSE_TIMEOUT = 10.0  # seconds a reload may take before it counts as failed
MIN_EXPIRES, MAX_EXPIRES = date(2000, 1, 1), date(9998, 12, 31)  # a day after stays a date
EXPIRY_WARN_DAYS = 7  # users are told this many days before their limits expire
EXPIRY_EVENT = "limits-expired"  # the event log's kind for an expiry
HUB_PROPERTY = "ds01"  # a JupyterHub group's properties key that holds its limits


# --------------------------------------------------------------------------------------------
# Problems


@dataclass(frozen=True)
class Problem:
    """One thing wrong in the file: where (line, key path), what was found (a bounded repr),
    a stable `code` (`duplicate-key`, `out-of-range`, `unknown-key`, ...), and the fix."""

    file: str
    key_path: str
    value: str
    message: str
    fix: str
    line: int | None = None
    code: str = "invalid-value"

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        if self.key_path:
            where += f": {self.key_path}"
        found = f" (found {self.value})" if self.value else ""
        return f"{where}: {self.message}{found}. Fix: {self.fix}"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class LimitsError(Ds01hubError, ValueError):
    """The limits file cannot be used; `problems` lists every problem found (at most
    MAX_PROBLEMS, then one saying how many more). `str()` is bounded: it shows the first 20."""

    SHOWN = 20

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__(self.summary() + ":\n" + "\n".join(self.lines()))

    def summary(self) -> str:
        """One line: how many problems, in which file."""
        count = len(self.problems)
        file = self.problems[0].file if self.problems else "the limits file"
        where = file if file.startswith("JupyterHub group ") else f"the limits file {file}"
        return f"{count} problem{'s' if count != 1 else ''} in {where}"

    def lines(self, limit: int = SHOWN) -> list[str]:
        shown = [f"  - {p}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            shown.append(f"  ... and {len(self.problems) - limit} more (ds01hub check-config)")
        return shown


class _Collector:
    """Gathers problems and warnings while walking the file, so all are reported at once."""

    def __init__(self, file: str, line_of: Callable[[KeyPath], int | None]):
        self.file = file
        self.line_of = line_of
        self.problems: list[Problem] = []
        self.more = 0
        self.warnings: list[str] = []
        self.more_warnings = 0

    def problem(
        self, path: KeyPath, value: Any, message: str, fix: str, code: str = "invalid-value"
    ) -> None:
        if len(self.problems) >= MAX_PROBLEMS:
            self.more += 1
            return
        shown = "" if value is _NOTHING else short_repr(value)
        self.problems.append(
            Problem(self.file, format_key_path(path), shown, message, fix, self.line_of(path), code)
        )

    def warn(self, path: KeyPath, message: str) -> None:
        if len(self.warnings) >= MAX_WARNINGS:
            self.more_warnings += 1
            return
        line = self.line_of(path)
        where = self.file if line is None else f"{self.file}:{line}"
        self.warnings.append(f"{where}: {format_key_path(path)}: {message}")

    def unknown_key(self, path: KeyPath, key: Any, known: Iterable[str]) -> None:
        text = key if isinstance(key, str) and len(key) <= 100 else ""  # difflib is quadratic
        close = difflib.get_close_matches(text, list(known), n=1, cutoff=0.6) if text else []
        if close:
            fix = f"did you mean {close[0]!r}?"
        else:
            fix = "remove it; known keys here: " + ", ".join(sorted(known))
        self.problem(path, key, "unknown key", fix, "unknown-key")

    def all_problems(self) -> list[Problem]:
        if not self.more:
            return self.problems
        return self.problems + [
            Problem(
                self.file,
                "",
                "",
                f"{self.more} more problems not listed",
                "fix the ones listed and check the file again",
                None,
                "too-many-problems",
            )
        ]

    def all_warnings(self) -> tuple[str, ...]:
        more = [f"{self.file}: {self.more_warnings} more warnings"] if self.more_warnings else []
        return tuple(self.warnings + more)


_NOTHING = object()  # a problem about a key's absence shows no value


def _mapping(section: Any, path: KeyPath, out: _Collector, fix: str) -> Mapping | None:
    """`section` when it is a mapping; None (nothing there) or a problem otherwise."""
    if section is None:
        return None
    if not isinstance(section, Mapping):
        out.problem(path, section, "must be a mapping (keys indented under it)", fix, "wrong-type")
        return None
    return section


# --------------------------------------------------------------------------------------------
# Limit fields: how each is read from YAML and shown to people


class _Bad(ValueError):
    """A field's value is wrong: what is wrong, and the fix."""

    def __init__(self, message: str, fix: str, code: str = "invalid-value"):
        super().__init__(message)
        self.message, self.fix, self.code = message, fix, code


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count_reader(low: int, high: int, zero_means: str = "") -> Callable[[Any], int | None]:
    """Whole numbers from `low` to `high`, or null for unlimited."""
    fix = f"use a whole number from {low} to {high}, or null for unlimited"

    def read(value: Any) -> int | None:
        if value is None:
            return None
        if not _whole(value):
            raise _Bad("not a whole number", fix, "wrong-type")
        if value == 0 and zero_means:
            raise _Bad(f"0 {zero_means}", fix, "out-of-range")
        if not low <= value <= high:
            raise _Bad(f"outside {low}..{high}", fix, "out-of-range")
        return value

    return read


def _read_bounded_number(value: Any, low: float, high: float, fix: str) -> float | None:
    """A finite int or float within low..high (null: None), as a float; bools are refused."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Bad("not a number", fix, "wrong-type")
    if isinstance(value, float) and not math.isfinite(value):
        raise _Bad("not a finite number", fix, "out-of-range")
    if not low <= value <= high:  # compared before float(): a huge int stays an int
        raise _Bad(f"outside {low:g}..{high:g}", fix, "out-of-range")
    return float(value)


def _read_cpus(value: Any) -> float | None:
    fix = f"use a number of CPU cores from {MIN_CPUS} to {MAX_CPUS:g} such as 4 or 0.5, or null"
    return _read_bounded_number(value, MIN_CPUS, MAX_CPUS, fix)


def _read_equivalents(value: Any) -> float | None:
    """GPU equivalents: a whole GPU is 1, a MIG instance its share (2g.20gb = 2/7)."""
    fix = f"use a number of GPUs from 0 to {MAX_GPU_COUNT} such as 1.5 or 0.5, or null"
    return _read_bounded_number(value, 0, MAX_GPU_COUNT, fix)


def _size_reader(low: int, zero_means: str) -> Callable[[Any], int | None]:
    """Sizes from `low` to MAX_SIZE, or null for no limit; 0 is refused (`zero_means`)."""
    fix = f"use a size from {format_size(low)} to {format_size(MAX_SIZE)} such as 8g, or null"

    def read(value: Any) -> int | None:
        if value is None:
            return None
        try:
            size = parse_size(value)
        except UnitError:
            raise _Bad(
                "not a size", f"use {SIZE_FORMS}, or null for no limit", "wrong-type"
            ) from None
        if size == 0:
            raise _Bad(f"0 {zero_means}", fix, "out-of-range")
        if size < low:
            unit = " (a plain number is bytes: add the unit, e.g. 8g)" if _whole(value) else ""
            raise _Bad(f"below the minimum of {format_size(low)}{unit}", fix, "out-of-range")
        if size > MAX_SIZE:
            raise _Bad(f"above the maximum of {format_size(MAX_SIZE)}", fix, "out-of-range")
        return size

    return read


def _read_duration(value: Any) -> float | None:
    if value is None:
        return None
    try:
        seconds = parse_duration(value)
    except UnitError:
        raise _Bad(
            "not a duration", f"use {DURATION_FORMS}, or null for never", "wrong-type"
        ) from None
    if seconds > MAX_DURATION:
        raise _Bad(
            f"longer than {format_duration(MAX_DURATION)} (a date that far out overflows)",
            "use null for never, or a duration such as 48h or 30d",
            "out-of-range",
        )
    return seconds


def _read_priority(value: Any) -> int:
    low, high = PRIORITY_RANGE
    fix = f"use a whole number from {low} to {high} (higher wins)"
    if not _whole(value):
        raise _Bad("not a whole number", fix, "wrong-type")
    if not low <= value <= high:
        raise _Bad(f"outside {low}..{high}", fix, "out-of-range")
    return value


def _read_ipc_mode(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value not in IPC_MODES:
        raise _Bad("not an IPC mode", "use one of " + ", ".join(IPC_MODES) + ", or null")
    return value


def _read_images(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    fix = "use a list of image names or patterns (e.g. ['ds01-*', 'jupyter/*'])"
    if not isinstance(value, list) or len(value) > MAX_IMAGES:
        raise _Bad(f"not a list (of at most {MAX_IMAGES})", fix, "wrong-type")
    if not all(isinstance(v, str) and 0 < len(v) <= MAX_NAME and v.isprintable() for v in value):
        raise _Bad(f"an entry is not a name of 1..{MAX_NAME} printable characters", fix)
    return tuple(value)


_CGROUP_RE = re.compile(r"^[A-Za-z0-9_./@:-]{1,255}$")


def _read_cgroup_parent(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _CGROUP_RE.match(value):
        raise _Bad(
            "not a cgroup parent",
            "use a cgroup path or systemd slice such as /ds01/students or ds01-students.slice",
        )
    return value


_EXPIRES_FIX = "use a date such as 2027-01-31 (the limits apply through that day, UTC), or null"


def _read_expires(value: Any) -> date | None:
    """`expires: 2027-01-31` (YAML's date, or the same text from JSON: hub group properties).
    A date and time is refused: an expiry is a day, so nobody guesses the time zone."""
    if value is None:
        return None
    if isinstance(value, str) and len(value) <= 10:
        with contextlib.suppress(ValueError):
            value = date.fromisoformat(value)
    if isinstance(value, datetime) or not isinstance(value, date):
        raise _Bad("not a date (YYYY-MM-DD)", _EXPIRES_FIX, "wrong-type")
    if not MIN_EXPIRES <= value <= MAX_EXPIRES:
        raise _Bad(f"outside {MIN_EXPIRES}..{MAX_EXPIRES}", _EXPIRES_FIX, "out-of-range")
    return value


@dataclass(frozen=True)
class AggregateLimits:
    """Caps across all of one user's running containers (DS01's `aggregate`): CPUs, memory
    (`memory_high`: a soft limit the kernel reclaims towards first), tasks (PIDs) and GPU slots;
    None = no cap on that one."""

    cpus: float | None = None
    memory: int | None = None
    memory_high: int | None = None
    pids: int | None = None
    gpus: int | None = None

    def describe(self) -> str:
        parts = []
        if self.cpus is not None:
            parts.append(f"{self.cpus:g} CPUs")
        if self.memory is not None:
            parts.append(f"{format_size(self.memory)} memory")
        if self.memory_high is not None:
            parts.append(f"(soft {format_size(self.memory_high)})")
        if self.pids is not None:
            parts.append(f"{self.pids} tasks")
        if self.gpus is not None:
            parts.append(f"{self.gpus} GPU slots")
        return ", ".join(parts) or "none"


_AGGREGATE_FIX = (
    "use aggregate: {cpu_quota: '9600%' (or cpus: 96), memory_max: 96g, memory_high: 86g, "
    "tasks_max: 12288, gpu_limit: 3}, or null for none"
)


def _read_cpu_quota(value: Any) -> float | None:
    """systemd's CPUQuota (`9600%` = 96 CPUs), as DS01 writes it."""
    if value is None:
        return None
    text = value.strip() if isinstance(value, str) else ""
    try:
        percent = float(text[:-1]) if text.endswith("%") and len(text) <= 12 else math.nan
    except ValueError:
        percent = math.nan
    if not math.isfinite(percent):
        raise _Bad("cpu_quota: not a percentage", "use systemd's form such as '9600%' (96 CPUs)")
    try:
        return _read_cpus(percent / 100)
    except _Bad as bad:
        raise _Bad(f"cpu_quota: {bad.message}", bad.fix, bad.code) from None


_AGGREGATE_READERS: dict[str, Callable[[Any], Any]] = {
    "cpu_quota": _read_cpu_quota,
    "cpus": _read_cpus,
    "memory_max": _size_reader(MIN_MEMORY, "means no limit: use null"),
    "memory_high": _size_reader(MIN_MEMORY, "means no limit: use null"),
    "tasks_max": _count_reader(1, MAX_PIDS, "allows nothing: use null for no limit"),
    "gpu_limit": _count_reader(0, MAX_GPU_COUNT),
}


def _read_aggregate(value: Any) -> AggregateLimits | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise _Bad("not a mapping", _AGGREGATE_FIX, "wrong-type")
    read: dict[str, Any] = {}
    for key, item in value.items():
        if key not in _AGGREGATE_READERS:
            known = ", ".join(_AGGREGATE_READERS)
            raise _Bad(f"unknown key {short_repr(key)}", f"use only {known}", "unknown-key")
        try:
            read[key] = _AGGREGATE_READERS[key](item)
        except _Bad as bad:
            message = bad.message if bad.message.startswith(key) else f"{key}: {bad.message}"
            raise _Bad(message, bad.fix, bad.code) from None
    if "cpu_quota" in read and "cpus" in read:
        raise _Bad("both cpu_quota and cpus", "keep one of them", "conflict")
    cpus = read.get("cpus", read.get("cpu_quota"))
    memory, high = read.get("memory_max"), read.get("memory_high")
    if memory is not None and high is not None and high > memory:
        raise _Bad("memory_high above memory_max", "make memory_high at most memory_max")
    return AggregateLimits(cpus, memory, high, read.get("tasks_max"), read.get("gpu_limit"))


def _read_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad("not true or false", "use true or false", "wrong-type")
    return value


@dataclass(frozen=True)
class _Field:
    reader: Callable[[Any], Any]
    builtin: Any


# Every limit a section may set, with its reader and ds01hub's built-in default.
LIMIT_FIELDS: dict[str, _Field] = {
    "max_gpus": _Field(_count_reader(0, MAX_GPU_COUNT), 1),
    "max_gpus_per_container": _Field(_count_reader(0, MAX_GPU_COUNT), None),
    "max_gpu_equivalents": _Field(_read_equivalents, None),
    "allow_full_gpu": _Field(_read_bool, True),
    "max_cpus": _Field(_read_cpus, None),
    "memory": _Field(_size_reader(MIN_MEMORY, "means no limit to Docker: use null"), None),
    "shm_size": _Field(_size_reader(MIN_SHM, "means Docker's default (64m): use null"), None),
    "ipc_mode": _Field(_read_ipc_mode, None),
    "pids_limit": _Field(_count_reader(1, MAX_PIDS, "means no limit to Docker: use null"), None),
    "max_containers_per_user": _Field(_count_reader(1, MAX_CONTAINERS, "allows nothing"), None),
    "idle_timeout": _Field(_read_duration, None),
    "max_runtime": _Field(_read_duration, None),
    "gpu_hold_after_stop": _Field(_read_duration, 15 * 60.0),
    "container_hold_after_stop": _Field(_read_duration, None),
    "priority": _Field(_read_priority, 10),
    "allowed_images": _Field(_read_images, None),
    "cgroup_parent": _Field(_read_cgroup_parent, None),
    "aggregate": _Field(_read_aggregate, None),
}
# DS01 limit keys that ds01hub accepts (so DS01 files load) but does not enforce.
DS01_UNENFORCED_LIMITS = frozenset(
    {
        "gpu_memory",
        "memory_swap",
        "io_read_bps",
        "io_write_bps",
        "ulimit_nofile",
        "storage_workspace",
        "storage_data",
        "storage_tmp",
        "max_tasks",
        "reservation_start",
        "reservation_end",
        "reserved_gpus",
    }
)
DS01_UNENFORCED_TOP = frozenset({"advanced", "wizard"})
DS01_UNENFORCED_POLICIES = frozenset(
    {
        "allow_multi_container",
        "enforce_resource_limits",
        "log_allocations",
        "auto_stop_idle",
        "checkpoint_warning",
        "require_workspace_mount",
        "enforce_storage_quotas",
        "soft_limit_threshold",
        "graceful_errors",
        "suggest_alternatives",
        "allow_priority_preemption",
    }
)
DS01_UNENFORCED_GPU = frozenset(
    {"allocation_method", "mig_strategy", "mig_gpus", "respect_reservations", "allow_gpu_sharing"}
)


def _section_keys(extra: Iterable[str] = ()) -> set[str]:
    return set(LIMIT_FIELDS) | set(LIMIT_ALIASES) | DS01_UNENFORCED_LIMITS | set(extra)


def _read_field(name: str, value: Any, path: KeyPath, out: _Collector) -> Any:
    """The field's value, or _NOTHING after recording the problem."""
    try:
        return LIMIT_FIELDS[name].reader(value)
    except _Bad as bad:
        out.problem(path, value, f"invalid {name}: {bad.message}", bad.fix, bad.code)
        return _NOTHING


def _read_limits_section(
    section: Any, path: KeyPath, out: _Collector, extra_keys: Iterable[str] = ()
) -> dict[str, Any]:
    """Validated limit fields of one section (defaults, a group, an override), canonical names."""
    section = _mapping(section, path, out, "indent 'limit: value' lines under it")
    if section is None:
        return {}
    extra = set(extra_keys)
    result: dict[str, Any] = {}
    seen_from: dict[str, str] = {}
    for key, value in section.items():
        key_path = path + (key,)
        if not isinstance(key, str):
            out.unknown_key(key_path, key, _section_keys(extra))
            continue
        if key in extra:
            continue
        if key in DS01_UNENFORCED_LIMITS:
            out.warn(key_path, "DS01 key accepted but not enforced by ds01hub")
            continue
        name = LIMIT_ALIASES.get(key, key)
        if name not in LIMIT_FIELDS:
            out.unknown_key(key_path, key, _section_keys(extra))
            continue
        if name in seen_from:
            out.problem(
                key_path,
                value,
                f"sets {name!r} again (already set as {seen_from[name]!r})",
                f"keep only one of {seen_from[name]!r} and {key!r}",
                "conflict",
            )
            continue
        seen_from[name] = key
        read = _read_field(name, value, key_path, out)
        if read is not _NOTHING:
            result[name] = read
    return result


# --------------------------------------------------------------------------------------------
# Resolved limits: what one user gets


@dataclass(frozen=True)
class Expiry:
    """A layer of limits (`user_overrides.NAME`, a hub group's properties) that applies
    through the day `expires` (UTC) and no longer from the next midnight UTC."""

    source: str
    expires: date

    @property
    def ends(self) -> datetime:
        """The moment it stops applying: midnight UTC after `expires`."""
        return datetime.combine(self.expires + timedelta(days=1), time(), UTC)

    def expired(self, now: datetime) -> bool:
        return now >= self.ends

    def notice(self, now: datetime, warn_days: int = EXPIRY_WARN_DAYS) -> str | None:
        """What to tell the user: that it expired, or that it expires within `warn_days`."""
        if self.expired(now):
            return f"your limits from {self.source} expired on {self.expires} and no longer apply"
        left = self.ends - now
        if left > timedelta(days=warn_days):
            return None
        days = left.days
        when = "today" if days == 0 else f"in {days} day{'s' if days != 1 else ''}"
        return (
            f"your limits from {self.source} expire after {self.expires} (UTC; {when}): then "
            "your group's or the default limits apply. Ask an admin to extend them if needed"
        )

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "expires": self.expires.isoformat()}


def record_expired(eventlog: Any, user: str, group: str | None, expired: Iterable[Expiry]) -> int:
    """Record each expiry once in the event log (`EXPIRY_EVENT`, reason `SOURCE expired on
    DATE`), at the moment it took effect; `eventlog` is a `ds01hub.gpu.eventlog.EventLog`.
    Returns how many were new. Whoever notices first records it (a spawn, the culler's pass)."""
    pending = list(expired)
    if not pending:
        return 0
    seen = {e.reason for e in eventlog.events(user=user, kind=EXPIRY_EVENT)}
    new = 0
    for expiry in pending:
        reason = f"{expiry.source} expired on {expiry.expires}"
        if reason not in seen:
            eventlog.record(EXPIRY_EVENT, user, group=group, reason=reason, at=expiry.ends)
            seen.add(reason)
            new += 1
    return new


@dataclass(frozen=True)
class ResolvedLimits:
    """One user's effective limits after `user_overrides` > group > `defaults` > built-ins.

    `max_gpus` / `max_gpus_per_container` None mean unlimited; `idle_timeout`,
    `container_hold_after_stop`, `max_runtime` None mean never; `gpu_hold_after_stop` None
    means a stopped container holds its GPUs until it is removed (DS01's `null`).
    """

    user: str
    group: str | None
    group_reason: str
    priority: int
    max_gpus: int | None
    max_gpus_per_container: int | None
    max_cpus: float | None
    memory: int | None
    shm_size: int | None
    ipc_mode: str | None
    pids_limit: int | None
    max_containers_per_user: int | None
    idle_timeout: float | None
    gpu_hold_after_stop: float | None
    container_hold_after_stop: float | None
    allowed_images: tuple[str, ...] | None
    cgroup_parent: str | None
    reason: str | None
    allow_full_gpu: bool = True
    max_runtime: float | None = None
    max_gpu_equivalents: float | None = None
    aggregate: AggregateLimits | None = None
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)
    # layers in force that expire, and layers skipped because they have expired
    expiries: tuple[Expiry, ...] = ()
    expired: tuple[Expiry, ...] = ()
    resolved_at: datetime | None = field(default=None, compare=False)

    def notices(self, warn_days: int = EXPIRY_WARN_DAYS) -> list[str]:
        """Warnings for the user (spawn page, CLI, notebook): limits that expired, or that
        expire within `warn_days` of when these were resolved."""
        now = self.resolved_at or datetime.now(UTC)
        found = (e.notice(now, warn_days) for e in (*self.expired, *self.expiries))
        return [text for text in found if text]

    @property
    def gpus_per_container(self) -> int | None:
        """The effective per-container cap: the tighter of the two GPU limits."""
        caps = [c for c in (self.max_gpus, self.max_gpus_per_container) if c is not None]
        return min(caps) if caps else None

    def docker_args(self) -> list[str]:
        """`docker run` arguments enforcing these limits (swap disabled: memory-swap = memory)."""
        args = []
        if self.max_cpus is not None:
            args.append(f"--cpus={self.max_cpus:g}")
        if self.memory is not None:
            args += [f"--memory={format_size(self.memory)}"]
            args += [f"--memory-swap={format_size(self.memory)}"]
        if self.shm_size is not None:
            args.append(f"--shm-size={format_size(self.shm_size)}")
        if self.ipc_mode is not None:
            args.append(f"--ipc={self.ipc_mode}")
        if self.pids_limit is not None:
            args.append(f"--pids-limit={self.pids_limit}")
        if self.cgroup_parent is not None:
            args.append(f"--cgroup-parent={self.cgroup_parent}")
        return args

    def host_config(self) -> dict[str, Any]:
        """docker-py keyword arguments (containers.create / create_host_config) for these limits:
        the one map from limits to a container's HostConfig (`api_host_config` names the same
        entries as the Engine API does)."""
        config: dict[str, Any] = {}
        if self.max_cpus is not None:
            config["nano_cpus"] = int(round(self.max_cpus * 1e9))
        if self.memory is not None:
            config["mem_limit"] = self.memory
            config["memswap_limit"] = self.memory
        if self.shm_size is not None:
            config["shm_size"] = self.shm_size
        if self.ipc_mode is not None:
            config["ipc_mode"] = self.ipc_mode
        if self.pids_limit is not None:
            config["pids_limit"] = self.pids_limit
        if self.cgroup_parent is not None:
            config["cgroup_parent"] = self.cgroup_parent
        return config

    def api_host_config(self) -> dict[str, Any]:
        """`host_config()` in the Engine API's HostConfig names (`NanoCpus`, `Memory`, ...):
        what the Docker proxy enforces and what a created container's inspect document shows."""
        return {HOST_CONFIG_FIELDS[key]: value for key, value in self.host_config().items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: numbers in bytes/seconds, plus human spellings under `display`."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["allowed_images"] = list(self.allowed_images) if self.allowed_images else None
        data["sources"] = dict(self.sources)
        data["expiries"] = [e.to_dict() for e in self.expiries]
        data["expired"] = [e.to_dict() for e in self.expired]
        data["notices"] = self.notices()
        data["resolved_at"] = self.resolved_at.isoformat() if self.resolved_at else None
        data["display"] = dict(self.display_rows())
        return data

    def display_rows(self) -> list[tuple[str, str]]:
        """(label, text) rows in the order DS01's `get_resource_limits` prints them."""
        return [(label, text) for label, text, _ in self.source_rows()]

    def source_rows(self) -> list[tuple[str, str, str]]:
        """(label, text, where the value came from) rows; the source is '' for rows that are
        not one limit (the user, the group, the expiries)."""

        def size(n: int | None) -> str:
            return "unlimited" if n is None else format_size(n)

        def duration(s: float | None, none: str) -> str:
            return none if s is None else format_duration(s)

        def count(n: int | str | None) -> str:
            return "unlimited" if n is None else str(n)

        equivalents = self.max_gpu_equivalents
        per_container = "max_gpus_per_container"
        if self.max_gpus_per_container is None or (
            self.max_gpus is not None and self.max_gpus < self.max_gpus_per_container
        ):
            per_container = "max_gpus"
        rows = [
            ("User", self.user, ""),
            ("Group", f"{self.group or '-'} ({self.group_reason})", ""),
            ("Priority", str(self.priority), "priority"),
            ("Max GPUs", count(self.max_gpus), "max_gpus"),
            ("Max GPUs per Container", count(self.gpus_per_container), per_container),
            (
                "Max GPU Equivalents",
                count(None if equivalents is None else f"{equivalents:g}"),
                "max_gpu_equivalents",
            ),
            (
                "Whole GPUs Allowed",
                "yes" if self.allow_full_gpu else "no (MIG instances only)",
                "allow_full_gpu",
            ),
            (
                "Max CPUs",
                "unlimited" if self.max_cpus is None else f"{self.max_cpus:g}",
                "max_cpus",
            ),
            ("Memory", size(self.memory), "memory"),
            (
                "Shared Memory",
                "default" if self.shm_size is None else size(self.shm_size),
                "shm_size",
            ),
            ("IPC Mode", self.ipc_mode or "default", "ipc_mode"),
            ("PIDs Limit", count(self.pids_limit), "pids_limit"),
            ("Max Containers", count(self.max_containers_per_user), "max_containers_per_user"),
            ("Idle Timeout", duration(self.idle_timeout, "never"), "idle_timeout"),
            ("Max Runtime", duration(self.max_runtime, "unlimited"), "max_runtime"),
            (
                "GPU Hold After Stop",
                duration(self.gpu_hold_after_stop, "until removed"),
                "gpu_hold_after_stop",
            ),
            (
                "Container Hold After Stop",
                duration(self.container_hold_after_stop, "never removed"),
                "container_hold_after_stop",
            ),
            (
                "Allowed Images",
                ", ".join(self.allowed_images) if self.allowed_images else "any",
                "allowed_images",
            ),
        ]
        aggregate = self.aggregate.describe() if self.aggregate else "none"
        rows.append(("Aggregate (all containers)", aggregate, "aggregate"))
        if self.reason:
            rows.append(("Reason", self.reason, ""))
        for expiry in self.expiries:
            rows.append(("Expires", f"{expiry.source}: after {expiry.expires} (UTC)", ""))
        for expiry in self.expired:
            rows.append(("Expired", f"{expiry.source}: on {expiry.expires}, not applied", ""))
        return [(label, text, self.sources.get(name, "")) for label, text, name in rows]


# --------------------------------------------------------------------------------------------
# Policies and GPU allocation


@dataclass(frozen=True)
class Policies:
    """System-wide rules. `preempt_running`: a higher priority may take a running container's
    GPU (off by default: only slots held by stopped containers are reclaimed)."""

    preempt_running: bool = False
    max_containers_per_user: int | None = None
    # High demand (DS01): above this share of GPU slots allocated, idle timeouts shrink by
    # `high_demand_idle_reduction` (0.5: halved); None = never.
    high_demand_threshold: float | None = None
    high_demand_idle_reduction: float = 0.5
    # How long a `.keep-alive` file in the workspace holds off idle culling past its due
    # time at most; None = the file is ignored.
    keepalive_max_duration: float | None = 24 * 3600.0


@dataclass(frozen=True)
class SimulatedGpuSpec:
    """One GPU of a simulated inventory; `mig` lists its MIG instances' profiles
    (None = MIG mode off)."""

    name: str = "NVIDIA H100 80GB HBM3"
    memory_mb: int = 81559
    mig: tuple[str, ...] | None = None


@dataclass(frozen=True)
class SimulateConfig:
    """`gpu_allocation.simulate`: a declared inventory for machines without NVIDIA GPUs.
    `seed` makes the simulated UUIDs stable across restarts (containers' labels stay valid)."""

    gpus: tuple[SimulatedGpuSpec, ...]
    seed: str = "ds01hub"


@dataclass(frozen=True)
class FairShareConfig:
    """`gpu_allocation.fairshare` (Slurm's fair share): recent GPU-hours, decayed with
    `half_life` seconds, lower a user's effective priority; `weight` is the most it adds
    (a user with no recent use gets all of it); `shares` weighs groups (default 1 each)."""

    half_life: float = 7 * 86400.0
    weight: float = 10.0
    shares: Mapping[str, float] = field(default_factory=dict)

    def share(self, group: str | None) -> float:
        """A group's share; users in no group share one pool."""
        return self.shares.get(group, 1.0) if group is not None else 1.0


@dataclass(frozen=True)
class GpuAllocationConfig:
    """`gpu_allocation`: whether MIG instances are handed out, the expected MIG profile,
    the placement strategy (`spread`: least-allocated GPU first; `pack`: fill GPUs up),
    an optional simulated inventory, and fair share (None: off, configured priority only)."""

    enable_mig: bool = True
    mig_profile: str | None = None
    strategy: str = "spread"
    simulate: SimulateConfig | None = None
    fairshare: FairShareConfig | None = None


def _read_simulate(
    value: Any, path: KeyPath, default_profile: str | None, out: _Collector
) -> SimulateConfig | None:
    """`simulate: {gpus: [...] | N, seed: ...}`; each GPU `{name, memory, mig: [..] | N, count}`.
    At most MAX_SIMULATED_GPUS GPUs, each with a MIG layout a real GPU could hold."""
    value = _mapping(value, path, out, "use simulate: {gpus: [{mig: [2g.20gb]}]}")
    if value is None:
        return None
    known = {"gpus", "seed"}
    for key in value:
        if key not in known:
            out.unknown_key(path + (key,), key, known)
    seed = value.get("seed", "ds01hub")
    if not (isinstance(seed, str) and 0 < len(seed) <= MAX_NAME) and not (
        _whole(seed) and seed.bit_length() <= 64
    ):
        out.problem(path + ("seed",), seed, "bad seed", "use a short text such as 'lab-demo'")
        seed = "ds01hub"
    gpus_path = path + ("gpus",)
    gpus_value = value.get("gpus")
    gpus_fix = "use gpus: 8, or gpus: [{name: 'NVIDIA A100-SXM4-80GB', memory: 80g, mig: 3}]"
    if _whole(gpus_value):
        if not 1 <= gpus_value <= MAX_SIMULATED_GPUS:
            out.problem(
                gpus_path,
                gpus_value,
                f"a simulated GPU count outside 1..{MAX_SIMULATED_GPUS}",
                gpus_fix,
                "out-of-range",
            )
            return None
        return SimulateConfig(tuple(SimulatedGpuSpec() for _ in range(gpus_value)), str(seed))
    if not isinstance(gpus_value, list) or not gpus_value:
        out.problem(
            gpus_path,
            gpus_value if "gpus" in value else _NOTHING,
            "must be a GPU count or a non-empty list of GPUs",
            gpus_fix,
            "wrong-type",
        )
        return None
    specs: list[SimulatedGpuSpec] = []
    for i, gpu in enumerate(gpus_value):
        spec, count = _read_simulated_gpu(gpu, gpus_path + (i,), default_profile, out)
        if spec is not None:
            specs.extend([spec] * count)
        if len(specs) > MAX_SIMULATED_GPUS:
            out.problem(
                gpus_path,
                _NOTHING,
                f"more than {MAX_SIMULATED_GPUS} simulated GPUs",
                f"simulate at most {MAX_SIMULATED_GPUS} GPUs (lower the counts)",
                "out-of-range",
            )
            return None
    return SimulateConfig(tuple(specs), str(seed))


def _read_simulated_gpu(
    gpu: Any, path: KeyPath, default_profile: str | None, out: _Collector
) -> tuple[SimulatedGpuSpec | None, int]:
    """One entry of `simulate.gpus`: the spec and how many GPUs it stands for."""
    if gpu is None:
        gpu = {}
    gpu = _mapping(gpu, path, out, "use {name: ..., memory: 80g, mig: 3, count: 1}")
    if gpu is None:
        return None, 0
    gpu_keys = {"name", "memory", "mig", "count"}
    for key in gpu:
        if key not in gpu_keys:
            out.unknown_key(path + (key,), key, gpu_keys)
    name = gpu.get("name", SimulatedGpuSpec.name)
    if not isinstance(name, str) or not 0 < len(name) <= 96 or not name.isprintable():
        out.problem(path + ("name",), name, "bad GPU name", "use a name such as 'NVIDIA H100'")
        name = SimulatedGpuSpec.name
    memory_mb = SimulatedGpuSpec.memory_mb
    if "memory" in gpu:
        memory_mb = _read_gpu_memory(gpu["memory"], path + ("memory",), out) or memory_mb
    profiles = _read_mig(gpu.get("mig"), path + ("mig",), default_profile, out)
    if profiles:
        _check_mig_capacity(profiles, memory_mb, model_compute_slices(name), path + ("mig",), out)
    count = gpu.get("count", 1)
    if not _whole(count) or not 1 <= count <= MAX_SIMULATED_GPUS:
        out.problem(
            path + ("count",),
            count,
            f"a GPU count outside 1..{MAX_SIMULATED_GPUS}",
            f"use a whole number from 1 to {MAX_SIMULATED_GPUS}",
            "out-of-range" if _whole(count) else "wrong-type",
        )
        count = 1
    return SimulatedGpuSpec(name, memory_mb, profiles), count


def _read_gpu_memory(value: Any, path: KeyPath, out: _Collector) -> int | None:
    fix = f"use a size from {format_size(MIN_GPU_MEMORY)} to {format_size(MAX_GPU_MEMORY)}: 80g"
    try:
        size = parse_size(value)
    except UnitError:
        out.problem(path, value, "not a size", fix, "wrong-type")
        return None
    if not MIN_GPU_MEMORY <= size <= MAX_GPU_MEMORY:
        out.problem(path, value, "GPU memory out of range", fix, "out-of-range")
        return None
    return size >> 20


def _read_mig(
    mig: Any, path: KeyPath, default_profile: str | None, out: _Collector
) -> tuple[str, ...] | None:
    """`mig: 3` (that many `mig_profile` instances) or `mig: [2g.20gb, 1g.10gb]`."""
    if mig is None:
        return None
    fix = f"use a count from 1 to {MIG_COMPUTE_SLICES} or a list such as [2g.20gb, 1g.10gb]"
    if _whole(mig):
        if not 1 <= mig <= MIG_COMPUTE_SLICES:
            out.problem(
                path,
                mig,
                f"a GPU has 1 to {MIG_COMPUTE_SLICES} MIG instances",
                fix,
                "out-of-range",
            )
            return None
        if not default_profile:
            out.problem(
                path,
                mig,
                "a MIG instance count needs gpu_allocation.mig_profile",
                "set mig_profile: 2g.20gb, or list the profiles: mig: [2g.20gb, 2g.20gb]",
                "missing",
            )
            return None
        return (default_profile,) * mig
    if not isinstance(mig, list) or not mig:
        out.problem(path, mig, "bad MIG layout", fix, "wrong-type")
        return None
    if len(mig) > MIG_COMPUTE_SLICES:
        out.problem(path, mig, f"more than {MIG_COMPUTE_SLICES} MIG instances", fix, "mig-capacity")
        return None
    bad = [p for p in mig if not is_profile(p)]
    if bad:
        out.problem(
            path,
            bad,
            "bad MIG profile",
            f"use NVIDIA's profile names: {PROFILE_FORM}",
        )
        return None
    return tuple(mig)


def _check_mig_capacity(
    profiles: tuple[str, ...], memory_mb: int, slices_of_gpu: int, path: KeyPath, out: _Collector
) -> None:
    """What a MIG-capable GPU can hold: its compute slices (7; an A30 4), its memory in 8
    slices; a profile's memory (its name's GB, rounded as NVIDIA rounds it) fits in the GPU's."""
    compute = memory_slices = 0
    for profile in profiles:
        parsed = parse_profile(profile)
        assert parsed is not None  # checked by _read_mig
        slices, gigabytes = parsed.slices, parsed.gigabytes
        if gigabytes * 1024 > memory_mb * 1.05:
            out.problem(
                path,
                profile,
                f"{profile} needs {gigabytes}g but the GPU has {format_size(memory_mb << 20)}",
                "use a smaller profile, or give the GPU its real memory (memory: 80g)",
                "mig-capacity",
            )
            return
        compute += slices
        memory_slices += max(1, round(gigabytes * 1024 * MIG_MEMORY_SLICES / memory_mb))
    if compute > slices_of_gpu or memory_slices > MIG_MEMORY_SLICES:
        out.problem(
            path,
            list(profiles),
            f"these MIG instances need {compute} of this GPU's {slices_of_gpu} compute slices "
            f"and {memory_slices} of its {MIG_MEMORY_SLICES} memory slices",
            "use fewer or smaller instances (on an 80 GB GPU: 7 x 1g.10gb, 3 x 2g.20gb, "
            "2 x 3g.40gb or 1 x 7g.80gb; on a 24 GB A30: 4 x 1g.6gb, 2 x 2g.12gb or 1 x "
            "4g.24gb)",
            "mig-capacity",
        )


def _read_gpu_allocation(section: Any, out: _Collector) -> GpuAllocationConfig:
    path: KeyPath = ("gpu_allocation",)
    section = _mapping(section, path, out, "indent its keys under gpu_allocation:")
    if section is None:
        return GpuAllocationConfig()
    known = {"enable_mig", "mig_profile", "strategy", "simulate", "fairshare"}
    for key in section:
        if key in DS01_UNENFORCED_GPU:
            out.warn(path + (key,), "DS01 key accepted but not enforced by ds01hub")
        elif key not in known:
            out.unknown_key(path + (key,), key, known | DS01_UNENFORCED_GPU)
    enable_mig = section.get("enable_mig", True)
    if not isinstance(enable_mig, bool):
        out.problem(path + ("enable_mig",), enable_mig, "bad value", "use true or false")
        enable_mig = True
    profile = section.get("mig_profile")
    if profile is not None and not is_profile(profile):
        out.problem(
            path + ("mig_profile",),
            profile,
            "bad MIG profile",
            f"use NVIDIA's profile name: {PROFILE_FORM}",
        )
        profile = None
    given = section.get("strategy", "spread")
    strategy = STRATEGY_ALIASES.get(given, given) if isinstance(given, str) else None
    if strategy not in STRATEGIES:
        out.problem(
            path + ("strategy",),
            given,
            "unknown strategy",
            "use spread (least-allocated GPU first) or pack (fill a GPU before the next)",
        )
        strategy = "spread"
    simulate = None
    if section.get("simulate") is not None:
        simulate = _read_simulate(section["simulate"], path + ("simulate",), profile, out)
    fairshare = None
    if "fairshare" in section:
        fairshare = _read_fairshare(section["fairshare"], path + ("fairshare",), out)
    return GpuAllocationConfig(enable_mig, profile, strategy, simulate, fairshare)


def _read_number(value: Any, low: float, high: float, fix: str) -> float:
    """A finite number in [low, high] (0 < low means above 0)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _Bad("not a number", fix, "wrong-type")
    if not low <= value <= high:
        raise _Bad(f"outside {low:g}..{high:g}", fix, "out-of-range")
    return float(value)


def _read_fairshare(section: Any, path: KeyPath, out: _Collector) -> FairShareConfig | None:
    """`fairshare: {half_life: 7d, weight: 10, shares: {GROUP: N}}`; null or {} turns it on
    with the defaults. Group names are checked against `groups` in `_check_fairshare_groups`."""
    if section is None:
        return FairShareConfig()
    section = _mapping(section, path, out, "indent half_life, weight and shares under fairshare:")
    if section is None:
        return None
    known = {"half_life", "weight", "shares"}
    for key in section:
        if key not in known:
            out.unknown_key(path + (key,), key, known)
    defaults = FairShareConfig()
    values: dict[str, Any] = {}
    readers: dict[str, Callable[[Any], float | None]] = {
        "half_life": _read_half_life,
        "weight": lambda v: _read_number(
            v, 0.0, MAX_FAIRSHARE_WEIGHT, f"use a number from 0 to {MAX_FAIRSHARE_WEIGHT:g}"
        ),
    }
    for key, read in readers.items():
        if key in section:
            try:
                values[key] = read(section[key])
            except _Bad as bad:
                out.problem(
                    path + (key,), section[key], f"bad value: {bad.message}", bad.fix, bad.code
                )
    shares = _read_shares(section.get("shares"), path + ("shares",), out)
    return FairShareConfig(
        values.get("half_life", defaults.half_life), values.get("weight", defaults.weight), shares
    )


def _read_half_life(value: Any) -> float:
    seconds = _read_duration(value)
    if not seconds:
        raise _Bad("0 or null decays nothing", "use a duration such as 7d or 36h", "out-of-range")
    if seconds < 60:
        raise _Bad("below the minimum of 1m", "use a duration such as 7d or 36h", "out-of-range")
    return seconds


def _read_shares(value: Any, path: KeyPath, out: _Collector) -> dict[str, float]:
    section = _mapping(value, path, out, "indent GROUP: NUMBER lines under shares:")
    shares: dict[str, float] = {}
    for group, share in (section or {}).items():
        fix = f"use a number above 0 and up to {MAX_SHARE:g} (a group's weight among groups)"
        try:
            shares[group] = _read_number(share, 0.0, MAX_SHARE, fix)
            if shares[group] == 0:
                raise _Bad("0 gives the group no share at all", fix, "out-of-range")
        except _Bad as bad:
            shares.pop(group, None)
            out.problem(path + (group,), share, f"bad value: {bad.message}", bad.fix, bad.code)
    return shares


def _check_fairshare_groups(
    gpu_allocation: GpuAllocationConfig, groups: Mapping[str, Group], out: _Collector
) -> None:
    """Every group given a share is defined under `groups` (a typo would silently get 1)."""
    fairshare = gpu_allocation.fairshare
    for name in fairshare.shares if fairshare else ():
        if name not in groups:
            names = ", ".join(short_repr(g) for g in list(groups)[:10])
            out.problem(
                ("gpu_allocation", "fairshare", "shares", name),
                name,
                "names no group defined under groups",
                f"use one of: {names}" if names else "define the group under groups first",
                "unknown-group",
            )


_POLICY_MAX_CONTAINERS = _count_reader(1, MAX_CONTAINERS, "allows nothing")


def _read_policies(section: Any, out: _Collector) -> Policies:
    path: KeyPath = ("policies",)
    section = _mapping(section, path, out, "indent its keys under policies:")
    if section is None:
        return Policies()
    known = {"preempt_running", "max_containers_per_user", *_DEMAND_KEYS}
    for key in section:
        if key in DS01_UNENFORCED_POLICIES:
            out.warn(path + (key,), "DS01 key accepted but not enforced by ds01hub")
        elif key not in known:
            out.unknown_key(path + (key,), key, known | DS01_UNENFORCED_POLICIES)
    preempt = section.get("preempt_running", False)
    if not isinstance(preempt, bool):
        out.problem(path + ("preempt_running",), preempt, "bad value", "use true or false")
        preempt = False
    max_containers = section.get("max_containers_per_user")
    try:
        max_containers = _POLICY_MAX_CONTAINERS(max_containers)
    except _Bad as bad:
        key_path = path + ("max_containers_per_user",)
        out.problem(key_path, max_containers, f"bad value: {bad.message}", bad.fix, bad.code)
        max_containers = None
    demand: dict[str, Any] = {}
    for key, read in _DEMAND_KEYS.items():
        if key in section:
            try:
                demand[key] = read(section[key])
            except _Bad as bad:
                out.problem(path + (key,), section[key], f"bad value: {bad.message}", bad.fix)
    return Policies(preempt, max_containers, **demand)


def _share_reader(low: float, high: float, nothing: str) -> Callable[[Any], float | None]:
    """A share (0.8 = 80 %) from `low` to `high`; null means `nothing`."""
    fix = f"use a number from {low:g} to {high:g} such as 0.8 (80 %), or null for {nothing}"

    def read(value: Any) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Bad("not a number", fix, "wrong-type")
        if not (math.isfinite(value) and low <= value <= high):
            raise _Bad(f"outside {low:g}..{high:g}", fix, "out-of-range")
        return float(value)

    return read


def _read_reduction(value: Any) -> float:
    read = _share_reader(0.0, 0.95, "")(value)
    if read is None:
        raise _Bad("null", "use a share from 0 to 0.95 such as 0.5 (halved)", "wrong-type")
    return read


_DEMAND_KEYS: dict[str, Callable[[Any], Any]] = {
    "high_demand_threshold": _share_reader(0.0, 1.0, "never"),
    "high_demand_idle_reduction": _read_reduction,
    "keepalive_max_duration": _read_duration,
}


# --------------------------------------------------------------------------------------------
# The whole file


@dataclass(frozen=True)
class Group:
    name: str
    members: tuple[str, ...]
    limits: Mapping[str, Any]
    description: str | None = None


@dataclass(frozen=True)
class LimitsConfig:
    """A validated limits file. `resolve()` is pure and cheap (called on every spawn)."""

    path: str
    defaults: Mapping[str, Any]
    groups: Mapping[str, Group]  # in file order (ties in priority go to the first listed)
    user_overrides: Mapping[str, Mapping[str, Any]]
    policies: Policies
    gpu_allocation: GpuAllocationConfig
    default_group: str | None = None
    warnings: tuple[str, ...] = ()

    def group_priority(self, name: str) -> int:
        group = self.groups[name]
        return group.limits.get("priority", self.defaults.get("priority", _builtin("priority")))

    def groups_of(self, user: str, extra_groups: Iterable[str] = ()) -> list[str]:
        """The configured groups the user belongs to: YAML members plus the caller's groups
        (JupyterHub or Unix groups) that the file defines, in file order."""
        extra = set(extra_groups)
        return [
            name for name, group in self.groups.items() if user in group.members or name in extra
        ]

    def _choose_group(self, user: str, extra_groups: Iterable[str]) -> tuple[str | None, str]:
        candidates = self.groups_of(user, extra_groups)
        if not candidates:
            if self.default_group:
                return self.default_group, "in no configured group: default_group"
            return None, "in no configured group: defaults apply"
        if len(candidates) == 1:
            listed = user in self.groups[candidates[0]].members
            return candidates[0], "YAML members list" if listed else "caller groups"
        best = max(candidates, key=self.group_priority)  # max() keeps the first among equals
        listing = ", ".join(f"{g} ({self.group_priority(g)})" for g in candidates)
        return best, f"highest priority of {listing}; ties go to the first listed"

    def resolve(
        self,
        user: str,
        groups: Iterable[str] = (),
        now: datetime | None = None,
        hub_groups: Iterable[HubGroupLimits] = (),
    ) -> ResolvedLimits:
        """Field by field: user_overrides > the user's JupyterHub group properties (`hub_groups`:
        those of the user's groups, already validated) > chosen YAML group > defaults >
        policies > built-ins. A layer past its `expires` date (at `now`, default the clock's)
        is skipped whole."""
        now = now or datetime.now(UTC)
        group, group_reason = self._choose_group(user, groups)
        override = self.user_overrides.get(user, {})
        expiries: list[Expiry] = []
        expired: list[Expiry] = []
        layers: list[tuple[str, Mapping[str, Any]]] = []
        if override.get("expires") is not None:
            expiry = Expiry(f"user_overrides.{user}", override["expires"])
            (expired if expiry.expired(now) else expiries).append(expiry)
            if expiry.expired(now):
                override = {}
        layers.append((f"user_overrides.{user}", override))
        hub = self._choose_hub_group(hub_groups, now, expiries, expired)
        if hub is not None:
            layers.append((f"hub_groups.{hub.name}", hub.limits))
            group_reason += f"; JupyterHub group {hub.name}'s properties over it"
            group = group or hub.name
        if group and group in self.groups:
            layers.append((f"groups.{group}", self.groups[group].limits))
        layers.append(("defaults", self.defaults))
        if self.policies.max_containers_per_user is not None:
            layers.append(
                ("policies", {"max_containers_per_user": self.policies.max_containers_per_user})
            )
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for name, spec in LIMIT_FIELDS.items():
            for source, layer in layers:
                if name in layer:
                    values[name], sources[name] = layer[name], source
                    break
            else:
                values[name], sources[name] = spec.builtin, "built-in"
        aggregate = values["aggregate"]
        tighter = aggregate is not None and aggregate.gpus is not None
        if tighter and (values["max_gpus"] is None or aggregate.gpus < values["max_gpus"]):
            values["max_gpus"] = aggregate.gpus
            sources["max_gpus"] = f"{sources['aggregate']}.aggregate.gpu_limit"
        if values["ipc_mode"] == "host" and values["shm_size"] is not None:
            # A user's override and their (caller-supplied) group can still meet here; the
            # host's /dev/shm is what ipc_mode host means, so shm_size goes.
            values["shm_size"], sources["shm_size"] = None, "dropped: ipc_mode host"
        return ResolvedLimits(
            user=user,
            group=group,
            group_reason=group_reason,
            reason=override.get("reason") or (hub.reason if hub else None),
            sources=sources,
            expiries=tuple(expiries),
            expired=tuple(expired),
            resolved_at=now,
            **values,
        )

    def _choose_hub_group(
        self,
        hub_groups: Iterable[HubGroupLimits],
        now: datetime,
        expiries: list[Expiry],
        expired: list[Expiry],
    ) -> HubGroupLimits | None:
        """The hub group whose properties apply: of those not expired, the highest priority
        (its own, else its YAML group's, else the defaults'); ties go to the first given."""
        live: list[HubGroupLimits] = []
        for hub in hub_groups:
            expiry = hub.expiry
            if expiry is not None and expiry.expired(now):
                expired.append(expiry)
            else:
                live.append(hub)
        if not live:
            return None

        def priority(hub: HubGroupLimits) -> int:
            if "priority" in hub.limits:
                return hub.limits["priority"]
            if hub.name in self.groups:
                return self.group_priority(hub.name)
            return self.defaults.get("priority", _builtin("priority"))

        chosen = max(live, key=priority)  # max() keeps the first among equals
        if chosen.expiry is not None:
            expiries.append(chosen.expiry)
        return chosen

    def expired_overrides(self, now: datetime) -> list[tuple[str, Expiry]]:
        """(user, expiry) of every override past its date: for the event log."""
        found = []
        for user, override in self.user_overrides.items():
            if override.get("expires") is not None:
                expiry = Expiry(f"user_overrides.{user}", override["expires"])
                if expiry.expired(now):
                    found.append((user, expiry))
        return found


@dataclass(frozen=True)
class HubGroupLimits:
    """A JupyterHub group's limits: its `properties["ds01"]`, checked by the same readers, with
    the same messages, as a YAML group (`parse_group_properties`)."""

    name: str
    limits: Mapping[str, Any]
    expires: date | None = None
    reason: str | None = None

    @property
    def expiry(self) -> Expiry | None:
        return Expiry(f"hub_groups.{self.name}", self.expires) if self.expires else None


def parse_group_properties(name: str, properties: Any) -> HubGroupLimits | None:
    """The limits in a JupyterHub group's `properties` (edited in the admin panel or over
    `PUT /hub/api/groups/NAME/properties`): None when it has no `ds01` key; LimitsError
    listing every problem (file `JupyterHub group NAME properties`, key path `ds01.KEY`) when
    any value is wrong, so a bad property is never half-applied."""
    if not isinstance(properties, Mapping) or HUB_PROPERTY not in properties:
        return None
    file = f"JupyterHub group {short_repr(name, 80)} properties"

    def check() -> HubGroupLimits:
        out = _Collector(file, lambda path: None)
        path: KeyPath = (HUB_PROPERTY,)
        section = properties[HUB_PROPERTY]
        limits = _read_limits_section(section, path, out, extra_keys={"reason", "expires"})
        _check_combination(limits, path, out)
        reason = expires = None
        if isinstance(section, Mapping):
            reason = _read_text(section.get("reason"), path + ("reason",), out)
            expires = _read_expires_key(section, path, out)
        if out.problems:
            raise LimitsError(out.all_problems())
        return HubGroupLimits(name, limits, expires, reason)

    return _guarded(file, check)


def _builtin(name: str) -> Any:
    return LIMIT_FIELDS[name].builtin


TOP_LEVEL_KEYS = {"defaults", "groups", "user_overrides", "policies", "gpu_allocation"}


def _name_problem(value: Any, what: str) -> tuple[str, str] | None:
    """Why `value` cannot be a user or group name (message, fix), or None. Names are text as
    JupyterHub, PAM and LDAP spell them (`h.baker@hertie-school.lan` is fine); YAML's
    nothing (`~`, `null`, an empty key), numbers and yes/no are not names."""
    if value is None:
        return (
            f"an empty {what} name (YAML reads ~, null and an empty key as nothing)",
            f"write the {what} name, or remove the entry",
        )
    if not isinstance(value, str):
        return (
            f"a {what} name must be text (YAML read this as a {type(value).__name__})",
            "put the name in quotes, e.g. '12345' or 'yes'",
        )
    if not 0 < len(value) <= MAX_NAME:
        return f"a {what} name of 1 to {MAX_NAME} characters", f"write the {what}'s name"
    if not value.isprintable() or any(c.isspace() for c in value):
        return f"a {what} name with spaces or control characters", "write the name without them"
    if not any(c.isalnum() for c in value):
        return f"a {what} name without a letter or digit", f"write the {what}'s real name"
    return None


def _read_text(value: Any, path: KeyPath, out: _Collector) -> str | None:
    """A reason or description: short text (a number is shown as written)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        out.problem(path, value, "must be a text", "write it in quotes", "wrong-type")
        return None
    text = value if isinstance(value, str) else short_repr(value)
    if len(text) > MAX_TEXT:
        out.problem(path, value, f"longer than {MAX_TEXT} characters", "shorten it", "too-long")
        return None
    return text


def _read_members(value: Any, path: KeyPath, out: _Collector) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        out.problem(path, value, "must be a list of user names", "[alice, bob]", "wrong-type")
        return ()
    first_index: dict[str, int] = {}
    for i, member in enumerate(value):
        bad = _name_problem(member, "user")
        if bad:
            out.problem(path + (i,), member, *bad, "bad-name")
        elif member in first_index:
            out.problem(
                path + (i,),
                member,
                f"member listed twice (also [{first_index[member]}])",
                f"remove the second {short_repr(member)}",
                "duplicate-member",
            )
        else:
            first_index[member] = i
    return tuple(first_index)


def _read_groups(section: Any, out: _Collector) -> dict[str, Group]:
    section = _mapping(section, ("groups",), out, "use groups: {students: {members: [alice]}}")
    if section is None:
        return {}
    groups: dict[str, Group] = {}
    first_group_of: dict[str, str] = {}
    for name, body in section.items():
        path: KeyPath = ("groups", name)
        bad = _name_problem(name, "group")
        if bad:
            out.problem(path, name, *bad, "bad-name")
            continue
        body = _mapping({} if body is None else body, path, out, "give it members: [...]")
        if body is None:
            continue
        members = _read_members(body.get("members"), path + ("members",), out)
        for member in members:
            other = first_group_of.setdefault(member, name)
            if other != name:
                out.warn(
                    path + ("members",),
                    f"{short_repr(member)} is also in {short_repr(other)}: a user in several "
                    "groups gets the one with the highest priority (ties: the first listed)",
                )
        limits = _read_limits_section(body, path, out, extra_keys={"members", "description"})
        _check_combination(limits, path, out)
        description = _read_text(body.get("description"), path + ("description",), out)
        groups[name] = Group(name, members, limits, description)
    return groups


def _read_expires_key(body: Mapping, path: KeyPath, out: _Collector) -> date | None:
    try:
        return _read_expires(body.get("expires"))
    except _Bad as bad:
        message = f"invalid expires: {bad.message}"
        out.problem(path + ("expires",), body.get("expires"), message, bad.fix, bad.code)
        return None


def _read_overrides(section: Any, out: _Collector) -> dict[str, dict[str, Any]]:
    section = _mapping(section, ("user_overrides",), out, "use user_overrides: {alice: {...}}")
    if section is None:
        return {}
    overrides: dict[str, dict[str, Any]] = {}
    for user, body in section.items():
        path: KeyPath = ("user_overrides", user)
        bad = _name_problem(user, "user")
        if bad:
            out.problem(path, user, *bad, "bad-name")
            continue
        limits = _read_limits_section(body, path, out, extra_keys={"reason", "expires"})
        _check_combination(limits, path, out)
        if isinstance(body, Mapping):
            reason = _read_text(body.get("reason"), path + ("reason",), out)
            if reason is not None:
                limits["reason"] = reason
            expires = _read_expires_key(body, path, out)
            if expires is not None:
                limits["expires"] = expires
        overrides[user] = limits
    return overrides


def _check_combination(limits: Mapping[str, Any], path: KeyPath, out: _Collector) -> None:
    """Combinations Docker refuses, caught in the file rather than at container start."""
    if limits.get("ipc_mode") == "host" and limits.get("shm_size") is not None:
        out.problem(
            path + ("shm_size",),
            format_size(limits["shm_size"]),
            "shm_size cannot be combined with ipc_mode: host (Docker refuses both: the host's "
            "/dev/shm is used)",
            "remove shm_size, or use ipc_mode: private/shareable",
            "conflict",
        )


def _check_resolved_combinations(
    defaults: Mapping[str, Any],
    groups: Mapping[str, Group],
    overrides: Mapping[str, Mapping[str, Any]],
    out: _Collector,
) -> None:
    """shm_size + ipc_mode host can also arise across layers (defaults set shm_size, a group
    sets ipc_mode: host); report the section that completes the clash."""
    layers: list[tuple[KeyPath, Mapping[str, Any]]] = [
        (("groups", n), g.limits) for n, g in groups.items()
    ]
    layers += [(("user_overrides", u), o) for u, o in overrides.items()]
    for path, layer in layers:
        merged = {**defaults, **layer}
        clash = merged.get("ipc_mode") == "host" and merged.get("shm_size") is not None
        reported = layer.get("ipc_mode") == "host" and layer.get("shm_size") is not None
        if clash and not reported:
            key = "ipc_mode" if "ipc_mode" in layer else "shm_size"
            out.problem(
                path + (key,),
                layer.get(key),
                "with the value inherited from defaults this gives ipc_mode: host together "
                "with shm_size, which Docker refuses",
                f"set shm_size: null in {format_key_path(path)}, or use ipc_mode: "
                "private/shareable",
                "conflict",
            )


def _validate(data: Any, file: str, line_of: Callable[[KeyPath], int | None]) -> LimitsConfig:
    out = _Collector(file, line_of)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        out.problem(
            (), data, "the file must be a YAML mapping", "start with 'defaults:'", "wrong-type"
        )
        raise LimitsError(out.all_problems())
    known_top = TOP_LEVEL_KEYS | {"default_group"}
    for key in data:
        if key in DS01_UNENFORCED_TOP:
            out.warn((key,), "DS01 section accepted but not used by ds01hub")
        elif key not in known_top:
            out.unknown_key((key,), key, known_top)
    defaults = _read_limits_section(data.get("defaults"), ("defaults",), out)
    _check_combination(defaults, ("defaults",), out)
    groups = _read_groups(data.get("groups"), out)
    overrides = _read_overrides(data.get("user_overrides"), out)
    policies = _read_policies(data.get("policies"), out)
    gpu_allocation = _read_gpu_allocation(data.get("gpu_allocation"), out)
    default_group = data.get("default_group")
    if default_group is not None and not (
        isinstance(default_group, str) and default_group in groups
    ):
        names = ", ".join(short_repr(name) for name in list(groups)[:10])
        out.problem(
            ("default_group",),
            default_group,
            "names no group defined under groups",
            f"use one of: {names}" if names else "define the group under groups first",
            "unknown-group",
        )
        default_group = None
    _check_resolved_combinations(defaults, groups, overrides, out)
    _check_fairshare_groups(gpu_allocation, groups, out)
    if out.problems:
        raise LimitsError(out.all_problems())
    return LimitsConfig(
        path=file,
        defaults=defaults,
        groups=groups,
        user_overrides=overrides,
        policies=policies,
        gpu_allocation=gpu_allocation,
        default_group=default_group,
        warnings=out.all_warnings(),
    )


_Checked = TypeVar("_Checked")


def _guarded(file: str, check: Callable[[], _Checked]) -> _Checked:
    """The boundary: whatever goes wrong while checking a file is a LimitsError naming it,
    never a traceback into a spawn, a reload or a command."""
    try:
        return check()
    except LimitsError:
        raise
    except Exception as error:
        try:
            detail = short_repr(str(error), 120)[1:-1]
        except Exception:
            detail = ""
        raise LimitsError(
            [
                Problem(
                    file,
                    "",
                    "",
                    f"could not be checked ({type(error).__name__}: {detail})",
                    "run ds01hub check-config on it; if that shows no problem, report this as a "
                    "bug of ds01hub (with the file)",
                    None,
                    "internal-error",
                )
            ]
        ) from None


def parse_limits(data: Any, file: str = "<limits>") -> LimitsConfig:
    """Validate an already-parsed YAML document; raises LimitsError listing every problem."""
    return _guarded(file, lambda: _validate(data, file, lambda path: None))


def load_limits(path: str | os.PathLike) -> LimitsConfig:
    """Read and validate a limits file; raises LimitsError (with every problem) on any error."""
    file = str(path)
    return _guarded(file, lambda: _load(path, file))


def load_limits_or_defaults(given: str | os.PathLike | None = None) -> LimitsConfig:
    """The one behaviour for "no limits file", in every process and command: a file someone
    named (`given`: a setting or --limits; or $DS01HUB_LIMITS) must exist; when nobody named
    one and the default /etc/ds01hub/resource-limits.yaml does not exist, the built-in
    defaults are in force (no limits, no simulated GPUs). A file that exists is read strictly:
    any problem is a LimitsError."""
    path = paths.limits_path(given)
    if not paths.limits_named(given) and not path.exists():
        return parse_limits({}, file=f"(built-in defaults: {path} does not exist)")
    return load_limits(path)


def _load(path: str | os.PathLike, file: str) -> LimitsConfig:
    document = _read_document(path, file)
    return _validate(document.data, file, document.line_of)


def _read_document(path: str | os.PathLike, file: str) -> Document:
    def problem(message: str, fix: str, code: str, line: int | None = None, where: str = ""):
        return Problem(file, where, "", message, fix, line, code)

    try:
        return read_yaml_file(path)
    except FileNotFoundError:
        fix = (
            f"create it (see config/resource-limits.yaml) or point --limits / "
            f"${paths.ENV_LIMITS} at it"
        )
        raise LimitsError([problem("file not found", fix, "file-not-found")]) from None
    except OSError as error:
        message = f"cannot read: {error.strerror or type(error).__name__}"
        fix = "check the path and its permissions"
        raise LimitsError([problem(message, fix, "unreadable")]) from None
    except StrictYamlError as error:
        problems = [
            problem(p.message, p.fix, p.code, p.line, format_key_path(p.path))
            for p in error.problems[:MAX_PROBLEMS]
        ]
        if error.document is not None:  # only duplicate keys: the rest is checked all the same
            try:
                _validate(error.document.data, file, error.document.line_of)
            except LimitsError as more:
                problems += more.problems[: MAX_PROBLEMS - len(problems)]
        raise LimitsError(problems) from None


# --------------------------------------------------------------------------------------------
# The limits in force for a long-running process


@dataclass
class _Attempt:
    """One read of the file (for the file as `stamp` saw it), shared by everyone waiting."""

    stamp: tuple[int, int, int] | None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    finished: bool = False  # its outcome is in force (set under the store's lock)
    counted: bool = False  # counted in reload_failures already (a timeout, then a failure)


class LimitsStore:
    """The limits in force for a long-running process (the hub, the broker, the culler).

    `current` is always a valid configuration. `reload()` (threads) and `await refresh()`
    (event loops) re-read the file when it changed; the parse runs on the store's own thread
    and is waited for at most `parse_timeout` seconds, so a slow or hostile file never holds a
    caller longer (an event loop never at all). A reload that fails, or takes too long, keeps
    the last good configuration and is reported every way: `last_error` (the admin page),
    `last_problems`, `reload_failures` / `last_reload_ok` (the metrics) and one bounded record
    in `log`. A parse that outlives its time limit still finishes on the store's thread; its
    outcome (new configuration or problems) then replaces the timeout report.
    The first load must succeed (a hub must not start on a broken file): LimitsError; no
    file at all is `load_limits_or_defaults`'s rule. Once a file is in force, its removal is
    a failed reload (the last good configuration stays): deleting it never lifts the limits.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        parse_timeout: float = DEFAULT_PARSE_TIMEOUT,
        log: logging.Logger | logging.LoggerAdapter | None = None,
    ):
        self.path = paths.limits_path(path)
        self.parse_timeout = parse_timeout
        self.log = log or logging.getLogger(__name__)
        self._lock = threading.Lock()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ds01-limits")
        self._pending: _Attempt | None = None
        self.last_error: str | None = None
        self.last_problems: tuple[Problem, ...] = ()
        self.reload_failures = 0
        self.last_reload_ok = True
        stamp = self._file_stamp()
        first = self._executor.submit(load_limits_or_defaults, path)
        try:
            self._current: LimitsConfig = first.result(timeout=parse_timeout)
        except concurrent.futures.TimeoutError:
            self._executor.shutdown(wait=False)
            raise LimitsError([self._timeout_problem()]) from None
        except BaseException:
            self._executor.shutdown(wait=False)
            raise
        self._stamp = stamp

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size, stat.st_ino)

    @property
    def current(self) -> LimitsConfig:
        return self._current

    def reload(self, force: bool = False, *, wait: bool = True) -> bool:
        """Re-read when the file changed (or `force`); True when a new configuration is in
        force. With `wait=False` (a caller on an event loop that can live with the last good
        configuration for a moment) the read starts in the background and False is returned."""
        attempt = self._start(force)
        if attempt is None or not wait:
            return False
        try:
            return attempt.future.result(timeout=self.parse_timeout)
        except concurrent.futures.TimeoutError:
            self._timed_out(attempt)
            return False

    async def refresh(self, force: bool = False) -> bool:
        """`reload()` for event loops: the loop goes on serving while the file is read."""
        attempt = self._start(force)
        if attempt is None:
            return False
        waiting = asyncio.shield(asyncio.wrap_future(attempt.future))
        try:
            return await asyncio.wait_for(waiting, self.parse_timeout)
        except TimeoutError:
            self._timed_out(attempt)
            return False

    def resolve(self, user: str, groups: Iterable[str] = ()) -> ResolvedLimits:
        """Resolve against the latest good configuration (reloading first if the file changed)."""
        self.reload()
        return self._current.resolve(user, groups)

    # -- one read -------------------------------------------------------------------------------

    def _start(self, force: bool) -> _Attempt | None:
        """The read to wait for: the one under way for this version of the file, a new one,
        or None when the file is unchanged since the last read."""
        with self._lock:
            stamp = self._file_stamp()
            pending = self._pending
            if pending is not None and not pending.finished and pending.stamp == stamp:
                return pending
            if not force and stamp == self._stamp:
                return None
            attempt = _Attempt(stamp)
            attempt.future = self._executor.submit(self._load, attempt)
            self._pending = attempt
            return attempt

    def _load(self, attempt: _Attempt) -> bool:
        """On the store's thread: read, check and put the outcome in force."""
        try:
            config = load_limits(self.path)
        except LimitsError as error:
            self._failed(attempt, error.problems)
            return False
        with self._lock:
            self._current, self._stamp = config, attempt.stamp
            recovered = not self.last_reload_ok
            self.last_error, self.last_problems, self.last_reload_ok = None, (), True
            attempt.finished = True
        self.log.info(
            "limits file %s reloaded%s", self.path, " (it is valid again)" if recovered else ""
        )
        return True

    def _failed(self, attempt: _Attempt, problems: list[Problem]) -> None:
        error = LimitsError(problems)
        with self._lock:
            self._stamp = attempt.stamp
            self._record_failure(attempt, error)
            attempt.finished = True
        self.log.error(
            "%s; keeping the last good configuration:\n%s",
            error.summary(),
            "\n".join(error.lines()),
        )

    def _timed_out(self, attempt: _Attempt) -> None:
        error = LimitsError([self._timeout_problem()])
        with self._lock:
            if attempt.finished:  # it ended meanwhile: its outcome stands
                return
            first = self._record_failure(attempt, error)
        if first:  # once per read, however many callers gave up waiting for it
            self.log.error("%s; keeping the last good configuration", error.problems[0])

    def _record_failure(self, attempt: _Attempt, error: LimitsError) -> bool:
        """Under the lock: what the admin page and the metrics show. True when this read's
        failure is counted now (not before, by a timeout)."""
        self.last_problems = tuple(error.problems)
        self.last_error = f"{error} -- keeping the last good configuration"
        self.last_reload_ok = False
        if attempt.counted:
            return False
        attempt.counted = True
        self.reload_failures += 1
        return True

    def _timeout_problem(self) -> Problem:
        return Problem(
            str(self.path),
            "",
            "",
            f"reading the file took longer than {self.parse_timeout:g}s",
            "check it with ds01hub check-config; a limits file needs far less (is it huge, or "
            "on a slow or hung filesystem?)",
            None,
            "timeout",
        )
