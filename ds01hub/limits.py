"""Resource limits from one YAML file: load, validate, resolve a user's limits, reload safely.

The file has DS01's shape: `defaults`, `groups` (each with `members` and limits),
`user_overrides` (per user, with an optional `reason`), `policies` and `gpu_allocation`.
A user's limits are resolved field by field: `user_overrides` > their group > `defaults` >
ds01hub's built-in defaults. Validation collects every problem in one pass, each naming the
file, the key path, the bad value and the fix, so an admin fixes the file in one go; a reload
that fails keeps the last good configuration in force.

DS01 keys that ds01hub does not enforce (storage quotas, I/O limits, wizard texts, ...) are
accepted so a DS01 file loads unchanged, and reported as warnings by `ds01hub check-config`.
"""

from __future__ import annotations

import difflib
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

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
    "DEFAULT_LIMITS_PATH",
    "GpuAllocationConfig",
    "LimitsConfig",
    "LimitsError",
    "LimitsStore",
    "Policies",
    "Problem",
    "ResolvedLimits",
    "SimulatedGpuSpec",
    "SimulateConfig",
    "default_limits_path",
    "load_limits",
    "parse_limits",
]

DEFAULT_LIMITS_PATH = Path("/etc/ds01hub/resource-limits.yaml")
ENV_LIMITS = "DS01HUB_LIMITS"
PRIORITY_RANGE = (1, 100)
IPC_MODES = ("private", "shareable", "host", "none")
STRATEGIES = ("spread", "pack")
# DS01 spellings of the strategies.
STRATEGY_ALIASES = {"least_allocated": "spread", "round_robin": "spread", "most_allocated": "pack"}
# Legacy DS01 spellings of limit keys -> the ds01hub name.
LIMIT_ALIASES = {"max_mig_instances": "max_gpus", "gpus": "max_gpus", "cpus": "max_cpus"}


def default_limits_path() -> Path:
    """`$DS01HUB_LIMITS` when set, else /etc/ds01hub/resource-limits.yaml."""
    env = os.environ.get(ENV_LIMITS)
    return Path(env) if env else DEFAULT_LIMITS_PATH


# --------------------------------------------------------------------------------------------
# Problems


@dataclass(frozen=True)
class Problem:
    """One thing wrong in the file: where, what was found, and how to fix it."""

    file: str
    key_path: str
    value: Any
    message: str
    fix: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.key_path}" if self.key_path else self.file
        return f"{where}: {self.message} (found {self.value!r}). Fix: {self.fix}"


class LimitsError(ValueError):
    """The limits file cannot be used; `problems` lists every problem found."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        count = len(self.problems)
        head = f"{count} problem{'s' if count != 1 else ''} in the limits file"
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in self.problems))


class _Collector:
    """Gathers problems and warnings while walking the file, so all are reported at once."""

    def __init__(self, file: str):
        self.file = file
        self.problems: list[Problem] = []
        self.warnings: list[str] = []

    def problem(self, key_path: str, value: Any, message: str, fix: str) -> None:
        self.problems.append(Problem(self.file, key_path, value, message, fix))

    def warn(self, key_path: str, message: str) -> None:
        self.warnings.append(f"{self.file}: {key_path}: {message}")

    def unknown_key(self, key_path: str, key: Any, known: Iterable[str]) -> None:
        close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
        fix = (
            f"did you mean {close[0]!r}?"
            if close
            else "remove it; known keys here: " + ", ".join(sorted(known))
        )
        self.problem(key_path, key, "unknown key", fix)


# --------------------------------------------------------------------------------------------
# Limit fields: how each is read from YAML and shown to people


def _read_count(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("a whole number >= 0, or null for unlimited")
    return value


def _read_positive_count(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("a whole number >= 1, or null for unlimited")
    return value


def _read_cpus(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError("a number of CPU cores > 0 such as 4 or 0.5, or null for no limit")
    return float(value)


def _read_size(value: Any) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except UnitError:
        raise ValueError(SIZE_FORMS + ", or null for no limit") from None


def _read_duration(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except UnitError:
        raise ValueError(DURATION_FORMS + ", or null for never") from None


def _read_priority(value: Any) -> int:
    low, high = PRIORITY_RANGE
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"a whole number from {low} to {high} (higher wins)")
    return value


def _read_ipc_mode(value: Any) -> str | None:
    if value is None:
        return None
    if value not in IPC_MODES:
        raise ValueError("one of " + ", ".join(IPC_MODES) + ", or null")
    return value


def _read_images(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError("a list of image names or patterns (e.g. ['ds01-*', 'jupyter/*'])")
    return tuple(value)


def _read_text(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ValueError("a text")
    return str(value)


def _read_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("true or false")
    return value


@dataclass(frozen=True)
class _Field:
    reader: Callable[[Any], Any]
    builtin: Any


# Every limit a section may set, with its reader and ds01hub's built-in default.
LIMIT_FIELDS: dict[str, _Field] = {
    "max_gpus": _Field(_read_count, 1),
    "max_gpus_per_container": _Field(_read_count, None),
    "allow_full_gpu": _Field(_read_bool, True),
    "max_cpus": _Field(_read_cpus, None),
    "memory": _Field(_read_size, None),
    "shm_size": _Field(_read_size, None),
    "ipc_mode": _Field(_read_ipc_mode, None),
    "pids_limit": _Field(_read_positive_count, None),
    "max_containers_per_user": _Field(_read_positive_count, None),
    "idle_timeout": _Field(_read_duration, None),
    "max_runtime": _Field(_read_duration, None),
    "gpu_hold_after_stop": _Field(_read_duration, 15 * 60.0),
    "container_hold_after_stop": _Field(_read_duration, None),
    "priority": _Field(_read_priority, 10),
    "allowed_images": _Field(_read_images, None),
    "cgroup_parent": _Field(_read_text, None),
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
        "high_demand_threshold",
        "high_demand_idle_reduction",
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


def _read_limits_section(
    section: Any, path: str, out: _Collector, extra_keys: Iterable[str] = ()
) -> dict[str, Any]:
    """Validated limit fields of one section (defaults, a group, an override), canonical names."""
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        out.problem(path, section, "must be a mapping of limit: value", "indent keys under it")
        return {}
    extra = set(extra_keys)
    result: dict[str, Any] = {}
    seen_from: dict[str, str] = {}
    for key, value in section.items():
        key_path = f"{path}.{key}"
        if key in extra:
            continue
        if key in DS01_UNENFORCED_LIMITS:
            out.warn(key_path, "DS01 key accepted but not enforced by ds01hub")
            continue
        name = LIMIT_ALIASES.get(key, key)
        spec = LIMIT_FIELDS.get(name)
        if spec is None:
            out.unknown_key(key_path, key, _section_keys(extra))
            continue
        if name in seen_from:
            out.problem(
                key_path,
                value,
                f"sets {name!r} again (already set as {seen_from[name]!r})",
                f"keep only one of {seen_from[name]!r} and {key!r}",
            )
            continue
        seen_from[name] = key
        try:
            result[name] = spec.reader(value)
        except ValueError as error:
            out.problem(key_path, value, f"invalid {name}", f"use {error}")
    return result


# --------------------------------------------------------------------------------------------
# Resolved limits: what one user gets


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
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

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
        """docker-py keyword arguments (containers.create / create_host_config) for these limits."""
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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: numbers in bytes/seconds, plus human spellings under `display`."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["allowed_images"] = list(self.allowed_images) if self.allowed_images else None
        data["sources"] = dict(self.sources)
        data["display"] = dict(self.display_rows())
        return data

    def display_rows(self) -> list[tuple[str, str]]:
        """(label, text) rows in the order DS01's `get_resource_limits` prints them."""

        def size(n: int | None) -> str:
            return "unlimited" if n is None else format_size(n)

        def duration(s: float | None, none: str) -> str:
            return none if s is None else format_duration(s)

        def count(n: int | None) -> str:
            return "unlimited" if n is None else str(n)

        rows = [
            ("User", self.user),
            ("Group", f"{self.group or '-'} ({self.group_reason})"),
            ("Priority", str(self.priority)),
            ("Max GPUs", count(self.max_gpus)),
            ("Max GPUs per Container", count(self.gpus_per_container)),
            ("Whole GPUs Allowed", "yes" if self.allow_full_gpu else "no (MIG instances only)"),
            ("Max CPUs", "unlimited" if self.max_cpus is None else f"{self.max_cpus:g}"),
            ("Memory", size(self.memory)),
            ("Shared Memory", "default" if self.shm_size is None else size(self.shm_size)),
            ("IPC Mode", self.ipc_mode or "default"),
            ("PIDs Limit", count(self.pids_limit)),
            ("Max Containers", count(self.max_containers_per_user)),
            ("Idle Timeout", duration(self.idle_timeout, "never")),
            ("Max Runtime", duration(self.max_runtime, "unlimited")),
            ("GPU Hold After Stop", duration(self.gpu_hold_after_stop, "until removed")),
            (
                "Container Hold After Stop",
                duration(self.container_hold_after_stop, "never removed"),
            ),
            ("Allowed Images", ", ".join(self.allowed_images) if self.allowed_images else "any"),
        ]
        if self.reason:
            rows.append(("Reason", self.reason))
        return rows


# --------------------------------------------------------------------------------------------
# Policies and GPU allocation


@dataclass(frozen=True)
class Policies:
    """System-wide rules. `preempt_running`: a higher priority may take a running container's
    GPU (off by default: only slots held by stopped containers are reclaimed)."""

    preempt_running: bool = False
    max_containers_per_user: int | None = None


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
class GpuAllocationConfig:
    """`gpu_allocation`: whether MIG instances are handed out, the expected MIG profile,
    the placement strategy (`spread`: least-allocated GPU first; `pack`: fill GPUs up),
    and an optional simulated inventory."""

    enable_mig: bool = True
    mig_profile: str | None = None
    strategy: str = "spread"
    simulate: SimulateConfig | None = None


_MIG_PROFILE_RE = r"^\d+g\.\d+gb(\+me)?$"


def _read_simulate(
    value: Any, path: str, default_profile: str | None, out: _Collector
) -> SimulateConfig | None:
    """`simulate: {gpus: [...] | N, seed: ...}`; each GPU `{name, memory, mig: [..] | N, count}`."""
    if not isinstance(value, Mapping):
        out.problem(path, value, "must be a mapping", "use simulate: {gpus: [{mig: [2g.20gb]}]}")
        return None
    known = {"gpus", "seed"}
    for key in value:
        if key not in known:
            out.unknown_key(f"{path}.{key}", key, known)
    seed = value.get("seed", "ds01hub")
    if not isinstance(seed, str | int) or isinstance(seed, bool):
        out.problem(f"{path}.seed", seed, "bad value", "use a text such as 'lab-demo'")
        seed = "ds01hub"
    gpus_value = value.get("gpus")
    if isinstance(gpus_value, int) and not isinstance(gpus_value, bool) and gpus_value > 0:
        return SimulateConfig(tuple(SimulatedGpuSpec() for _ in range(gpus_value)), str(seed))
    if not isinstance(gpus_value, list) or not gpus_value:
        out.problem(
            f"{path}.gpus",
            gpus_value,
            "must be a GPU count or a non-empty list of GPUs",
            "use gpus: 8, or gpus: [{name: 'NVIDIA A100-SXM4-80GB', memory: 80g, mig: 3}]",
        )
        return None
    specs: list[SimulatedGpuSpec] = []
    gpu_keys = {"name", "memory", "mig", "count"}
    for i, gpu in enumerate(gpus_value):
        gpath = f"{path}.gpus[{i}]"
        if gpu is None:
            gpu = {}
        if not isinstance(gpu, Mapping):
            out.problem(gpath, gpu, "must be a mapping", "use {name: ..., memory: 80g, mig: 3}")
            continue
        for key in gpu:
            if key not in gpu_keys:
                out.unknown_key(f"{gpath}.{key}", key, gpu_keys)
        name = str(gpu.get("name", SimulatedGpuSpec.name))
        memory_mb = SimulatedGpuSpec.memory_mb
        if "memory" in gpu:
            try:
                memory_mb = parse_size(gpu["memory"]) // (1 << 20)
            except UnitError as error:
                out.problem(f"{gpath}.memory", gpu["memory"], "bad size", str(error))
        mig = gpu.get("mig")
        profiles: tuple[str, ...] | None = None
        if isinstance(mig, int) and not isinstance(mig, bool) and mig > 0:
            if not default_profile:
                out.problem(
                    f"{gpath}.mig",
                    mig,
                    "a MIG instance count needs gpu_allocation.mig_profile",
                    "set mig_profile: 2g.20gb, or list the profiles: mig: [2g.20gb, 2g.20gb]",
                )
            else:
                profiles = (default_profile,) * mig
        elif isinstance(mig, list) and mig and all(isinstance(p, str) for p in mig):
            bad = [p for p in mig if not re.match(_MIG_PROFILE_RE, p)]
            if bad:
                out.problem(f"{gpath}.mig", bad, "bad MIG profile", "use names like 2g.20gb")
            profiles = tuple(mig)
        elif mig is not None:
            out.problem(f"{gpath}.mig", mig, "bad value", "use a count (3) or [2g.20gb, 1g.10gb]")
        count = gpu.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            out.problem(f"{gpath}.count", count, "bad value", "use a whole number >= 1")
            count = 1
        specs.extend(SimulatedGpuSpec(name, memory_mb, profiles) for _ in range(count))
    return SimulateConfig(tuple(specs), str(seed))


def _read_gpu_allocation(section: Any, out: _Collector) -> GpuAllocationConfig:
    path = "gpu_allocation"
    if section is None:
        return GpuAllocationConfig()
    if not isinstance(section, Mapping):
        out.problem(path, section, "must be a mapping", "indent its keys under gpu_allocation:")
        return GpuAllocationConfig()
    known = {"enable_mig", "mig_profile", "strategy", "simulate"}
    for key in section:
        if key in DS01_UNENFORCED_GPU:
            out.warn(f"{path}.{key}", "DS01 key accepted but not enforced by ds01hub")
        elif key not in known:
            out.unknown_key(f"{path}.{key}", key, known | DS01_UNENFORCED_GPU)
    enable_mig = section.get("enable_mig", True)
    if not isinstance(enable_mig, bool):
        out.problem(f"{path}.enable_mig", enable_mig, "bad value", "use true or false")
        enable_mig = True
    profile = section.get("mig_profile")
    if profile is not None and not (
        isinstance(profile, str) and re.match(_MIG_PROFILE_RE, profile)
    ):
        out.problem(f"{path}.mig_profile", profile, "bad MIG profile", "use a name like 2g.20gb")
        profile = None
    strategy = section.get("strategy", "spread")
    strategy = STRATEGY_ALIASES.get(strategy, strategy)
    if strategy not in STRATEGIES:
        out.problem(
            f"{path}.strategy",
            section.get("strategy"),
            "unknown strategy",
            "use spread (least-allocated GPU first) or pack (fill a GPU before the next)",
        )
        strategy = "spread"
    simulate = None
    if section.get("simulate") is not None:
        simulate = _read_simulate(section["simulate"], f"{path}.simulate", profile, out)
    return GpuAllocationConfig(enable_mig, profile, strategy, simulate)


def _read_policies(section: Any, out: _Collector) -> Policies:
    path = "policies"
    if section is None:
        return Policies()
    if not isinstance(section, Mapping):
        out.problem(path, section, "must be a mapping", "indent its keys under policies:")
        return Policies()
    known = {"preempt_running", "max_containers_per_user"}
    for key in section:
        if key in DS01_UNENFORCED_POLICIES:
            out.warn(f"{path}.{key}", "DS01 key accepted but not enforced by ds01hub")
        elif key not in known:
            out.unknown_key(f"{path}.{key}", key, known | DS01_UNENFORCED_POLICIES)
    preempt = section.get("preempt_running", False)
    if not isinstance(preempt, bool):
        out.problem(f"{path}.preempt_running", preempt, "bad value", "use true or false")
        preempt = False
    max_containers = section.get("max_containers_per_user")
    try:
        max_containers = _read_positive_count(max_containers)
    except ValueError as error:
        out.problem(f"{path}.max_containers_per_user", max_containers, "bad value", f"use {error}")
        max_containers = None
    return Policies(preempt, max_containers)


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

    def resolve(self, user: str, groups: Iterable[str] = ()) -> ResolvedLimits:
        """Field by field: user_overrides > chosen group > defaults > policies > built-ins."""
        group, group_reason = self._choose_group(user, groups)
        layers: list[tuple[str, Mapping[str, Any]]] = [
            (f"user_overrides.{user}", self.user_overrides.get(user, {})),
        ]
        if group:
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
        if values["ipc_mode"] == "host" and values["shm_size"] is not None:
            # A user's override and their (caller-supplied) group can still meet here; the
            # host's /dev/shm is what ipc_mode host means, so shm_size goes.
            values["shm_size"], sources["shm_size"] = None, "dropped: ipc_mode host"
        reason = self.user_overrides.get(user, {}).get("reason")
        return ResolvedLimits(
            user=user,
            group=group,
            group_reason=group_reason,
            reason=reason,
            sources=sources,
            **values,
        )


def _builtin(name: str) -> Any:
    return LIMIT_FIELDS[name].builtin


TOP_LEVEL_KEYS = {"defaults", "groups", "user_overrides", "policies", "gpu_allocation"}


def _read_groups(section: Any, out: _Collector) -> dict[str, Group]:
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        out.problem("groups", section, "must be a mapping of group name: settings", "see docs")
        return {}
    groups: dict[str, Group] = {}
    first_group_of: dict[str, str] = {}
    for name, body in section.items():
        path = f"groups.{name}"
        body = body or {}
        if not isinstance(body, Mapping):
            out.problem(path, body, "must be a mapping", "give it members: [...] and limits")
            continue
        members = body.get("members") or []
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            out.problem(f"{path}.members", members, "must be a list of user names", "[alice, bob]")
            members = []
        seen: set[str] = set()
        for member in members:
            if member in seen:
                out.problem(
                    f"{path}.members",
                    member,
                    "member listed twice",
                    f"remove the second {member!r}",
                )
            seen.add(member)
            if member in first_group_of and first_group_of[member] != name:
                out.warn(
                    f"{path}.members",
                    f"{member!r} is also in {first_group_of[member]!r}; the group with the "
                    "higher priority applies",
                )
            first_group_of.setdefault(member, name)
        limits = _read_limits_section(body, path, out, extra_keys={"members", "description"})
        _check_combination(limits, path, out)
        description = body.get("description")
        groups[str(name)] = Group(str(name), tuple(dict.fromkeys(members)), limits, description)
    return groups


def _read_overrides(section: Any, out: _Collector) -> dict[str, dict[str, Any]]:
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        out.problem("user_overrides", section, "must be a mapping of user: limits", "see docs")
        return {}
    overrides: dict[str, dict[str, Any]] = {}
    for user, body in section.items():
        path = f"user_overrides.{user}"
        limits = _read_limits_section(body, path, out, extra_keys={"reason"})
        _check_combination(limits, path, out)
        if isinstance(body, Mapping) and body.get("reason") is not None:
            limits["reason"] = str(body["reason"])
        overrides[str(user)] = limits
    return overrides


def _check_combination(limits: Mapping[str, Any], path: str, out: _Collector) -> None:
    """Combinations Docker refuses, caught in the file rather than at container start."""
    if limits.get("ipc_mode") == "host" and limits.get("shm_size") is not None:
        out.problem(
            f"{path}.shm_size",
            format_size(limits["shm_size"]),
            "shm_size cannot be combined with ipc_mode: host (Docker refuses both: the host's "
            "/dev/shm is used)",
            "remove shm_size, or use ipc_mode: private/shareable",
        )


def parse_limits(data: Any, file: str = "<limits>") -> LimitsConfig:
    """Validate an already-parsed YAML document; raises LimitsError listing every problem."""
    out = _Collector(file)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        out.problem("", data, "the file must be a YAML mapping", "start with 'defaults:'")
        raise LimitsError(out.problems)
    for key in data:
        if key in DS01_UNENFORCED_TOP:
            out.warn(str(key), "DS01 section accepted but not used by ds01hub")
        elif key not in TOP_LEVEL_KEYS | {"default_group"}:
            out.unknown_key(str(key), key, TOP_LEVEL_KEYS | {"default_group"})
    defaults = _read_limits_section(data.get("defaults"), "defaults", out)
    _check_combination(defaults, "defaults", out)
    groups = _read_groups(data.get("groups"), out)
    overrides = _read_overrides(data.get("user_overrides"), out)
    policies = _read_policies(data.get("policies"), out)
    gpu_allocation = _read_gpu_allocation(data.get("gpu_allocation"), out)
    default_group = data.get("default_group")
    if default_group is not None and default_group not in groups:
        out.problem(
            "default_group",
            default_group,
            "names no group defined under groups",
            "use one of: " + (", ".join(groups) or "(define a group first)"),
        )
        default_group = None
    _check_resolved_combinations(defaults, groups, overrides, out)
    if out.problems:
        raise LimitsError(out.problems)
    return LimitsConfig(
        path=file,
        defaults=defaults,
        groups=groups,
        user_overrides=overrides,
        policies=policies,
        gpu_allocation=gpu_allocation,
        default_group=default_group,
        warnings=tuple(out.warnings),
    )


def _check_resolved_combinations(
    defaults: Mapping[str, Any],
    groups: Mapping[str, Group],
    overrides: Mapping[str, Mapping[str, Any]],
    out: _Collector,
) -> None:
    """shm_size + ipc_mode host can also arise across layers (defaults set shm_size, a group
    sets ipc_mode: host); report the section that completes the clash."""
    layers = [(f"groups.{n}", g.limits) for n, g in groups.items()]
    layers += [(f"user_overrides.{u}", o) for u, o in overrides.items()]
    for path, layer in layers:
        merged = {**defaults, **layer}
        clash = merged.get("ipc_mode") == "host" and merged.get("shm_size") is not None
        reported = layer.get("ipc_mode") == "host" and layer.get("shm_size") is not None
        if clash and not reported:
            key = "ipc_mode" if "ipc_mode" in layer else "shm_size"
            out.problem(
                f"{path}.{key}",
                layer.get(key),
                "with the value inherited from defaults this gives ipc_mode: host together "
                "with shm_size, which Docker refuses",
                f"set shm_size: null in {path}, or use ipc_mode: private/shareable",
            )


def load_limits(path: str | os.PathLike) -> LimitsConfig:
    """Read and validate a limits file; raises LimitsError (with every problem) on any error."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LimitsError(
            [
                Problem(
                    file,
                    "",
                    file,
                    "file not found",
                    "create it (see config/resource-limits.yaml) or point --limits / "
                    f"${ENV_LIMITS} at it",
                )
            ]
        ) from None
    except OSError as error:
        raise LimitsError(
            [Problem(file, "", file, f"cannot read: {error.strerror}", "check permissions")]
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        detail = getattr(error, "problem", None) or str(error)
        raise LimitsError(
            [
                Problem(
                    file,
                    where,
                    detail,
                    "not valid YAML",
                    "check indentation (spaces, not tabs) and colons",
                )
            ]
        ) from None
    return parse_limits(data, file)


class LimitsStore:
    """The limits in force for a long-running process (the hub, the broker, the culler).

    `current` is always a valid configuration: `reload()` re-reads the file when it changed
    and, if the new file is broken, keeps the last good one and records `last_error`.
    The first load must succeed (a hub must not start on a broken file).
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else default_limits_path()
        self._lock = threading.Lock()
        self._current = load_limits(self.path)
        self._stamp = self._file_stamp()
        self.last_error: str | None = None

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size, stat.st_ino)

    @property
    def current(self) -> LimitsConfig:
        return self._current

    def reload(self, force: bool = False) -> bool:
        """Re-read when the file changed (or `force`); True when a new configuration is in force."""
        with self._lock:
            stamp = self._file_stamp()
            if not force and stamp == self._stamp:
                return False
            self._stamp = stamp
            try:
                config = load_limits(self.path)
            except LimitsError as error:
                self.last_error = f"{error} -- keeping the last good configuration"
                return False
            self._current = config
            self.last_error = None
            return True

    def resolve(self, user: str, groups: Iterable[str] = ()) -> ResolvedLimits:
        """Resolve against the latest good configuration (reloading first if the file changed)."""
        self.reload()
        return self._current.resolve(user, groups)
