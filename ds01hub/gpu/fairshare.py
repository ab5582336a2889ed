"""Fair share (Slurm's idea), pure: GPU intervals + a clock + `gpu_allocation.fairshare` ->
each user's effective priority.

A user's *usage* is their GPU slot-hours with every instant weighted by 2^-(age / half_life),
so an hour used one half-life ago counts half. Their *normalized usage* U is that over all
users' usage; their *normalized share* S is their group's share over the shares of the groups
with usage, split evenly among the group's users with usage. The *factor* is Slurm's
F = 2^(-U/S): 1 for no recent use, 0.5 for exactly the user's share, towards 0 above it. The
*effective priority* is the configured priority + weight x F, so configured priorities still
order users unless `weight` is large, and among equals the one who used less goes first.

No I/O: `gpu.eventlog.EventLog.intervals` reads the log; the allocator and the hub's GPU
queue compute a `FairShare` from it (the benchmark times exactly these functions).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ds01hub.gpu.eventlog import Interval
from ds01hub.limits import FairShareConfig, LimitsConfig, ResolvedLimits

__all__ = [
    "FairShare",
    "UserShare",
    "Waiting",
    "decayed_usage",
    "rank",
    "relevant_since",
    "report",
]

#: Intervals that ended this many half-lives ago weigh under 2^-20 (one in a million): skip.
HORIZON_HALF_LIVES = 20


def relevant_since(now: float, half_life: float) -> float:
    """The earliest epoch whose usage still matters (older intervals are not read)."""
    return now - HORIZON_HALF_LIVES * half_life


def decayed_usage(intervals: Iterable[Interval], now: float, half_life: float) -> dict[str, float]:
    """Decayed GPU-hours per user: the integral of 2^-((now - t) / half_life) over each
    interval (`EventLog.intervals(until=now)`: open ones end now; time after `now` does not
    count)."""
    rate = math.log(2) / half_life
    usage: dict[str, float] = {}
    for interval in intervals:
        end = min(interval.end.timestamp(), now)
        start = min(interval.begin.timestamp(), end)
        hours = (math.exp(-rate * (now - end)) - math.exp(-rate * (now - start))) / rate / 3600
        if hours > 0:
            usage[interval.user] = usage.get(interval.user, 0.0) + hours
    return usage


@dataclass(frozen=True)
class UserShare:
    """One user's line of `ds01hub fairshare`."""

    user: str
    group: str | None
    usage: float  # decayed GPU-hours
    normalized_usage: float  # U: share of all users' decayed usage
    share: float  # S: normalized share
    factor: float  # F = 2^(-U/S)

    def to_dict(self) -> dict:
        return {
            "user": self.user,
            "group": self.group,
            "usage_gpu_hours": round(self.usage, 4),
            "normalized_usage": round(self.normalized_usage, 6),
            "share": round(self.share, 6),
            "factor": round(self.factor, 6),
        }


@dataclass(frozen=True)
class FairShare:
    """Everyone's factor at one moment; users without recent use have factor 1."""

    weight: float = 0.0
    users: Mapping[str, UserShare] = field(default_factory=dict)
    half_life: float | None = None

    @classmethod
    def compute(
        cls,
        config: FairShareConfig | None,
        intervals: Iterable[Interval],
        now: float,
        group_of: Callable[[str, str | None], str | None] | None = None,
    ) -> FairShare:
        """`config` None: fair share is off (everyone's effective priority is their own).
        A user's group is the one of their latest interval, or `group_of(user, that group)`
        when given (their group now, from the hub's groups: `ds01hub fairshare`)."""
        if config is None:
            return cls()
        intervals = list(intervals)
        usage = decayed_usage(intervals, now, config.half_life)
        latest: dict[str, tuple[float, str | None]] = {}
        for interval in intervals:  # a user's group: the one of their latest interval
            begin = interval.begin.timestamp()
            if interval.user not in latest or begin >= latest[interval.user][0]:
                latest[interval.user] = (begin, interval.group)
        groups = {user: latest[user][1] for user in usage}
        if group_of is not None:
            groups = {user: group_of(user, group) for user, group in groups.items()}
        return cls(config.weight, _shares(config, usage, groups), config.half_life)

    def factor(self, user: str) -> float:
        entry = self.users.get(user)
        return entry.factor if entry is not None else 1.0

    def effective(self, user: str, priority: float) -> float:
        """Configured priority + weight x factor (just `priority` when fair share is off)."""
        return priority + self.weight * self.factor(user) if self.weight else float(priority)


def report(
    fair: FairShare,
    config: LimitsConfig,
    resolve: Callable[[str, str | None], ResolvedLimits] | None = None,
) -> list[dict]:
    """`ds01hub fairshare`'s and the admin page's rows, highest factor first: each user's
    `UserShare` with their configured priority and the effective one. The priority is
    `resolve(user, logged group)`'s (their limits now, with the hub's group properties: the
    caller's), else the file's in the group the event log recorded."""
    rows = []
    for entry in sorted(fair.users.values(), key=lambda e: (-e.factor, e.user)):
        if resolve is not None:
            priority = resolve(entry.user, entry.group).priority
        else:
            priority = config.resolve(entry.user, [entry.group] if entry.group else []).priority
        effective = round(fair.effective(entry.user, priority), 3)
        rows.append({**entry.to_dict(), "priority": priority, "effective": effective})
    return rows


def _shares(
    config: FairShareConfig, usage: Mapping[str, float], groups: Mapping[str, str | None]
) -> dict[str, UserShare]:
    total = sum(usage.values())
    members = Counter(groups.values())
    group_total = sum(config.share(group) for group in members)
    result = {}
    for user, used in usage.items():
        group = groups[user]
        share = config.share(group) / group_total / members[group]
        normalized = used / total if total > 0 else 0.0
        factor = 2.0 ** (-normalized / share)
        result[user] = UserShare(user, group, used, normalized, share, factor)
    return result


@dataclass(frozen=True)
class Waiting:
    """A request in the GPU queue: `arrival` orders equals (first come, first served): when it
    first asked, in seconds since the epoch, so that a stored request keeps its place across hub
    restarts (`ds01hub.gpu.queued`)."""

    key: str
    user: str
    priority: int
    arrival: float


def rank(waiting: Sequence[Waiting], fair: FairShare) -> list[tuple[Waiting, float]]:
    """The queue's order: highest effective priority first, then earliest arrival; each
    with its effective priority."""
    scored = [(w, fair.effective(w.user, w.priority)) for w in waiting]
    scored.sort(key=lambda pair: (-pair[1], pair[0].arrival))
    return scored
