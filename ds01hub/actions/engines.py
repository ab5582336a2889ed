"""Where the users' containers are, for `UserOperations`: one Docker engine, or a Swarm.

`UserOperations` finds a user's containers by their signed labels and acts on them by id; it
needs only the calls below. `LocalContainers` is one engine (docker-py, as before).
`SwarmContainers` is a Docker Swarm where each server is a service (`ds01hub.spawner.swarm_plan`):

- **listing and state go through the manager**: the services (their signed labels, signed for
  the service's name) and their tasks, read as container documents by the allocator's own
  `ds01hub.gpu.swarm_state.service_documents`, so `container-list` says what the allocator
  believes. A document's id is the *service's* id.
- **a container's inside goes through its node's engine** (`ds01hub.gpu.swarm_nodes`: the
  node's endpoint and mutual-TLS credentials): exec, stats, processes, a forced stop. Which
  container, on which node, is the manager's word (the service's running task: `NodeID` and
  `Status.ContainerStatus.ContainerID`), never a label the container carries: a container's
  labels can be copied, the manager's task table cannot be written by a user.
- exec ids are remembered with their node and service (bounded), so an exec's inspect answers
  with the *service* id as its container (what `UserOperations.owns_exec` compares) and its
  output stream and resizes go to the same node.

Errors: a service without a running task is gone for stats and processes (`Gone`, a 404 as
Docker's own), a node without an endpoint is `NodeEngineError` (named, 503).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ds01hub.errors import Ds01hubError
from ds01hub.gpu.swarm_nodes import NodeEndpoint, NodeEngines
from ds01hub.gpu.swarm_state import ZERO_TIME, service_documents

__all__ = ["ExecTarget", "Gone", "LocalContainers", "SwarmContainers"]

#: exec sessions remembered per broker process (a shell's id is looked up right after it ends)
MAX_EXECS = 4096


class Gone(Ds01hubError):
    """A container that is not (or no longer) there: Docker's 404, as `is_gone` reads it."""

    status = 404
    status_code = 404


@dataclass(frozen=True)
class ExecTarget:
    """The engine an exec session lives on: its endpoint and the API version to speak."""

    endpoint: NodeEndpoint
    api_version: str


class LocalContainers:
    """One Docker engine: the calls are docker-py's own."""

    def __init__(self, docker: Any, url: str = "unix:///var/run/docker.sock"):
        self.docker = docker
        self.url = url

    def summaries(self, label_filters: list[str]) -> list[dict[str, Any]]:
        return self.docker.api.containers(all=True, filters={"label": label_filters})

    def inspect(self, container_id: str) -> dict[str, Any]:
        return self.docker.api.inspect_container(container_id)

    def top(self, container_id: str) -> dict[str, Any]:
        return self.docker.api.top(container_id, ps_args="-e")

    def stats(self, container_id: str) -> dict[str, Any]:
        return self.docker.api.stats(container_id, stream=False)

    def kill(self, container_id: str) -> None:
        self.docker.api.kill(container_id)

    def stop(self, container_id: str, timeout: int | None = None) -> None:
        self.docker.api.stop(container_id, timeout=timeout)

    def remove(self, container_id: str) -> None:
        self.docker.api.remove_container(container_id, v=False, force=False)

    def exec_create(self, container_id: str, command: list[str], **options: Any) -> str:
        return str(self.docker.api.exec_create(container_id, command, **options)["Id"])

    def exec_inspect(self, exec_id: str) -> dict[str, Any]:
        return self.docker.api.exec_inspect(exec_id)

    def exec_resize(self, exec_id: str, rows: int, cols: int) -> None:
        self.docker.api.exec_resize(exec_id, height=rows, width=cols)

    def exec_target(self, exec_id: str) -> ExecTarget:
        return ExecTarget(NodeEndpoint("", self.url), self.docker.api.api_version)


def _running_task(tasks: list[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    running = [t for t in tasks if (t.get("Status") or {}).get("State") == "running"]
    return max(running, key=lambda t: str((t.get("Status") or {}).get("Timestamp")), default=None)


def list_entry(document: Mapping[str, Any]) -> dict[str, Any]:
    """A service document (`service_documents`) in the shape of Docker's container list."""
    state = document["State"]
    return {
        "Id": document["Id"],
        "Names": [document["Name"]],
        "Image": document["Config"]["Image"],
        "Labels": document["Config"]["Labels"],
        "State": state["Status"],
        "Status": "",
        "Created": document.get("Created"),
    }


def with_container_fields(document: dict[str, Any], service: Mapping[str, Any]) -> dict[str, Any]:
    """What an inspect document of the service's container says that UserOperations reads
    (the limits for `container-stats`, the user and directory an exec runs as), from the
    service's spec: the same values the node's container got from it."""
    template = (service.get("Spec") or {}).get("TaskTemplate") or {}
    container = template.get("ContainerSpec") or {}
    limits = (template.get("Resources") or {}).get("Limits") or {}
    document["Config"].update(User=container.get("User") or "", WorkingDir=container.get("Dir"))
    document["HostConfig"] = {
        "NanoCpus": limits.get("NanoCPUs") or 0,
        "Memory": limits.get("MemoryBytes") or 0,
        "PidsLimit": limits.get("Pids") or None,
    }
    return document


def with_live_tasks(
    documents: list[dict[str, Any]],
    tasks: list[Mapping[str, Any]],
    nodes: list[Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """Documents as the user must see them: a server scaled to zero whose container is still
    running on a ready node (Swarm stops it within the stop grace period) is `running`, not
    yet stopped, so `container-stop` waits for it and says "stopped" only when it is. (The
    allocator's view, `service_documents`, counts it as stopped from the scale-down on: its
    slot is held, and Swarm keeps the slot's generic resource until the task ends.)"""
    ready = {str(n.get("ID")) for n in nodes if (n.get("Status") or {}).get("State") == "ready"}
    live = {
        str(t.get("ServiceID"))
        for t in tasks
        if (t.get("Status") or {}).get("State") == "running" and str(t.get("NodeID")) in ready
    }
    for document in documents:
        state = document["State"]
        if document["Id"] in live and not state["Running"]:
            state.update(Status="running", Running=True, FinishedAt=ZERO_TIME)
    return documents


class SwarmContainers:
    """A Docker Swarm (see the module doc): `manager` is a docker-py client of a manager's
    engine, `nodes` the nodes' own engines."""

    def __init__(self, manager: Any, nodes: NodeEngines):
        self.manager = manager
        self.nodes = nodes
        self._execs: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._lock = threading.Lock()

    # -- the manager's word ---------------------------------------------------------------

    def summaries(self, label_filters: list[str]) -> list[dict[str, Any]]:
        services = self.manager.api.services(filters={"label": label_filters})
        if not services:
            return []
        tasks, nodes = self.manager.api.tasks(), self.manager.api.nodes()
        documents = with_live_tasks(service_documents(services, tasks, nodes), tasks, nodes)
        return [list_entry(d) for d in documents]

    def inspect(self, service_id: str) -> dict[str, Any]:
        """The service as a container inspect document (docker-py's NotFound when gone)."""
        service = self.manager.api.inspect_service(service_id)
        tasks = self.manager.api.tasks(filters={"service": service["ID"]})
        nodes = self.manager.api.nodes()
        (document,) = with_live_tasks(service_documents([service], tasks, nodes), tasks, nodes)
        return with_container_fields(document, service)

    def _container(self, service_id: str) -> tuple[str, str]:
        """(node hostname, container id) of the service's running task, by the manager."""
        task = _running_task(self.manager.api.tasks(filters={"service": service_id}))
        container = ((task or {}).get("Status") or {}).get("ContainerStatus") or {}
        if task is None or not container.get("ContainerID"):
            raise Gone(
                "the container is not running on any swarm node now",
                hint="see `container-list --all`; start it with `container-start NAME`",
            )
        node = self.manager.api.inspect_node(task["NodeID"])
        return str(node["Description"]["Hostname"]), str(container["ContainerID"])

    def _on_node(self, service_id: str) -> tuple[Any, str]:
        hostname, container_id = self._container(service_id)
        return self.nodes.client(hostname).api, container_id

    # -- the node's engine ----------------------------------------------------------------

    def top(self, service_id: str) -> dict[str, Any]:
        api, container_id = self._on_node(service_id)
        return api.top(container_id, ps_args="-e")

    def stats(self, service_id: str) -> dict[str, Any]:
        api, container_id = self._on_node(service_id)
        return api.stats(container_id, stream=False)

    def kill(self, service_id: str) -> None:
        api, container_id = self._on_node(service_id)
        api.kill(container_id)

    def stop(self, service_id: str, timeout: int | None = None) -> None:
        api, container_id = self._on_node(service_id)
        api.stop(container_id, timeout=timeout)

    def remove(self, service_id: str) -> None:
        """A stopped server's service goes (its hold with it), as a removed container."""
        self.manager.api.remove_service(service_id)

    def exec_create(self, service_id: str, command: list[str], **options: Any) -> str:
        hostname, container_id = self._container(service_id)
        created = self.nodes.client(hostname).api.exec_create(container_id, command, **options)
        exec_id = str(created["Id"])
        with self._lock:
            self._execs[exec_id] = (hostname, service_id)
            while len(self._execs) > MAX_EXECS:
                self._execs.popitem(last=False)
        return exec_id

    def _exec(self, exec_id: str) -> tuple[str, str]:
        with self._lock:
            found = self._execs.get(exec_id)
        if found is None:
            raise Gone(f"no such exec {exec_id}")
        return found

    def exec_inspect(self, exec_id: str) -> dict[str, Any]:
        """The exec's inspect data, its `ContainerID` the service's id (what owns it)."""
        hostname, service_id = self._exec(exec_id)
        info = dict(self.nodes.client(hostname).api.exec_inspect(exec_id))
        info["ContainerID"] = service_id
        return info

    def exec_resize(self, exec_id: str, rows: int, cols: int) -> None:
        hostname, _ = self._exec(exec_id)
        self.nodes.client(hostname).api.exec_resize(exec_id, height=rows, width=cols)

    def exec_target(self, exec_id: str) -> ExecTarget:
        hostname, _ = self._exec(exec_id)
        client = self.nodes.client(hostname)
        return ExecTarget(self.nodes.endpoint(hostname), client.api.api_version)
