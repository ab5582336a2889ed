"""Who holds what in a swarm, from Swarm's own objects: services, their tasks, the nodes.

On one host the allocator rebuilds holdings from container documents (labels + State). In a
swarm each server is a *service* (one replica, on the node of its slot; stopped = scaled to
zero), and `service_documents` turns services into the same documents, so `GpuAllocator`,
its claims, holds, reclaim and ghost removal work unchanged and a hub restarted on any manager
loses nothing (nothing is on the hub's disk but in-flight claims):

- the service's labels are the signed `ds01.*` labels (signed for the service's name);
- `running` while it is desired to run and a task of it is not over (pending to running, on a
  live node): Swarm keeps the slot for it, so the allocator must too;
- `exited` when its tasks ended (scaled to zero, failed), `FinishedAt` the last end; when the
  node of its slot is down, it ended when the node went down (Swarm's `UpdatedAt` of the node,
  or the task's orphaning): the server is reported stopped and its slots are held for its
  hold, then free;
- `created` while it was never started (zero replicas, no task yet).

`swarm_lister` / `swarm_remover` are the allocator's edges (`container_lister`,
`container_remover`) over the manager's API.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ds01hub import labels
from ds01hub.provenance import Provenance

__all__ = [
    "ENDED_TASK_STATES",
    "LostService",
    "create_service",
    "lost_services",
    "replicas",
    "scale_service",
    "service_documents",
    "stop_lost_services",
    "swarm_lister",
    "swarm_remover",
]

ZERO_TIME = "0001-01-01T00:00:00Z"
#: task states that end a task (Swarm *orphans* the tasks of a node the moment it is marked down)
ENDED_TASK_STATES = frozenset({"complete", "shutdown", "failed", "rejected", "orphaned", "remove"})


def replicas(service: Mapping[str, Any]) -> int:
    """The replicas a service is desired to run (0: stopped)."""
    mode = (service.get("Spec") or {}).get("Mode") or {}
    return int((mode.get("Replicated") or {}).get("Replicas") or 0)


def _task_state(task: Mapping[str, Any]) -> str:
    return str((task.get("Status") or {}).get("State") or "")


def _task_time(task: Mapping[str, Any]) -> str:
    return str((task.get("Status") or {}).get("Timestamp") or ZERO_TIME)


def _placed_on(service: Mapping[str, Any]) -> str | None:
    """The hostname of the `node.hostname==X` constraint (a GPU server's slot node), if any."""
    template = (service.get("Spec") or {}).get("TaskTemplate") or {}
    for constraint in (template.get("Placement") or {}).get("Constraints") or []:
        key, sep, value = str(constraint).partition("==")
        if sep and key.strip() == "node.hostname":
            return value.strip()
    return None


def service_document(
    service: Mapping[str, Any],
    tasks: Iterable[Mapping[str, Any]],
    lost: Mapping[str, tuple[str, str]],
) -> dict[str, Any]:
    """One service as a container inspect document. `lost`: node id -> (hostname, when it was
    last updated) for every node that is not ready.

    - its node (the placement constraint) is lost: `exited`, when its task ended or the node
      went down;
    - desired to run (replicas > 0) with a task that is not over (pending to running, on a
      live node) or none yet: `running` (Swarm keeps the slot for it);
    - a task of it ended (or its node went under it): `exited` at that moment;
    - else `created` (never started)."""
    spec = service.get("Spec") or {}
    lost_hosts = {host: when for host, when in lost.values()}
    tasks = sorted(tasks, key=_task_time)
    ended: list[str] = []
    live = []
    for task in tasks:
        node = lost.get(str(task.get("NodeID")))
        if _task_state(task) in ENDED_TASK_STATES:
            ended.append(_task_time(task))
        elif node is not None:
            ended.append(node[1])
        else:
            live.append(task)
    placed = _placed_on(service)
    if placed in lost_hosts:
        status, finished = "exited", max(ended, default=lost_hosts[placed])
    elif replicas(service) and (live or not tasks):
        status, finished = "running", ZERO_TIME
    elif ended:
        status, finished = "exited", max(ended)
    elif service.get("PreviousSpec"):
        # updated since its creation at zero replicas, i.e. scaled up (and down again): it ran,
        # and Swarm has reaped its ended tasks; it stopped when last updated
        status, finished = "exited", str(service.get("UpdatedAt") or ZERO_TIME)
    else:
        status, finished = "created", ZERO_TIME
    ran = [_task_time(t) for t in tasks if _task_state(t) not in ("new", "pending", "assigned")]
    node_id = (live or tasks or [{}])[-1].get("NodeID", "")
    if not node_id and placed:
        node_id = next((nid for nid, (host, _) in lost.items() if host == placed), "")
    return {
        "Id": service["ID"],
        "Name": f"/{spec.get('Name', '')}",
        "Created": service.get("CreatedAt", ZERO_TIME),
        "Config": {"Labels": dict(spec.get("Labels") or {}), "Image": _image(spec)},
        "State": {
            "Status": status,
            "Running": status == "running",
            "StartedAt": min(ran, default=ZERO_TIME),
            "FinishedAt": finished,
        },
        "Node": node_id,
    }


def _image(spec: Mapping[str, Any]) -> str:
    return str(((spec.get("TaskTemplate") or {}).get("ContainerSpec") or {}).get("Image", ""))


def service_documents(
    services: Iterable[Mapping[str, Any]],
    tasks: Iterable[Mapping[str, Any]],
    nodes: Iterable[Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """Every service as a container document (see the module doc)."""
    lost = {
        str(n["ID"]): (
            str((n.get("Description") or {}).get("Hostname", "")),
            str(n.get("UpdatedAt") or ZERO_TIME),
        )
        for n in nodes
        if (n.get("Status") or {}).get("State") != "ready"
    }
    by_service: dict[str, list[Mapping[str, Any]]] = {}
    for task in tasks:
        by_service.setdefault(str(task.get("ServiceID")), []).append(task)
    return [service_document(s, by_service.get(s["ID"], []), lost) for s in services]


@dataclass(frozen=True)
class LostService:
    """A service desired to run whose task ended after its last start: `node` is the hostname
    of the machine that left the cluster under it ('' when the task ended by itself, `ended`
    then says how)."""

    id: str
    name: str
    node: str
    ended: str


#: how Swarm ends the task of a node that left (marked down: the constraint enforcer rejects
#: it; or orphaned): such a task never comes back, and no new one is made (restart: none)
_NODE_GONE_MARKS = ("no longer meets constraints", "orphaned")


def _name(service: Mapping[str, Any]) -> str:
    return str((service.get("Spec") or {}).get("Name", ""))


def _time(value: Any) -> datetime:
    return labels.parse_docker_time(value) or datetime.min.replace(tzinfo=UTC)


def lost_services(
    services: Iterable[Mapping[str, Any]],
    tasks: Iterable[Mapping[str, Any]],
    nodes: Iterable[Mapping[str, Any]],
) -> list[LostService]:
    """The services desired to run (replicas > 0) that run nothing any more: their task ended,
    or its node is down, *after* the service was last updated (scaled to one), so a start in
    flight (scaled, its new task not made yet) is never one. Swarm leaves such a service as it
    is (restart policy none: no new task, also when the node comes back), but it is still
    "desired": the hub must scale it to zero so that it never runs again unasked, and tell its
    user why (`node`: the machine left the cluster)."""
    nodes = list(nodes)
    hostname = {
        str(n.get("ID")): str((n.get("Description") or {}).get("Hostname", "")) for n in nodes
    }
    down = {
        str(n["ID"]): _time(n.get("UpdatedAt"))
        for n in nodes
        if (n.get("Status") or {}).get("State") != "ready"
    }
    by_service: dict[str, list[Mapping[str, Any]]] = {}
    for task in tasks:
        by_service.setdefault(str(task.get("ServiceID")), []).append(task)
    lost = []
    for service in services:
        mine = by_service.get(str(service.get("ID")), [])
        if not replicas(service) or not mine:
            continue
        node_id = ""
        ended_at = None
        how = ""
        for task in sorted(mine, key=lambda t: _time(t.get("CreatedAt"))):
            state = _task_state(task)
            task_node = str(task.get("NodeID") or "")
            if state in ENDED_TASK_STATES:
                when = _time(_task_time(task))
                status = task.get("Status") or {}
                how = f"{state}: {status.get('Err') or status.get('Message') or ''}".strip(": ")
            elif task_node in down:
                when, how = down[task_node], ""
            else:
                break  # a task that still runs (or is about to)
            if ended_at is None or when >= ended_at:
                ended_at, node_id = when, task_node
        else:
            if ended_at is None or ended_at <= _time(service.get("UpdatedAt")):
                continue
            gone = node_id in down or any(mark in how for mark in _NODE_GONE_MARKS)
            node = hostname.get(node_id, node_id) if gone else ""
            lost.append(LostService(str(service["ID"]), _name(service), node, how))
    return lost


def stop_lost_services(client: Any, trust: Provenance | None = None) -> list[LostService]:
    """Scale this deployment's `lost_services` to zero (each is then a stopped server with
    its hold, as on one host). Run before each allocation and by the hub's poll, so a node
    that comes back never runs, nor has its slots counted for, a server the hub stopped."""
    scope = trust.label_filters() if trust else [f"{labels.MANAGED}=true"]
    services = [
        s
        for s in client.api.services(filters={"label": scope})
        if trust is None or trust.verify((s.get("Spec") or {}).get("Labels"), _name(s))
    ]
    if not any(replicas(s) for s in services):
        return []
    lost = lost_services(services, client.api.tasks(), client.api.nodes())
    for service in lost:
        scale_service(client, service.id, 0)
    return lost


def swarm_lister(client: Any, trust: Provenance | None = None) -> Callable[[], list[dict]]:
    """The allocator's `container_lister` over a manager's API: this deployment's services
    (the label filter only narrows; the allocator verifies each signature)."""
    scope = trust.label_filters() if trust else [f"{labels.MANAGED}=true"]

    def list_services() -> list[dict]:
        services = client.api.services(filters={"label": scope})
        if not services:
            return []
        return service_documents(services, client.api.tasks(), client.api.nodes())

    return list_services


def swarm_remover(client: Any) -> Callable[[str], bool]:
    """Remove a never-started service (a ghost): False when a task of it runs meanwhile."""

    def remove(service_id: str) -> bool:
        import docker.errors

        try:
            tasks = client.api.tasks(filters={"service": service_id})
            if any(_task_state(t) == "running" for t in tasks):
                return False
            client.api.remove_service(service_id)
        except docker.errors.NotFound:
            return True
        return True

    return remove


def create_service(client: Any, body: Mapping[str, Any]) -> str:
    """`POST /services/create` with a body of `ds01hub.spawner.swarm_plan.service_spec`
    (docker-py's helper types cannot express a reservation of named generic resources)."""
    response = client.api._post_json(client.api._url("/services/create"), data=dict(body))
    return str(client.api._result(response, True)["ID"])


def scale_service(client: Any, service_id: str, replicas: int) -> None:
    """Set the service's replicas (1: start its server; 0: stop it and keep the service, so its
    hold and a restart work as a stopped container's do)."""
    service = client.api.inspect_service(service_id)
    spec = dict(service["Spec"])
    spec["Mode"] = {"Replicated": {"Replicas": replicas}}
    url = client.api._url("/services/{0}/update", service_id)
    response = client.api._post_json(
        url, data=spec, params={"version": service["Version"]["Index"]}
    )
    client.api._raise_for_status(response)
