"""A server as a Swarm service, pure: what ds01hub asks the manager to create for granted slots.

The service is placed on the node of its slots (`node.hostname==<node>`) and *reserves* each
slot's own generic-resource kind (`ds01hub.gpu.cluster`), so Swarm runs it only where that
exact slot is free and never gives the slot to a second task: the allocator chooses, Swarm
enforces. The container sees the slot UUIDs in `NVIDIA_VISIBLE_DEVICES` (what the NVIDIA
runtime hands to it; Swarm also sets `DOCKER_RESOURCE_<KIND>`). The signed `ds01.*` labels are
on the service (state, `ds01hub.gpu.swarm_state`) and on its containers (each node's socket
proxy and the CLI read them there). A new service has zero replicas: `begin_start` confirms the
slots under the allocator's lock, then the spawner scales it to one; stop scales it to zero, so
the service (and its hold) stays, as a stopped container does on one host.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ds01hub import labels
from ds01hub.gpu.cluster import ClusterError, resource_kind
from ds01hub.gpu.inventory import Slot

__all__ = ["service_name", "service_spec"]

#: Swarm's limit for a service name (a DNS label)
MAX_SERVICE_NAME = 63


def service_name(user: str, project: str | None = None) -> str:
    """`{project}--{user}`, escaped as container names are (`labels.escape_name`: only
    `[a-z0-9-]`, and `--` never inside an escaped part), since a service name must be a DNS
    label. It is the server's name everywhere in swarm mode: claims, signatures, the hub."""
    name = f"{labels.escape_name(project or labels.DEFAULT_PROJECT)}--{labels.escape_name(user)}"
    if len(name) > MAX_SERVICE_NAME:
        raise ClusterError(
            f"server name {name!r} is {len(name)} characters; Swarm allows "
            f"{MAX_SERVICE_NAME}: use a shorter server (project) name"
        )
    if name.startswith("-"):
        raise ClusterError(
            f"server name {name!r} starts with '-' (Swarm wants a DNS label): start the "
            "server (project) name with a letter or digit"
        )
    return name


def service_spec(
    *,
    name: str,
    image: str,
    command: Sequence[str] | None,
    env: Mapping[str, str],
    signed_labels: Mapping[str, str],
    slots: Sequence[Slot],
    node: str | None = None,
    nano_cpus: int | None = None,
    memory_bytes: int | None = None,
) -> dict[str, Any]:
    """The body of `POST /services/create` (Docker Engine API) for one server. `node` places a
    server without GPUs (None: anywhere); with slots it must be theirs."""
    nodes = {slot.node for slot in slots}
    if len(nodes) > 1 or "" in nodes:
        raise ClusterError(f"slots {[s.id for s in slots]} are not all on one swarm node")
    placed = next(iter(nodes), node)
    if node is not None and placed != node:
        raise ClusterError(f"slots on {placed} cannot be placed on {node}")
    environment = dict(env)
    if slots:
        environment["NVIDIA_VISIBLE_DEVICES"] = ",".join(slot.uuid for slot in slots)
    container: dict[str, Any] = {
        "Image": image,
        "Env": [f"{key}={value}" for key, value in sorted(environment.items())],
        "Labels": dict(signed_labels),
    }
    if command:
        container["Args"] = list(command)
    resources: dict[str, Any] = {}
    limits = {
        key: value
        for key, value in (("NanoCPUs", nano_cpus), ("MemoryBytes", memory_bytes))
        if value
    }
    if limits:
        resources["Limits"] = limits
    if slots:
        resources["Reservations"] = {
            "GenericResources": [
                {"DiscreteResourceSpec": {"Kind": resource_kind(slot), "Value": 1}}
                for slot in slots
            ]
        }
    template: dict[str, Any] = {
        "ContainerSpec": container,
        "Resources": resources,
        "RestartPolicy": {"Condition": "none"},
    }
    if placed:
        template["Placement"] = {"Constraints": [f"node.hostname=={placed}"]}
    return {
        "Name": name,
        "Labels": dict(signed_labels),
        "TaskTemplate": template,
        "Mode": {"Replicated": {"Replicas": 0}},
    }
