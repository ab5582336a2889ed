"""Per-user aggregate caps (DS01's `aggregate`): what all of a user's running containers may use
together, checked at spawn (pure, here) and enforced by the kernel through a per-user cgroup
parent where the host allows it (`ds01hub.host.cgroups` writes what `cgroup_settings` says).

The check sums the containers' configured limits, not their current use: a container's limit is
what it may take at any moment. A container without a limit on a capped resource makes the cap
impossible to keep, so the spawn is refused and says which one. The check is made again right
before `docker start`, under a per-user lock (`ds01hub.host.aggregate_gate`), so two spawns of
one user cannot both pass it; `counts_toward_caps` says which of the user's containers count.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ds01hub.labels import RUNNING_STATES
from ds01hub.limits import AggregateLimits
from ds01hub.units import format_size

__all__ = [
    "ContainerUse",
    "aggregate_refusal",
    "cgroup_settings",
    "counts_toward_caps",
    "user_cgroup_parent",
]

CFS_PERIOD_US = 100_000
_NANO = 1_000_000_000


def counts_toward_caps(state: str, creator_alive: bool | None) -> bool:
    """Whether a container in Docker `state` counts against its user's caps at a start made
    under the user's lock. Running (or paused, restarting) ones do; a `created` one counts
    unless the process that created it is known to live: a live creator's start passes the
    same lock first, but a dead one's `docker start` may still land (it was sent before the
    kill), so it counts until the container is removed (the hub's reconcile at start removes
    those). A stopped one uses nothing."""
    if state in RUNNING_STATES:
        return True
    return state == "created" and creator_alive is not True


@dataclass(frozen=True)
class ContainerUse:
    """A container's limits as Docker has them (None: no limit)."""

    name: str
    cpus: float | None
    memory: int | None
    pids: int | None

    @classmethod
    def from_host_config(cls, name: str, host: Mapping[str, Any]) -> ContainerUse:
        """From `docker inspect`'s HostConfig: NanoCpus (or CpuQuota/CpuPeriod), Memory,
        PidsLimit; 0, -1 and absent mean no limit."""
        cpus = None
        if (host.get("NanoCpus") or 0) > 0:
            cpus = host["NanoCpus"] / 1e9
        elif (host.get("CpuQuota") or 0) > 0:
            cpus = host["CpuQuota"] / (host.get("CpuPeriod") or CFS_PERIOD_US)
        memory = host.get("Memory") or None
        pids = host.get("PidsLimit")
        return cls(
            name,
            cpus,
            memory if memory and memory > 0 else None,
            pids if pids and pids > 0 else None,
        )


_RESOURCES = (
    ("cpus", "CPUs", lambda v: f"{v:g}"),
    ("memory", "memory", format_size),
    ("pids", "tasks", str),
)


def aggregate_refusal(
    user: str, cap: AggregateLimits, running: Sequence[ContainerUse], new: ContainerUse
) -> str | None:
    """Why starting `new` beside the user's `running` containers breaks `cap`, or None."""
    caps = {"cpus": cap.cpus, "memory": cap.memory, "pids": cap.pids}
    problems = []
    for key, label, show in _RESOURCES:
        limit = caps[key]
        if limit is None:
            continue
        unbounded = [c.name for c in (*running, new) if getattr(c, key) is None]
        if unbounded:
            problems.append(
                f"{label}: {', '.join(unbounded)} has no {label} limit, so the aggregate of "
                f"{show(limit)} cannot be kept"
            )
            continue
        total = sum(_exact(key, getattr(c, key)) for c in (*running, new))
        if total > _exact(key, limit):
            together = show(total / _NANO if key == "cpus" else total)
            problems.append(f"{label}: {together} together, over the aggregate {show(limit)}")
    if not problems:
        return None
    listing = "; ".join(f"{c.name} ({_limits_text(c)})" for c in running)
    return (
        f"over the aggregate limits of {user} ({cap.describe()}): "
        + "; ".join(problems)
        + f". Running: {listing or 'none'}. Stop a container first, or pick a smaller profile"
    )


def _exact(key: str, value: float) -> int:
    """CPUs in nano-CPUs (Docker's own unit), the rest as they are: sums of fractions of a CPU
    compare exactly (0.1 + 0.2 CPUs fit a cap of 0.3)."""
    return round(value * _NANO) if key == "cpus" else int(value)


def _limits_text(use: ContainerUse) -> str:
    shown = [
        f"{show(getattr(use, key))} {label}"
        for key, label, show in _RESOURCES
        if getattr(use, key) is not None
    ]
    return ", ".join(shown) or "no limits"


def cgroup_settings(cap: AggregateLimits) -> dict[str, dict[str, str]]:
    """cgroup v1 controller -> file -> value for a parent enforcing `cap` (files in the order
    they are written; `memory.memsw.limit_in_bytes` only where swap accounting is on)."""
    settings: dict[str, dict[str, str]] = {}
    if cap.memory is not None:
        settings["memory"] = {
            "memory.limit_in_bytes": str(cap.memory),
            "memory.memsw.limit_in_bytes": str(cap.memory),  # no swap beyond it
        }
    if cap.memory_high is not None:
        settings.setdefault("memory", {})["memory.soft_limit_in_bytes"] = str(cap.memory_high)
    if cap.cpus is not None:
        settings["cpu"] = {
            "cpu.cfs_period_us": str(CFS_PERIOD_US),
            "cpu.cfs_quota_us": str(max(1000, round(cap.cpus * CFS_PERIOD_US))),
        }
    if cap.pids is not None:
        settings["pids"] = {"pids.max": str(cap.pids)}
    return settings


_UNSAFE = re.compile(r"[^A-Za-z0-9_.@-]")


def user_cgroup_parent(base: str, user: str) -> str:
    """`/ds01/u-alice`: the user's parent cgroup under `base` (a cgroupfs path), the name
    escaped so that no user name can leave it (`/`, `..`) or clash (`-XX` escapes)."""
    escaped = _UNSAFE.sub(lambda m: "".join(f"-{b:02x}" for b in m[0].encode()), user)
    return f"/{base.strip('/')}/u-{escaped}" if base.strip("/") else f"/u-{escaped}"
