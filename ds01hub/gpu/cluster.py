"""A Docker Swarm of GPU servers as one inventory: node generic resources <-> node-qualified slots.

Each node declares its slots to Swarm itself, in its daemon config (`node-generic-resources`),
one *kind per slot*, its value the slot's UUID:

    DS01-GPU-0=GPU-8c1d...            a whole GPU (slot "0")
    DS01-MIG-1:2-1g.10gb=MIG-4a7e...  MIG device 2 of GPU 1, profile 1g.10gb (slot "1:2")

`daemon_json(inventory)` writes that snippet from the node's NVML (or simulated) inventory
(`ds01hub gpus --swarm-daemon-json`); the hub reads it back from the manager's node objects
(`cluster_inventory`), so membership and inventory are Swarm's, not a list of ours.

Why one kind per slot: a service reserving `DS01-GPU-0: 1` with a placement constraint on its
node can only get that exact slot, and Swarm never assigns one named resource to two tasks. So
exclusivity is kept twice: ds01hub's allocator decides the slot (priorities, holds, quotas across
nodes), and Swarm's generic-resource assignment refuses to run a second task on it (the task
stays pending: "insufficient resources"). A shared kind (`NVIDIA-GPU=3`) would let Swarm pick a
different UUID than the allocator chose.

A cluster slot id is `<node hostname>/<slot id on the node>`: `node1/0`, `node2/1:2`. Nodes that
are down or drained contribute no slots for new servers (`offered`); their holdings are for the
caller to end (`lost_nodes`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ds01hub.errors import Ds01hubError
from ds01hub.gpu.inventory import Inventory, Slot
from ds01hub.mig import parse_profile

__all__ = [
    "ClusterError",
    "ClusterNode",
    "cluster_inventory",
    "daemon_json",
    "generic_resources",
    "lost_nodes",
    "node_of",
    "parse_node",
    "qualify",
    "resource_kind",
    "split_slot_id",
]

GPU_KIND = "DS01-GPU-"
MIG_KIND = "DS01-MIG-"
#: hostnames as Docker reports them; the separator "/" can never be part of one
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,252})")
_GPU = re.compile(r"DS01-GPU-(?P<gpu>[0-9]{1,3})")
_MIG = re.compile(r"DS01-MIG-(?P<gpu>[0-9]{1,3}):(?P<mig>[0-9]{1,3})-(?P<profile>[^\s=,]+)")
_UUID = re.compile(r"(?:GPU|MIG)-[A-Za-z0-9._/-]{1,128}")


class ClusterError(Ds01hubError, ValueError):
    """A node object, slot id or generic resource that ds01hub cannot read; says which."""


@dataclass(frozen=True)
class ClusterNode:
    """One Swarm node as the allocator sees it. `ready` is Swarm's status (the node's engine
    answers the managers); `active` its availability (drain and pause take no new tasks)."""

    id: str
    hostname: str
    ready: bool
    active: bool
    manager: bool
    slots: tuple[Slot, ...]
    problems: tuple[str, ...] = ()

    @property
    def offered(self) -> bool:
        """Whether new servers may be placed here."""
        return self.ready and self.active


def qualify(node: str, slot_id: str) -> str:
    return f"{node}/{slot_id}"


def split_slot_id(slot_id: str) -> tuple[str, str]:
    """`node1/0:1` -> ("node1", "0:1"); a single-host id ("0:1") -> ("", "0:1")."""
    node, sep, local = slot_id.rpartition("/")
    if sep and not _HOSTNAME.fullmatch(node):
        raise ClusterError(f"slot id {slot_id!r}: {node!r} is not a node hostname")
    return node, local


def node_of(slot_id: str) -> str:
    return split_slot_id(slot_id)[0]


def resource_kind(slot: Slot) -> str:
    """The generic-resource kind naming `slot` on its node (see the module doc)."""
    _node, local = split_slot_id(slot.id)
    if slot.profile is None:
        return f"{GPU_KIND}{local}"
    return f"{MIG_KIND}{local}-{slot.profile}"


def generic_resources(inventory: Inventory) -> list[str]:
    """`node-generic-resources` entries for this node's daemon.json, one per slot."""
    return [f"{resource_kind(slot)}={slot.uuid}" for slot in inventory.slots]


def daemon_json(inventory: Inventory) -> dict[str, Any]:
    """The part of /etc/docker/daemon.json a node needs to offer its slots to the swarm."""
    return {"node-generic-resources": generic_resources(inventory)}


def _slot(node: str, kind: str, uuid: str, simulated: bool) -> Slot:
    if not _UUID.fullmatch(uuid):
        raise ClusterError(f"generic resource {kind}={uuid!r}: the value is not a GPU/MIG UUID")
    if match := _GPU.fullmatch(kind):
        index = int(match["gpu"])
        return Slot(qualify(node, str(index)), index, uuid, "GPU", None, 0, simulated, node)
    if match := _MIG.fullmatch(kind):
        profile = parse_profile(match["profile"])
        if profile is None:
            raise ClusterError(f"generic resource {kind}: {match['profile']!r} is no MIG profile")
        index, local = int(match["gpu"]), f"{int(match['gpu'])}:{int(match['mig'])}"
        return Slot(
            qualify(node, local),
            index,
            uuid,
            f"MIG {profile.name}",
            profile.name,
            profile.memory_mb,
            simulated,
            node,
        )
    raise ClusterError(f"generic resource kind {kind!r} is not a ds01hub slot")


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ClusterError(f"node object: {where} is not an object")
    return value


def parse_node(attrs: Mapping[str, Any], simulated: bool = False) -> ClusterNode:
    """A Docker node object (`GET /nodes`) -> ClusterNode. Generic resources that are not
    ds01hub slots (another tool's kinds) are ignored; malformed ones of ours are listed in
    `problems` and offered to nobody, so one bad node never hides the others."""
    if not isinstance(attrs, Mapping) or not isinstance(attrs.get("ID"), str):
        raise ClusterError("node object without an ID")
    description = _mapping(attrs.get("Description"), "Description")
    hostname = description.get("Hostname")
    if not isinstance(hostname, str) or not _HOSTNAME.fullmatch(hostname):
        raise ClusterError(f"node {attrs['ID']}: hostname {hostname!r} is not usable")
    spec = _mapping(attrs.get("Spec"), "Spec")
    status = _mapping(attrs.get("Status"), "Status")
    resources = _mapping(description.get("Resources"), "Resources").get("GenericResources") or []
    slots: list[Slot] = []
    problems: list[str] = []
    for entry in resources if isinstance(resources, list) else []:
        named = _mapping(entry, "GenericResources").get("NamedResourceSpec")
        if not isinstance(named, Mapping):
            continue
        kind, value = named.get("Kind"), named.get("Value")
        if not isinstance(kind, str) or not kind.startswith(("DS01-GPU-", "DS01-MIG-")):
            continue
        try:
            slots.append(_slot(hostname, kind, str(value), simulated))
        except ClusterError as error:
            problems.append(str(error))
    slots.sort(key=lambda s: (s.gpu_index, s.id))
    return ClusterNode(
        id=attrs["ID"],
        hostname=hostname,
        ready=status.get("State") == "ready",
        active=spec.get("Availability", "active") == "active",
        manager=spec.get("Role") == "manager",
        slots=tuple(slots),
        problems=tuple(problems),
    )


def cluster_inventory(nodes: Iterable[ClusterNode]) -> Inventory:
    """One inventory of the slots of every node that takes new servers (`offered`). Live
    queries (utilisation) are per node and come from the nodes' metrics endpoints, not here."""
    slots = [slot for node in nodes if node.offered for slot in node.slots]
    simulated = any(slot.simulated for slot in slots)
    reason = None if slots else "no node of the swarm offers a GPU slot (ready and active)"
    return Inventory(gpus=[], slots=slots, simulated=simulated, reason=reason)


def lost_nodes(nodes: Sequence[ClusterNode]) -> set[str]:
    """Hostnames of nodes that are not ready: their servers are gone with them."""
    return {node.hostname for node in nodes if not node.ready}
