"""What people are told about GPUs: waits, refusals and their own GPU use, in one wording.

The browser (the spawn page, the refusal page), the users' commands and the notebook widgets
all say the same thing because they all build it here, from the allocator's facts (its
`Decision`, the queue position, the inventory's slots, the user's limits). Pure: no clock of
its own, no I/O.

A `Message` is one sentence first (`headline`: "You are 2nd in line for a whole GPU; a MIG
2g.20gb slice is free now."), then what to do (`action`), then the details a curious user or an
admin wants (`details`: who holds what, which configuration key set a limit), and for a wait
the moment it gives up (`deadline`, for a countdown). It travels between processes as a dict
(`to_dict` / `from_dict`) in the spawner's progress events under `EVENT_KEY`, so a front end
that only sees the hub's event stream (the CLI through the broker, a remote CLI) renders the
same `Message` as the spawn page.

    wait_message(situation, now) -> Message          # still queued
    refusal_message(situation) -> Message             # the allocator said no for good
    timeout_message(situation) -> Message             # no slot within the wait limit
    lost_message(reason, attempts) -> Message         # slots taken before the start, N times
    node_lost_message(node, ended) -> Message         # a swarm node left under a server
    state_message(error) -> Message                   # the allocation state is not writable
    gpu_use(held, max_gpus) -> "1 of 2 GPUs in use (slot 0: NVIDIA A100)"
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ds01hub.errors import Ds01hubError
from ds01hub.units import format_duration, gpu_use

if TYPE_CHECKING:  # the users' commands read messages without the allocator's modules (start-up)
    from ds01hub.gpu.decision import Decision, GpuRequest, Holding
    from ds01hub.gpu.inventory import Slot
    from ds01hub.limits import ResolvedLimits

__all__ = [
    "EVENT_KEY",
    "KINDS",
    "Message",
    "MessageError",
    "Situation",
    "gpu_use",
    "lost_message",
    "node_lost_message",
    "ordinal",
    "refusal_message",
    "state_message",
    "timeout_message",
    "wait_message",
    "wanted_text",
]

#: The key of a progress event (the hub's event stream) that carries a `Message.to_dict()`.
EVENT_KEY = "ds01_message"
#: `Message.kind`: still waiting, refused (the spawn ends), or a running server stopped under
#: its user (said at its next start).
KINDS = ("wait", "refused", "stopped")
#: The configuration key that bounds a wait, named in the details (a spawner names its own:
#: `Situation.timeout_key`).
WAIT_TIMEOUT_KEY = "c.DS01Spawner.gpu_wait_timeout"
#: Bounds on a message that arrives from another process (`from_dict`).
_MAX_TEXT = 2000
_MAX_DETAILS = 64


class MessageError(Ds01hubError, ValueError):
    """A message dict that is not one `Message.to_dict` makes (names the field)."""


@dataclass(frozen=True)
class Message:
    """See the module docstring. `code` is the machine reason (`busy` while waiting;
    `gpu_wait`, `user_limit`, `per_container_limit`, `not_available`, `bad_request`,
    `gpu_lost`, `state` for refusals); `position`/`waiting` the queue place of a wait."""

    kind: str
    code: str
    headline: str
    action: str = ""
    details: tuple[str, ...] = ()
    deadline: datetime | None = None
    position: int | None = None
    waiting: int | None = None

    @property
    def refused(self) -> bool:
        return self.kind == "refused"

    def remaining(self, now: datetime) -> float | None:
        """Seconds until the wait gives up (never negative); None without a deadline."""
        if self.deadline is None:
            return None
        return max(0.0, (self.deadline - now).total_seconds())

    def countdown(self, now: datetime) -> str:
        """'gives up in 9m40s (at 14:20 UTC)'; '' without a deadline."""
        left = self.remaining(now)
        if left is None:
            return ""
        return f"gives up in {format_duration(math.ceil(left))} (at {self.deadline:%H:%M} UTC)"

    def text(self, now: datetime | None = None) -> str:
        """Plain text, the headline first: the countdown (when `now` is given), the action,
        then the details under a 'details:' line. For logs, the CLI and exceptions."""
        first = self.headline
        if now is not None and (countdown := self.countdown(now)):
            first += f" ({countdown})"
        lines = [first]
        if self.action:
            lines.append(self.action)
        if self.details:
            lines.append("details:")
            lines.extend(f"  {line}" for line in self.details)
        return "\n".join(lines)

    def html(self, back_url: str | None = None) -> str:
        """The same message for a web page (everything escaped): the headline in bold, a
        countdown element a page script can tick (`data-ds01-deadline`, ISO UTC), the action,
        the details folded behind a 'details' line, and a link back to the options form (for
        a refusal: while a start waits, the hub's page offers "Stop Server" instead)."""
        parts = [f'<div class="ds01-message ds01-{html.escape(self.kind)}">']
        parts.append(f'<strong class="ds01-headline">{html.escape(self.headline)}</strong>')
        if self.deadline is not None:
            stamp = html.escape(self.deadline.isoformat())
            parts.append(
                f' <span class="ds01-countdown" data-ds01-deadline="{stamp}">'
                f"(gives up at {self.deadline:%H:%M} UTC)</span>"
            )
        if self.action:
            parts.append(f'<div class="ds01-action">{html.escape(self.action)}</div>')
        if self.details:
            items = "".join(f"<li>{html.escape(line)}</li>" for line in self.details)
            parts.append(
                '<details class="ds01-details"><summary>details</summary>'
                f'<ul class="small mb-0">{items}</ul></details>'
            )
        if back_url:
            parts.append(
                f'<div><a class="ds01-back" href="{html.escape(back_url)}">'
                "Choose something else</a></div>"
            )
        parts.append("</div>")
        return "".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "code": self.code,
            "headline": self.headline,
            "action": self.action,
            "details": list(self.details),
            "deadline": self.deadline.isoformat() if self.deadline else None,
            "position": self.position,
            "waiting": self.waiting,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Message:
        """The inverse of `to_dict`, strictly: another process's (the hub's) event; anything
        else raises MessageError naming the field."""
        if not isinstance(data, Mapping):
            raise MessageError(f"a message is an object, not {type(data).__name__}")
        kind = _text(data, "kind")
        if kind not in KINDS:
            raise MessageError(f"message kind {kind!r} is not one of {', '.join(KINDS)}")
        details = data.get("details") or []
        if not isinstance(details, list) or len(details) > _MAX_DETAILS:
            raise MessageError(f"message details must be a list of at most {_MAX_DETAILS} texts")
        deadline = data.get("deadline")
        if deadline is not None:
            try:
                deadline = datetime.fromisoformat(_text(data, "deadline"))
            except ValueError:
                raise MessageError(f"message deadline {deadline!r} is not an ISO time") from None
            if deadline.tzinfo is None:
                deadline = deadline.replace(tzinfo=UTC)
        return cls(
            kind=kind,
            code=_text(data, "code"),
            headline=_text(data, "headline"),
            action=_text(data, "action", required=False),
            details=tuple(_checked_text(line, "details") for line in details),
            deadline=deadline,
            position=_count(data, "position"),
            waiting=_count(data, "waiting"),
        )

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> Message | None:
        """The message a progress event carries (`EVENT_KEY`), None if it carries none or a
        malformed one (an event is never worth failing a command over)."""
        data = event.get(EVENT_KEY)
        if data is None:
            return None
        try:
            return cls.from_dict(data)
        except MessageError:
            return None


def _checked_text(value: Any, key: str) -> str:
    if not isinstance(value, str) or len(value) > _MAX_TEXT:
        raise MessageError(f"message {key} must be a text of at most {_MAX_TEXT} characters")
    return value


def _text(data: Mapping[str, Any], key: str, required: bool = True) -> str:
    value = data.get(key)
    if value is None and not required:
        return ""
    return _checked_text(value, key)


def _count(data: Mapping[str, Any], key: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1_000_000:
        raise MessageError(f"message {key} must be a whole number >= 0, not {value!r}")
    return value


# -- the facts ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Situation:
    """What a message is built from: the request, the allocator's last decision about it,
    the machine's slots (kinds and names), the user's limits (only alternatives they may use
    are offered) and, while queued, the place in the queue and when the wait gives up."""

    request: GpuRequest
    decision: Decision
    slots: Sequence[Slot]
    limits: ResolvedLimits | None = None
    simulated: bool = False
    position: int | None = None
    waiting: int | None = None
    deadline: datetime | None = None
    #: the wait limit in seconds (named in the details with its configuration key)
    timeout: float | None = None
    #: the setting that bounds the wait, as the hub's configuration names it
    timeout_key: str = WAIT_TIMEOUT_KEY
    #: when a slot is expected, if the queue can estimate it
    expected: datetime | None = None
    notes: tuple[str, ...] = field(default=(), compare=False)


def ordinal(n: int) -> str:
    """1 -> 'next', 2 -> '2nd', 3 -> '3rd', 11 -> '11th', 22 -> '22nd' (a place in line)."""
    if n <= 1:
        return "next"
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _kind(profile: str | None, count: int = 1) -> str:
    """'a whole GPU', '2 whole GPUs', 'a MIG 2g.20gb slice', '3 MIG 2g.20gb slices'."""
    noun = f"MIG {profile} slice" if profile else "whole GPU"
    return f"a {noun}" if count == 1 else f"{count} {noun}s"


def _first_upper(text: str) -> str:
    """'a whole GPU' -> 'A whole GPU' (str.capitalize would lower the rest)."""
    return text[:1].upper() + text[1:]


def wanted_text(request: GpuRequest) -> str:
    """What the request asks for, as people say it: 'a whole GPU', 'a MIG 2g.20gb slice'."""
    if request.mig_profile:
        return _kind(request.mig_profile, request.wanted)
    if request.whole_gpu:
        return _kind(None, request.wanted)
    return "a GPU" if request.wanted == 1 else f"{request.wanted} GPUs"


def _may_use(profile: str | None, limits: ResolvedLimits | None) -> bool:
    if limits is None:
        return True
    if limits.gpus_per_container is not None and limits.gpus_per_container < 1:
        return False
    return profile is not None or limits.allow_full_gpu


def _free_now(situation: Situation) -> list[tuple[str | None, int]]:
    """Free slots by kind (whole GPUs first, then MIG profiles), only kinds the user may use."""
    by_id = {slot.id: slot for slot in situation.slots}
    counts: dict[str | None, int] = {}
    for slot_id in situation.decision.free:
        slot = by_id.get(slot_id)
        if slot is not None and _may_use(slot.profile, situation.limits):
            counts[slot.profile] = counts.get(slot.profile, 0) + 1
    return sorted(counts.items(), key=lambda item: (item[0] is not None, item[0] or ""))


def _free_phrase(free: list[tuple[str | None, int]]) -> str:
    """'a MIG 2g.20gb slice is free now', 'a whole GPU and 2 MIG 1g.10gb slices are free now'."""
    names = [_kind(profile, count) for profile, count in free]
    joined = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    plural = len(names) > 1 or free[0][1] > 1
    return f"{joined} {'are' if plural else 'is'} free now"


def _of_kind(situation: Situation) -> int:
    """How many slots of the requested kind the machine has."""
    request = situation.request
    if request.mig_profile:
        return sum(1 for s in situation.slots if s.profile == request.mig_profile)
    if request.whole_gpu:
        return sum(1 for s in situation.slots if s.profile is None)
    return len(situation.slots)


def _source(limits: ResolvedLimits | None, key: str) -> str:
    if limits is None:
        return ""
    return f" (from {limits.sources.get(key, 'the limits file')})"


def _holder_lines(holders: Iterable[Holding]) -> list[str]:
    from ds01hub.gpu.decision import describe_holding

    return [f"held: {describe_holding(h)}" for h in holders]


def _sim(situation: Situation) -> str:
    return " (SIMULATED)" if situation.simulated else ""


# -- waits ----------------------------------------------------------------------------------


def wait_message(situation: Situation, now: datetime) -> Message:
    """Still queued: the place in line and what is free instead, one sentence; the holders,
    the queue order and the wait limit in the details."""
    decision = situation.decision
    wanted = wanted_text(situation.request)
    place = ordinal(situation.position or 1)
    free = _free_now(situation)
    if free:
        tail = _free_phrase(free)
        action = "Keep waiting, or stop this start and pick what is free (or no GPU)."
    else:
        total = _of_kind(situation)
        tail = f"all {total} are in use" if total > 1 else "it is in use"
        if situation.expected is not None:
            tail += f"; one is expected at {situation.expected:%H:%M} UTC"
        elif decision.earliest_expiry is not None:
            tail += f"; the first hold ends at {decision.earliest_expiry:%H:%M} UTC at the latest"
        action = "Your server starts as soon as one is released."
    headline = f"You are {place} in line for {wanted}{_sim(situation)}; {tail}."
    details = [
        f"queue: position {situation.position or 1} of {situation.waiting or 1} "
        "(higher priority first, then who asked first)",
        f"asked for: {wanted}{_sim(situation)}, priority {_priority(situation)}",
        *_holder_lines(decision.holders),
    ]
    if decision.earliest_expiry is not None:
        details.append(
            f"earliest hold expiry: {decision.earliest_expiry:%Y-%m-%d %H:%M} UTC "
            "(stopped containers keep their GPU for gpu_hold_after_stop)"
        )
    if any(h.state == "running" for h in decision.holders):
        details.append("running containers are never preempted unless policies.preempt_running")
    if situation.timeout is not None:
        details.append(
            f"the wait gives up after {format_duration(situation.timeout)} "
            f"({situation.timeout_key})"
        )
    details.extend(situation.notes)
    return Message(
        kind="wait",
        code="busy",
        headline=headline,
        action=action,
        details=tuple(details),
        deadline=situation.deadline,
        position=situation.position,
        waiting=situation.waiting,
    )


def _priority(situation: Situation) -> str:
    request, limits = situation.request, situation.limits
    if request.priority is not None:
        return str(request.priority)
    return str(limits.priority) if limits is not None else "-"


# -- refusals -------------------------------------------------------------------------------


def timeout_message(situation: Situation) -> Message:
    """No slot of the kind asked for became free within the wait limit."""
    wanted = wanted_text(situation.request)
    waited = format_duration(situation.timeout) if situation.timeout is not None else "the limit"
    free = _free_now(situation)
    headline = f"{_first_upper(wanted)}{_sim(situation)} did not become free within {waited}"
    if free:
        headline += f", but {_free_phrase(free)}."
        action = "Choose what is free (or no GPU) in the options, or try again later."
    else:
        headline += "."
        action = (
            "Try again later, ask for less (or no) GPU, or stop a container of yours that "
            "holds one."
        )
    details = [*_holder_lines(situation.decision.holders)]
    if situation.decision.earliest_expiry is not None:
        details.append(
            f"earliest hold expiry: {situation.decision.earliest_expiry:%Y-%m-%d %H:%M} UTC"
        )
    if situation.timeout is not None:
        details.append(f"waited {format_duration(situation.timeout)} ({situation.timeout_key})")
    details.extend(situation.notes)
    return Message("refused", "gpu_wait", headline, action, tuple(details))


def refusal_message(situation: Situation) -> Message:
    """The allocator refused for a reason waiting cannot fix (quota, kind, bad request)."""
    decision, request, limits = situation.decision, situation.request, situation.limits
    wanted = wanted_text(request)
    details = [*_holder_lines(decision.holders)]
    if decision.code == "user_limit" and limits is not None and limits.max_gpus is not None:
        used = len({h.slot_id for h in decision.holders})
        more = "another" if request.wanted == 1 else f"{request.wanted} more"
        headline = (
            f"You already hold {used} of your {limits.max_gpus} GPU"
            f"{'s' if limits.max_gpus != 1 else ''}, so you cannot have {more}."
        )
        action = (
            "Stop or remove a container that holds one (a stopped container keeps its GPU "
            "until its hold ends), or start this one without a GPU."
        )
        details.append(f"max_gpus: {limits.max_gpus}{_source(limits, 'max_gpus')}")
    elif decision.code == "per_container_limit" and limits is not None:
        cap = limits.gpus_per_container
        headline = f"You may use at most {cap} GPU{'s' if cap != 1 else ''} in one container."
        action = "Ask for fewer GPUs."
        details.append(
            f"max_gpus_per_container: {limits.max_gpus_per_container}"
            f"{_source(limits, 'max_gpus_per_container')}; max_gpus: {limits.max_gpus}"
            f"{_source(limits, 'max_gpus')}"
        )
    elif decision.code == "equivalents_limit" and limits is not None:
        headline = (
            f"{_first_upper(wanted)} would take you past your {limits.max_gpu_equivalents:g} "
            "GPU equivalents (a whole GPU is 1, a MIG instance its share of the GPU)."
        )
        action = (
            "Ask for a smaller MIG instance or fewer GPUs, or stop or remove a container that "
            "holds one."
        )
    elif decision.code == "not_available":
        headline, action = _not_available(situation)
    else:
        headline = f"{_first_upper(wanted)} cannot be given to you."
        action = "Change what you ask for and try again."
    if decision.reason and decision.code not in ("user_limit", "per_container_limit"):
        details.append(f"allocator: {decision.reason}")  # the others' facts are listed above
    details.extend(situation.notes)
    return Message("refused", decision.code, headline, action, tuple(details))


def _not_available(situation: Situation) -> tuple[str, str]:
    request, limits = situation.request, situation.limits
    profiles = sorted({s.profile for s in situation.slots if s.profile})
    if request.mig_profile and request.mig_profile not in profiles:
        here = ", ".join(profiles)
        return (
            f"This machine has no MIG {request.mig_profile} slices.",
            f"Choose one it has ({here})." if here else "Ask for whole GPUs or no GPU.",
        )
    if limits is not None and not limits.allow_full_gpu and not request.mig_profile:
        return (
            "Your limits allow MIG slices only, not whole GPUs.",
            "Ask for a MIG slice"
            + (f" ({', '.join(profiles)})." if profiles else " (this machine has none)."),
        )
    total = _of_kind(situation)
    return (
        f"This machine has {total} slot{'s' if total != 1 else ''} of the kind asked for "
        f"({wanted_text(request)}).",
        "Ask for fewer.",
    )


def lost_message(reason: str, attempts: int) -> Message:
    """The check right before `docker start` found the granted slots gone, `attempts` times."""
    return Message(
        "refused",
        "gpu_lost",
        "Your GPU was taken by another start before your server could use it"
        + (f", {attempts} times in a row." if attempts > 1 else "."),
        "Start your server again.",
        (f"last check before docker start: {reason}",),
    )


def node_lost_message(node: str, ended: str = "") -> Message:
    """A server of a swarm stopped because the machine it ran on left the cluster (it died or
    lost its network: Swarm marked its node down). Its service is stopped for good (a start
    makes a new one), so nothing of it comes back with the machine."""
    details = [f"machine {node}: its Docker Swarm node went down while your server ran there"]
    if ended:
        details.append(f"its task: {ended}")
    return Message(
        "stopped",
        "node_lost",
        f"Your server stopped: the machine left the cluster ({node}).",
        "Start it again: it starts on a machine of the cluster that is up. What it had in "
        "memory is lost.",
        tuple(details),
    )


def state_message(error: str) -> Message:
    """The allocator could not write its state (a full disk, permissions)."""
    return Message(
        "refused",
        "state",
        "GPUs cannot be handed out right now: the hub cannot record them.",
        "Tell an admin; you can start without a GPU meanwhile.",
        (f"allocation state: {error}",),
    )
