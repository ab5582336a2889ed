"""The GPU allocation decision, pure: slots + current holdings + a request + limits -> Decision.

No Docker, no files, no clock of its own: `allocation_state` gathers the holdings (from Docker
labels and live reservations) and calls `decide` under its lock. Keeping the decision pure
makes every rule testable on plain data and the benchmark measure the rule itself.

Rules, in order:
1. A request asks for `count` slots, or one MIG instance of `mig_profile`, or whole GPUs only.
2. It must fit `max_gpus_per_container` and, together with the user's other containers'
   holdings, `max_gpus`. A container's own holdings are not counted against it: a stopped
   container restarting within its hold gets its slots back first. With
   `max_gpu_equivalents`, the GPU equivalents held and granted (a whole GPU 1, a MIG instance
   its share of the GPU's compute: `ds01hub.mig.gpu_share`) must fit too; only slots that fit
   what is left are considered (`_within_equivalents`, a filter around the placement).
3. Free slots are chosen by strategy: `spread` takes the least-allocated physical GPU first
   (fraction of its slots held), `pack` the most-allocated one that still has room.
4. Not enough free: a request of higher priority may take slots that lower-priority users only
   hold (stopped containers), never slots of running containers unless `preempt_running`, and
   never in-flight reservations. Otherwise the reason names who holds what and when the
   earliest hold expires. Priorities compared here are effective ones (`gpu.fairshare`):
   configured priority + fair-share weight x factor, when fair share is on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from fractions import Fraction

from ds01hub.gpu.fairshare import FairShare
from ds01hub.gpu.inventory import Slot
from ds01hub.limits import ResolvedLimits
from ds01hub.mig import COMPUTE_SLICES, format_share, gpu_share

__all__ = ["Decision", "GpuRequest", "Holding", "decide", "describe_holding"]

STRATEGIES = ("spread", "pack")


@dataclass(frozen=True)
class Holding:
    """A slot held by a container: running, stopped (until `held_until`), reserved (an
    in-flight spawn's claim; `held_until` is its expiry) or starting (a claim checked right
    before `docker start`, or a never-started container whose creator lives)."""

    slot_id: str
    user: str
    container: str
    state: str  # "running" | "stopped" | "reserved" | "starting"
    priority: int
    held_until: datetime | None = None
    container_id: str = ""
    group: str | None = None

    def live(self, now: datetime) -> bool:
        return self.held_until is None or self.state == "running" or self.held_until > now

    def to_dict(self) -> dict:
        return {
            "slot": self.slot_id,
            "user": self.user,
            "container": self.container,
            "container_id": self.container_id,
            "state": self.state,
            "priority": self.priority,
            "group": self.group,
            "held_until": self.held_until.isoformat() if self.held_until else None,
        }


@dataclass(frozen=True)
class GpuRequest:
    """`count` slots for (user, container); `mig_profile` asks for MIG instances of that
    profile (count defaults to 1), `whole_gpu` for whole GPUs only. `priority` None means the
    user's resolved priority."""

    user: str
    container: str
    count: int = 0
    mig_profile: str | None = None
    priority: int | None = None
    whole_gpu: bool = False

    @property
    def wanted(self) -> int:
        return max(self.count, 1) if self.mig_profile else self.count


@dataclass(frozen=True)
class Decision:
    """`granted` slot ids (in the order given to the container), the holdings taken from
    others, and, when refused, `reason` (human) and `code` (machine: per_container_limit,
    user_limit, equivalents_limit, not_available, busy, bad_request). A refusal also carries
    the facts behind it for the messages people read (`ds01hub.gpu.messages`): `holders` (who
    holds the slots asked for, or the user's own holdings for `user_limit` and
    `equivalents_limit`) and `free` (every slot nobody holds, of any kind: what the user could
    have instead)."""

    granted: tuple[str, ...] = ()
    reclaimed: tuple[Holding, ...] = ()
    reason: str | None = None
    code: str = "ok"
    earliest_expiry: datetime | None = None
    holders: tuple[Holding, ...] = ()
    free: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.reason is None

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "granted": list(self.granted),
            "reclaimed": [h.to_dict() for h in self.reclaimed],
            "reason": self.reason,
            "code": self.code,
            "earliest_expiry": self.earliest_expiry.isoformat() if self.earliest_expiry else None,
            "holders": [h.to_dict() for h in self.holders],
            "free": list(self.free),
        }


def _refuse(
    code: str,
    reason: str,
    earliest: datetime | None = None,
    holders: Sequence[Holding] = (),
    free: Sequence[str] = (),
) -> Decision:
    return Decision(
        reason=reason, code=code, earliest_expiry=earliest, holders=tuple(holders), free=tuple(free)
    )


def describe_holding(holding: Holding) -> str:
    """'slot 0: alice (container x._.alice, stopped, held until 2026-01-01 12:00 UTC)'."""
    detail = holding.state
    if holding.held_until is not None and holding.state != "running":
        detail += f", held until {holding.held_until:%Y-%m-%d %H:%M} UTC"
    elif holding.state == "stopped":
        detail += ", held until removed"
    return f"slot {holding.slot_id}: {holding.user} ({holding.container}, {detail})"


def _candidates(request: GpuRequest, slots: Sequence[Slot], limits: ResolvedLimits):
    """Slots of the kind asked for and allowed to this user, or a refusal."""
    if request.mig_profile:
        chosen = [s for s in slots if s.profile == request.mig_profile]
        if not chosen:
            profiles = sorted({s.profile for s in slots if s.profile})
            return _refuse(
                "not_available",
                f"no MIG instances of profile {request.mig_profile} on this machine "
                f"(MIG profiles here: {', '.join(profiles) or 'none'})",
            )
        return chosen
    if request.whole_gpu:
        if not limits.allow_full_gpu:
            return _refuse(
                "not_available",
                f"{request.user} may use MIG instances only (allow_full_gpu is false); "
                "ask for a MIG profile instead",
            )
        return [s for s in slots if s.profile is None]
    if not limits.allow_full_gpu:
        return [s for s in slots if s.profile is not None]
    return list(slots)


def _check_quota(
    request: GpuRequest, limits: ResolvedLimits, holdings: Sequence[Holding]
) -> Decision | None:
    wanted = request.wanted
    cap = limits.gpus_per_container
    if cap is not None and wanted > cap:
        return _refuse(
            "per_container_limit",
            f"{request.user} asked for {wanted} GPU slot(s) in one container; the limit is "
            f"{cap} per container (max_gpus_per_container / max_gpus)",
        )
    if limits.max_gpus is None:
        return None
    others = [h for h in holdings if h.user == request.user and h.container != request.container]
    used = len({h.slot_id for h in others})
    if used + wanted > limits.max_gpus:
        listing = "; ".join(describe_holding(h) for h in others) or "none"
        return _refuse(
            "user_limit",
            f"{request.user} holds {used} of max {limits.max_gpus} GPU slot(s) and asked for "
            f"{wanted} more; held: {listing}. Stop or remove a container (a stopped one keeps "
            "its GPU until its hold expires) or ask for fewer",
            holders=others,
        )
    return None


def _load(slots: Iterable[Slot], held: Iterable[str]) -> dict[tuple[str, int], list[int]]:
    """Per physical GPU ((node, index): a cluster has one GPU 0 per node): [held, total]."""
    load: dict[tuple[str, int], list[int]] = {}
    held_set = set(held)
    for slot in slots:
        entry = load.setdefault((slot.node, slot.gpu_index), [0, 0])
        entry[1] += 1
        entry[0] += slot.id in held_set
    return load


def _node_load(load: dict[tuple[str, int], list[int]]) -> dict[str, list[int]]:
    """Per node: [held, total] (one entry, "", on a single host)."""
    nodes: dict[str, list[int]] = {}
    for (node, _index), (taken, total) in load.items():
        entry = nodes.setdefault(node, [0, 0])
        entry[0] += taken
        entry[1] += total
    return nodes


def _pick(
    free: Sequence[Slot], all_slots: Sequence[Slot], held: set[str], count: int, strategy: str
) -> list[Slot]:
    """Greedy by strategy, re-scoring after each pick so a multi-slot request also spreads.
    In a cluster the node's load decides first (spread: the emptiest node, pack: the fullest
    that has room), then the GPU's on it."""
    load = _load(all_slots, held)
    nodes = _node_load(load)
    sign = 1 if strategy == "spread" else -1
    pool = list(free)
    picked: list[Slot] = []
    for _ in range(count):

        def score(slot: Slot) -> tuple:
            node_taken, node_total = nodes[slot.node]
            taken, total = load[(slot.node, slot.gpu_index)]
            return (
                sign * node_taken / node_total,
                sign * taken / total,
                slot.node,
                slot.gpu_index,
                slot.id,
            )

        best = min(pool, key=score)
        pool.remove(best)
        picked.append(best)
        load[(best.node, best.gpu_index)][0] += 1
        nodes[best.node][0] += 1
    return picked


def decide(
    request: GpuRequest,
    slots: Sequence[Slot],
    holdings: Sequence[Holding],
    limits: ResolvedLimits,
    strategy: str = "spread",
    now: datetime | None = None,
    preempt_running: bool = False,
    fair: FairShare | None = None,
) -> Decision:
    """Which slots `request` gets (see the module doc for the rules); `fair` (default: off)
    turns the priorities of rule 4 into effective ones."""
    args = (strategy, now, preempt_running, fair)
    if limits.max_gpu_equivalents is None or request.wanted <= 0:
        return _decide(request, slots, holdings, limits, *args)
    return _within_equivalents(request, slots, holdings, limits, *args)


def _within_equivalents(
    request: GpuRequest,
    slots: Sequence[Slot],
    holdings: Sequence[Holding],
    limits: ResolvedLimits,
    strategy: str,
    now: datetime | None,
    preempt_running: bool,
    fair: FairShare | None,
) -> Decision:
    """The `max_gpu_equivalents` quota: placement among the slots that fit what the user's
    other containers leave, then the sum of what was granted checked."""
    assert limits.max_gpu_equivalents is not None
    cap = Fraction(str(limits.max_gpu_equivalents))  # 0.5 is 1/2 exactly
    share = {slot.id: gpu_share(slot.profile, slot.compute_slices) for slot in slots}
    live = holdings if now is None else [h for h in holdings if h.live(now)]
    others = {
        h.slot_id: h for h in live if h.user == request.user and h.container != request.container
    }
    used = sum((share.get(slot_id, Fraction(1)) for slot_id in others), Fraction(0))
    left = cap - used
    fitting = [slot for slot in slots if share[slot.id] <= left]
    args = (strategy, now, preempt_running, fair)
    decision = _decide(request, fitting, holdings, limits, *args)
    granted = sum((share[slot_id] for slot_id in decision.granted), Fraction(0))
    if decision.ok and granted <= left:
        return decision
    if not decision.ok and (decision.code != "not_available" or len(fitting) == len(slots)):
        return decision
    if not decision.ok:  # not available: because of the quota, or on this machine at all?
        unfiltered = _decide(request, slots, holdings, limits, *args)
        if unfiltered.code == "not_available":
            return unfiltered
    listing = "; ".join(
        f"{describe_holding(h)} = {format_share(share.get(h.slot_id, Fraction(1)))}"
        for h in others.values()
    )
    if decision.ok:
        asked = format_share(granted)
    elif request.mig_profile or request.whole_gpu:
        slices = next(
            (s.compute_slices for s in slots if s.profile == request.mig_profile), COMPUTE_SLICES
        )
        asked = format_share(request.wanted * gpu_share(request.mig_profile, slices))
    else:
        asked = f"{request.wanted} slot(s), each at least {format_share(min(share.values()))}"
    return _refuse(
        "equivalents_limit",
        f"{request.user} holds {format_share(used)} of max {format_share(cap)} GPU "
        f"equivalents (max_gpu_equivalents; a whole GPU is 1, a MIG instance its share of its "
        f"GPU's compute slices: on a 7-slice GPU 2g.20gb = 2/7, on a 4-slice A30 2g.12gb = 1/2) "
        f"and asked for {asked} more; held: "
        f"{listing or 'none'}. Ask for a smaller MIG instance or fewer GPUs, or stop or remove "
        "a container (a stopped one keeps its GPU until its hold expires)",
        holders=tuple(others.values()),
    )


def _decide(
    request: GpuRequest,
    slots: Sequence[Slot],
    holdings: Sequence[Holding],
    limits: ResolvedLimits,
    strategy: str,
    now: datetime | None,
    preempt_running: bool,
    fair: FairShare | None,
) -> Decision:
    """The decision without the equivalents quota (rules 1-4)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {STRATEGIES}")
    if request.count < 0:
        return _refuse("bad_request", f"GPU count must be 0 or more, not {request.count}")
    if now is not None:
        holdings = [h for h in holdings if h.live(now)]
    if request.wanted == 0:
        return Decision()
    refusal = _check_quota(request, limits, holdings)
    if refusal:
        return refusal
    candidates = _candidates(request, slots, limits)
    if isinstance(candidates, Decision):
        return candidates
    wanted = request.wanted
    if len(candidates) < wanted:
        return _refuse(
            "not_available",
            f"this machine has {len(candidates)} slot(s) of the kind asked for; "
            f"{request.user} asked for {wanted}",
        )
    by_slot: dict[str, list[Holding]] = {}
    for holding in holdings:
        by_slot.setdefault(holding.slot_id, []).append(holding)
    own = [s for s in candidates if by_slot.get(s.id) and _only_container(by_slot[s.id], request)]
    free = [s for s in candidates if s.id not in by_slot]
    held_ids = set(by_slot)
    chosen = own[:wanted]
    if len(chosen) < wanted:
        rest = wanted - len(chosen)
        if len(free) >= rest:
            chosen += _pick(free, slots, held_ids, rest, strategy)
            return Decision(granted=tuple(s.id for s in chosen))
        chosen += free
        decision = _reclaim_or_refuse(
            request,
            limits,
            candidates,
            by_slot,
            chosen,
            wanted,
            preempt_running,
            fair or FairShare(),
        )
        if decision.ok:
            return decision
        return replace(decision, free=tuple(s.id for s in slots if s.id not in by_slot))
    return Decision(granted=tuple(s.id for s in chosen))


def _only_container(holders: list[Holding], request: GpuRequest) -> bool:
    """Held by the requesting container alone (its stopped self, or its own reservation)."""
    return all(h.container == request.container for h in holders)


def _reclaim_or_refuse(
    request: GpuRequest,
    limits: ResolvedLimits,
    candidates: Sequence[Slot],
    by_slot: dict[str, list[Holding]],
    chosen: list[Slot],
    wanted: int,
    preempt_running: bool,
    fair: FairShare,
) -> Decision:
    configured = request.priority if request.priority is not None else limits.priority
    priority = fair.effective(request.user, configured)
    chosen_ids = {s.id for s in chosen}
    victims: list[tuple[tuple, Slot, list[Holding]]] = []
    for slot in candidates:
        holders = by_slot.get(slot.id, [])
        if slot.id in chosen_ids or not holders:
            continue
        takeable = all(
            h.user != request.user
            and fair.effective(h.user, h.priority) < priority
            and (h.state == "stopped" or (h.state == "running" and preempt_running))
            for h in holders
        )
        if takeable:
            running = any(h.state == "running" for h in holders)
            lowest = min(fair.effective(h.user, h.priority) for h in holders)
            expiry = min((h.held_until for h in holders if h.held_until), default=None)
            order = (running, lowest, expiry is None, expiry or datetime.max, slot.id)
            victims.append((order, slot, holders))
    needed = wanted - len(chosen)
    if len(victims) >= needed:
        victims.sort(key=lambda v: v[0])
        taken = victims[:needed]
        granted = tuple(s.id for s in chosen) + tuple(slot.id for _, slot, _ in taken)
        reclaimed = tuple(h for _, _, holders in taken for h in holders)
        return Decision(granted=granted, reclaimed=reclaimed)
    return _busy(request, priority, candidates, by_slot, wanted, preempt_running)


def _busy(
    request: GpuRequest,
    priority: float,
    candidates: Sequence[Slot],
    by_slot: dict[str, list[Holding]],
    wanted: int,
    preempt_running: bool,
) -> Decision:
    holders = [h for s in candidates for h in by_slot.get(s.id, ())]
    expiries = [h.held_until for h in holders if h.state != "running" and h.held_until]
    earliest = min(expiries, default=None)
    per_user = Counter(h.user for h in holders)
    listing = "; ".join(describe_holding(h) for h in holders)
    text = (
        f"no free GPU slot for {request.user} ({wanted} wanted, priority {priority:g}): {listing}."
    )
    if earliest is not None:
        first = min((h for h in holders if h.held_until == earliest), key=lambda h: h.slot_id)
        text += (
            f" Earliest hold expiry: {earliest:%Y-%m-%d %H:%M} UTC (slot {first.slot_id}, "
            f"{first.user})."
        )
    else:
        text += " No hold expires on its own (all in use by running containers or reserved)."
    if not preempt_running and any(h.state == "running" for h in holders):
        text += " Running containers are never preempted (policies.preempt_running is off)."
    text += f" Holders: {', '.join(f'{u} x{n}' for u, n in per_user.most_common())}."
    return _refuse("busy", text, earliest, holders)
