"""DS01SwarmSpawner: one hub for a Docker Swarm of GPU servers, on dockerspawner's SwarmSpawner.

Why a class of its own rather than a mode of DS01Spawner: DS01Spawner's spawn is built on
containers (device requests fixed at create, `docker start` right after the allocator's check,
adoption of containers by id); a swarm server is a *service* whose task Swarm places. What the
two share is below them, used as is: the limits file (`LimitsStore`), the allocator
(`GpuAllocator`, its lock, claims, holds, reclaim, quotas across every node), the signed labels
(`ds01hub.provenance`). What differs is here: the inventory is the swarm's
(`ds01hub.gpu.cluster`, read from the manager's node objects at each spawn, so a drained or
dead node takes no new server), holdings come from Swarm's services and tasks
(`ds01hub.gpu.swarm_state`), and the server is a service (`ds01hub.spawner.swarm_plan`) placed
on the node of its slot and reserving that slot's generic resource.

A spawn: resolve limits -> allocate (waiting while `busy`, up to `gpu_wait_timeout`, the wait
shown in the progress) -> create the service at zero replicas (or keep the stopped one when it
is on the granted slots) -> `begin_start` under the allocator's lock -> scale to one -> wait for
its task to run -> the hub reaches it on the node's address and the port published there.
Stop scales the service to zero: it stays, holding its slots for `gpu_hold_after_stop` like a
stopped container; a server whose node died is reported stopped (`poll`) with why.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from dockerspawner import SwarmSpawner
from jupyterhub.spawner import SpawnException
from traitlets import Float, Int, Unicode, default

from ds01hub import labels, paths, provenance
from ds01hub.actions.images import ImageError
from ds01hub.actions.registry import records, resolve_user_image
from ds01hub.gpu.allocator import GpuAllocator
from ds01hub.gpu.cluster import cluster_inventory, parse_node
from ds01hub.gpu.decision import Decision, GpuRequest
from ds01hub.gpu.swarm_state import (
    create_service,
    scale_service,
    service_documents,
    swarm_lister,
    swarm_remover,
)
from ds01hub.limits import LimitsStore
from ds01hub.spawner.options import normalize_image
from ds01hub.spawner.swarm_plan import service_name, service_spec

__all__ = ["DS01SwarmSpawner"]


class DS01SwarmSpawner(SwarmSpawner):
    """See the module docstring; settings are `c.DS01SwarmSpawner.<name>` (the Docker client
    is the manager's: `c.DS01SwarmSpawner.client_kwargs = {"base_url": ...}` or DOCKER_HOST)."""

    limits_path = Unicode(
        "",
        config=True,
        help="The resource-limits YAML. Empty: $DS01HUB_LIMITS, else "
        "/etc/ds01hub/resource-limits.yaml (as DS01Spawner).",
    )
    state_dir = Unicode(
        "",
        config=True,
        help="Allocator state (claims, lock, label key, deployment id). Empty: "
        "$DS01HUB_STATE_DIR, else /var/lib/ds01hub. Only in-flight claims live there: who holds "
        "what is read from Swarm's objects, so a hub restarted on another manager loses nothing "
        "that started.",
    )
    gpu_wait_timeout = Float(
        300.0,
        config=True,
        help="Seconds a spawn waits for a GPU slot while all are busy (the progress shows why).",
    )
    gpu_wait_interval = Float(
        2.0, config=True, help="Seconds between two allocation attempts while waiting."
    )
    server_port = Int(8888, config=True, help="The port the single-user server listens on.")

    @default("object_name")
    def _object_name_default(self) -> str:
        return service_name(self.user.name, self.name or None)

    # -- shared pieces --------------------------------------------------------------------

    def _state_path(self) -> Path:
        return paths.state_dir(self.state_dir)

    def _limits(self) -> LimitsStore:
        return LimitsStore(self.limits_path or None, log=self.log)

    def _allocator(self, limits: LimitsStore) -> GpuAllocator:
        """The allocator over the swarm as it is now (nodes read from the manager)."""
        manager = self.client_holder
        nodes = [parse_node(attrs) for attrs in manager.api.nodes()]
        trust = provenance.load(self._state_path())
        return GpuAllocator(
            None,
            cluster_inventory(nodes),
            self._state_path(),
            limits=limits,
            container_lister=swarm_lister(manager, trust),
            container_remover=swarm_remover(manager),
            trust=trust,
        )

    async def _blocking(self, function: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    # -- spawn ----------------------------------------------------------------------------

    def _request(self) -> GpuRequest:
        options = self.user_options or {}
        gpus = options.get("gpus", 0)
        mig = options.get("mig")
        if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 0:
            raise SpawnException(
                f"gpus must be a whole number of GPUs, not {gpus!r}", reason="options"
            )
        if mig is not None and not isinstance(mig, str):
            raise SpawnException(f"mig must be a MIG profile name, not {mig!r}", reason="options")
        return GpuRequest(self.user.name, self.object_name, count=gpus, mig_profile=mig)

    async def _allocate(self, allocator: GpuAllocator, limits: Any) -> Decision:
        deadline = time.monotonic() + self.gpu_wait_timeout
        request = self._request()
        while True:
            decision = await self._blocking(allocator.allocate, request, limits)
            if decision.ok or decision.code != "busy" or time.monotonic() >= deadline:
                return decision
            self.log.info("%s waits for a GPU slot: %s", self.object_name, decision.reason)
            await asyncio.sleep(self.gpu_wait_interval)

    async def start(self) -> tuple[str, int]:
        store = self._limits()
        limits = store.current.resolve(self.user.name)
        allocator = await self._blocking(self._allocator, store)
        decision = await self._allocate(allocator, limits)
        if not decision.ok:
            raise SpawnException(
                decision.reason or "no GPU slot", reason=decision.code, status_code=503
            )
        slots = [allocator.inventory.slot(slot_id) for slot_id in decision.granted]
        try:
            image = await self._blocking(self._image, allocator.trust)
            service_id = await self._service_for(allocator, slots, limits, image)
            check = await self._blocking(allocator.begin_start, self.object_name, service_id)
            if not check.ok:
                raise SpawnException(
                    f"GPU slots no longer this server's: {check}", reason="gpu_lost"
                )
            await self._blocking(scale_service, self.client_holder, service_id, 1)
            await self._blocking(allocator.commit, self.object_name)
        except BaseException:
            await self._blocking(allocator.release, self.object_name, "spawn failed")
            raise
        self.object_id = service_id
        return await self._running_address()

    @property
    def client_holder(self) -> Any:
        """docker-py's high-level shape (`.api`) over DockerSpawner's low-level client."""
        return SimpleNamespace(api=self.client)

    def _image(self, trust: provenance.Provenance) -> str:
        """The image the server runs: the lab's (`image`), or one of the user's own images
        (an admin's: anyone's) as published to the cluster's registry, pinned to the digest
        ds01hub recorded (`ds01hub.actions.registry`); any other is refused by name."""
        requested = str((self.user_options or {}).get("image") or "")
        if not requested or normalize_image(requested) == normalize_image(self.image):
            return self.image
        admin = bool(getattr(self.user, "admin", False))
        try:
            found = records(self.client_holder, trust)
            pinned = resolve_user_image(found, requested, self.user.name, admin=admin)
        except ImageError as error:
            raise SpawnException(str(error), reason="image", status_code=error.status) from None
        if pinned is None:
            raise SpawnException(
                f"image {requested[:120]!r} is not available on the cluster: use the lab's "
                f"image ({self.image}) or one of your own (image-list)",
                reason="image",
                status_code=403,
            )
        return pinned

    async def _service_for(
        self, allocator: GpuAllocator, slots: list, limits: Any, image: str
    ) -> str:
        """The stopped service when it is on the granted slots with the same image, else a
        new one."""
        existing = await self.get_object()
        wanted = tuple(slot.id for slot in slots)
        if existing is not None:
            held = labels.parse_slot_list((existing["Spec"].get("Labels") or {}).get(labels.GPUS))
            container = existing["Spec"].get("TaskTemplate", {}).get("ContainerSpec", {})
            if held == wanted and container.get("Image") == image:
                return str(existing["ID"])
            await self.docker("remove_service", existing["ID"])
        values = labels.container_labels(
            user=self.user.name,
            project=self.name or None,
            group=limits.group,
            priority=limits.priority,
            gpus=wanted,
            gpu_uuids=[slot.uuid for slot in slots],
            image=image,
        )
        values[labels.CREATOR] = allocator.creator_label()
        signed = allocator.trust.sign(values, self.object_name) | dict(
            self.extra_create_kwargs.get("labels") or {}
        )
        body = service_spec(
            name=self.object_name,
            image=image,
            command=await self.get_command(),
            env=self.get_env(),
            signed_labels=signed,
            slots=slots,
            nano_cpus=int(limits.max_cpus * 1e9) if limits.max_cpus else None,
            memory_bytes=limits.memory,
        )
        body["EndpointSpec"] = {
            "Ports": [{"Protocol": "tcp", "TargetPort": self.server_port, "PublishMode": "host"}]
        }
        return await self._blocking(create_service, self.client_holder, body)

    async def _running_address(self) -> tuple[str, int]:
        """Wait for the task to run; its node's address and the port published there."""
        delay = 0.5
        while True:
            task = await self.get_task()
            state = task["Status"]["State"] if task else "gone"
            if state == "running":
                break
            if state in ("failed", "rejected", "shutdown", "complete", "orphaned", "gone"):
                error = task["Status"].get("Err", "") if task else "its service is gone"
                raise SpawnException(
                    f"server {self.object_name} did not start: {state} {error}",
                    reason="start_failed",
                    status_code=500,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 5)
        node = await self.docker("inspect_node", task["NodeID"])
        ports = (task["Status"].get("PortStatus") or {}).get("Ports") or []
        if not ports:
            raise SpawnException(
                f"server {self.object_name} runs but its node published no port "
                "(its service lost the EndpointSpec?)",
                reason="start_failed",
                status_code=500,
            )
        return node["Status"]["Addr"], int(ports[0]["PublishedPort"])

    # -- lifecycle ------------------------------------------------------------------------

    async def poll(self) -> int | str | None:
        """None while its task runs on a ready node; else why it is not running."""
        service = await self.get_object()
        if service is None:
            return 0
        tasks = await self.docker("tasks", filters={"service": service["ID"]})
        nodes = await self.docker("nodes")
        (document,) = service_documents([service], tasks, nodes)
        if document["State"]["Running"]:
            return None
        node = next((n for n in nodes if n["ID"] == document["Node"]), None)
        if node is not None and node["Status"]["State"] != "ready":
            # stopped for good: when the node returns, the server must not come back unasked
            # (its slots may be someone else's by then)
            await self._blocking(scale_service, self.client_holder, service["ID"], 0)
            return f"its node {node['Description']['Hostname']} is {node['Status']['State']}"
        return 0

    async def stop(self, now: bool = False) -> None:
        """Scale to zero and keep the service (its hold; a restart on the same slots)."""
        service = await self.get_object()
        if service is not None:
            await self._blocking(scale_service, self.client_holder, service["ID"], 0)

    async def delete_forever(self) -> None:
        """A deleted server's service goes (and with it its hold), as the container does on
        one host."""
        service = await self.get_object()
        if service is not None:
            await self.docker("remove_service", service["ID"])
