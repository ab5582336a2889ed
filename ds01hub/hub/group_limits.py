"""Limits from JupyterHub group properties: the hub's edge of `ds01hub.limits`.

An admin sets a group's limits in the hub's admin panel or over its REST API
(`PUT /hub/api/groups/NAME/properties` with `{"ds01": {"max_gpus": 2, "memory": "64g"}}`); the
hub keeps them in its database and the spawner reads them from its own ORM on every spawn, so an
edit takes effect on the next spawn. Precedence: `user_overrides` > group properties > YAML
groups > `defaults`. Each group's `ds01` property is checked by the YAML's readers
(`ds01hub.limits.parse_group_properties`, the same messages); a bad one refuses the spawns of
its members with that message and is listed on the ds01-ops admin page: never half-applied.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from ds01hub.limits import (
    HUB_PROPERTY,
    HubGroupLimits,
    LimitsConfig,
    LimitsError,
    Problem,
    ResolvedLimits,
    parse_group_properties,
)

__all__ = [
    "GroupLimits",
    "fetch_group_limits",
    "group_refusal",
    "hub_group_limits",
    "orm_user_limits",
    "user_group_limits",
]


def hub_group_limits(groups: Iterable[tuple[str, Any]]) -> list[HubGroupLimits]:
    """The validated limits of (name, properties) pairs that have any, in name order; one
    LimitsError listing the problems of every bad group."""
    layers: list[HubGroupLimits] = []
    problems: list[Problem] = []
    for name, properties in sorted(groups, key=lambda pair: str(pair[0])):
        try:
            layer = parse_group_properties(name, properties)
        except LimitsError as error:
            problems += error.problems
            continue
        if layer is not None:
            layers.append(layer)
    if problems:
        raise LimitsError(problems)
    return layers


def orm_user_limits(config: LimitsConfig, user: str, orm_groups: Iterable[Any]) -> ResolvedLimits:
    """A hub user's limits with their groups (`user.groups`: ORM objects with `name` and
    `properties`) as the hub's database has them now: the spawners, on every spawn, so an edit
    applies at once. LimitsError when a property of one of the groups is bad."""
    groups = list(orm_groups)
    hub_groups = hub_group_limits((g.name, g.properties) for g in groups)
    return config.resolve(user, [g.name for g in groups], hub_groups=hub_groups)


def group_refusal(user: str, error: LimitsError) -> str:
    """What a spawn refused for a bad group property says (409): the problems and who fixes
    them."""
    return (
        f"{error.summary()} (a group of {user}):\n"
        + "\n".join(error.lines())
        + "\nAn admin fixes the group's properties (hub admin panel, or PUT "
        "/hub/api/groups/NAME/properties); until then its members cannot start servers."
    )


@dataclass
class GroupLimits:
    """Every hub group's limits as the REST API gives them: `layers` of the good groups,
    `problems` of the bad ones (by group), for the admin page, the CLI and the culler; with
    each group's `members` and its `ds01` property as given (`properties`), which the ds01-ops
    pass writes to the snapshot the other doors read (ds01hub.hub.group_snapshot)."""

    layers: dict[str, HubGroupLimits] = field(default_factory=dict)
    problems: dict[str, list[Problem]] = field(default_factory=dict)
    members: dict[str, tuple[str, ...]] = field(default_factory=dict)
    properties: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, properties: Any, users: Iterable[str] = ()) -> None:
        """One group: its members, and its `ds01` property checked by the YAML's readers."""
        self.members[name] = tuple(users)
        if isinstance(properties, Mapping) and HUB_PROPERTY in properties:
            self.properties[name] = properties[HUB_PROPERTY]
        try:
            layer = parse_group_properties(name, properties)
        except LimitsError as error:
            self.problems[name] = error.problems
            return
        if layer is not None:
            self.layers[name] = layer

    def for_groups(self, names: Iterable[str]) -> list[HubGroupLimits]:
        """The layers of these groups (a user's), in name order; LimitsError when one of them
        is bad (the user's spawn would be refused the same way)."""
        wanted = sorted(set(names))
        bad = [p for name in wanted for p in self.problems.get(name, ())]
        if bad:
            raise LimitsError(bad)
        return [self.layers[name] for name in wanted if name in self.layers]


async def fetch_group_limits(hub: Any, page: int = 200) -> GroupLimits:
    """All groups' limits and members from the hub REST API (`hub`: a
    `ds01hub.hub.client.HubClient` whose token may read groups: `read:groups`)."""
    found = GroupLimits()
    offset = 0
    while True:
        params = {"offset": str(offset), "limit": str(page)}
        batch = await hub.request("GET", "/groups", params=params) or []
        for model in batch:
            name = model.get("name")
            if not isinstance(name, str):
                continue
            users = [u for u in model.get("users") or () if isinstance(u, str)]
            found.add(name, model.get("properties"), users)
        if len(batch) < page:
            return found
        offset += page


async def user_group_limits(hub: Any, user: str) -> tuple[list[str], list[HubGroupLimits]]:
    """One user's group names and their groups' validated limits, from the hub REST API
    (`ds01hub limits USER --hub`)."""
    model = await hub.request("GET", f"/users/{quote(user, safe='')}")
    names = [g for g in (model or {}).get("groups") or () if isinstance(g, str)]
    groups: list[tuple[str, Mapping]] = []
    for name in names:
        group = await hub.request("GET", f"/groups/{quote(name, safe='')}") or {}
        groups.append((name, group.get("properties") or {}))
    return names, hub_group_limits(groups)
