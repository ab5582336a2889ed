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
shown in the progress) -> create the service at zero replicas (a stopped one of this server is
replaced) -> `begin_start` under the allocator's lock -> scale to one -> wait for its task to
run -> the hub reaches it on the node's address and the port published there.
Stop scales the service to zero: it stays, holding its slots for `gpu_hold_after_stop` like a
stopped container. A server whose task ended while desired to run (its node left the cluster)
is scaled to zero too, by its `poll` and before every allocation (`stop_lost_services`), and
its user is told why at the next start. A hub killed mid-spawn leaks nothing: a service it
never scaled up is removed when JupyterHub stops the server at its restart
(`run_post_stop_hook`), one it did is adopted (`get_url`).
"""

from __future__ import annotations

import asyncio
import inspect
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

from dockerspawner import SwarmSpawner
from jupyterhub.spawner import SpawnException
from traitlets import Float, Int, Unicode, default

from ds01hub import labels, paths, provenance
from ds01hub.actions.images import ImageError
from ds01hub.actions.registry import records, resolve_user_image
from ds01hub.gpu import messages
from ds01hub.gpu.allocator import AllocationStateError, GpuAllocator
from ds01hub.gpu.cluster import cluster_inventory, parse_node
from ds01hub.gpu.decision import Decision
from ds01hub.gpu.eventlog import EventLog
from ds01hub.gpu.fairshare import FairShare
from ds01hub.gpu.swarm_state import (
    ENDED_TASK_STATES,
    create_service,
    lost_services,
    scale_service,
    service_documents,
    stop_lost_services,
    swarm_lister,
    swarm_remover,
)
from ds01hub.hub.group_limits import group_refusal, orm_user_limits
from ds01hub.limits import LimitsError, LimitsStore, ResolvedLimits
from ds01hub.spawner.gpu_queue import GpuQueue, GpuWaitTimeout, QueueStatus
from ds01hub.spawner.options import (
    GpuOffer,
    OptionsError,
    ProfileList,
    SpawnChoice,
    allowed_images,
    form_user_options,
    normalize_image,
    profile_list_trait,
    render_form,
    resolve_choice,
)
from ds01hub.spawner.progress import ProgressEvents, refusal_status
from ds01hub.spawner.swarm_plan import service_name, service_spec
from ds01hub.units import utcnow

__all__ = ["DS01SwarmSpawner"]

#: the spawner state's key for why the server last stopped under its user (a Message dict)
STOPPED_KEY = "ds01_stopped"


class DS01SwarmSpawner(ProgressEvents, ProfileList, SwarmSpawner):
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
    event_log_path = Unicode(
        "",
        config=True,
        help="SQLite event log of allocations (GPU-hours: fair share, usage reports). Empty: "
        "`state_dir`/events.db (as DS01Spawner).",
    )
    profile_list = profile_list_trait()

    gpu_wait_timeout = Float(
        300.0,
        config=True,
        help="Seconds a spawn waits for a GPU slot while all are busy (the progress shows why).",
    )
    gpu_wait_interval = Float(
        2.0,
        config=True,
        help="While spawns wait for GPUs, the hub's GPU queue retries at least this often "
        "(holds end by time; servers on any node stop); a stop retries at once.",
    )
    server_port = Int(8888, config=True, help="The port the single-user server listens on.")

    #: the hub's GPU queue per state directory (`_queue`)
    _queues: ClassVar[dict[str, GpuQueue]] = {}
    #: the hub's event log per path (`_eventlog`)
    _eventlogs: ClassVar[dict[str, EventLog]] = {}

    @default("object_name")
    def _object_name_default(self) -> str:
        return service_name(self.user.name, self.name or None)

    # -- shared pieces --------------------------------------------------------------------

    def _state_path(self) -> Path:
        return paths.state_dir(self.state_dir)

    def _eventlog(self) -> EventLog:
        """The hub's one event log (on the manager's disk: history, not who holds what)."""
        path = str(self.event_log_path or self._state_path() / "events.db")
        if path not in self._eventlogs:
            self._eventlogs[path] = EventLog(path)
        return self._eventlogs[path]

    def _limits(self) -> LimitsStore:
        return LimitsStore(self.limits_path or None, log=self.log)

    def _allocator(self, limits: LimitsStore) -> GpuAllocator:
        """The allocator over the swarm as it is now (nodes read from the manager)."""
        manager = self.client_holder
        trust = provenance.load(self._state_path())
        for lost in stop_lost_services(manager, trust):  # before its slots can be counted
            why = f"its node {lost.node} left the cluster" if lost.node else lost.ended
            self.log.warning("ds01: server %s stopped: %s", lost.name, why)
        nodes = [parse_node(attrs) for attrs in manager.api.nodes()]
        return GpuAllocator(
            None,
            cluster_inventory(nodes),
            self._state_path(),
            self._eventlog(),
            limits=limits,
            container_lister=swarm_lister(manager, trust),
            container_remover=swarm_remover(manager),
            trust=trust,
        )

    async def _blocking(self, function: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    # -- spawn ----------------------------------------------------------------------------

    def _queue(self) -> GpuQueue:
        """The hub's one GPU queue (per state directory): every spawn's attempts go through
        it, by effective priority (fair share) then arrival, as on one host."""
        key = str(self._state_path())
        if key not in self._queues:
            self._queues[key] = GpuQueue(self.gpu_wait_interval, self._fair_share)
        return self._queues[key]

    async def _fair_share(self) -> FairShare:
        """Everyone's fair-share factor now: the allocator's (`GpuAllocator.fair_share`, from
        the event log and `gpu_allocation.fairshare`); no node needs asking for it."""

        def now() -> FairShare:
            allocator = GpuAllocator(
                None,
                cluster_inventory(()),
                self._state_path(),
                self._eventlog(),
                limits=self._limits(),
                container_lister=list,
            )
            return allocator.fair_share()

        return await self._blocking(now)

    def _resolve_limits(self, store: LimitsStore) -> ResolvedLimits:
        """The user's limits with their hub groups' properties, as DS01Spawner's (from the
        hub's database, every spawn); a bad property refuses the spawn (409)."""
        try:
            return orm_user_limits(store.current, self.user.name, self.user.groups)
        except LimitsError as error:
            raise SpawnException(
                group_refusal(self.user.name, error), reason="limits", status_code=409
            ) from None

    def _offer(self, allocator: GpuAllocator, holdings: Any = ()) -> GpuOffer:
        """What the cluster has (the slots of every node that takes servers) and what is free."""
        inventory = allocator.inventory
        return GpuOffer.from_slots(inventory.slots, holdings, inventory.simulated)

    @default("options_form")
    def _default_options_form(self) -> Any:
        return DS01SwarmSpawner._render_options_form

    @default("options_from_form")
    def _default_options_from_form(self) -> Any:
        return form_user_options

    async def _render_options_form(self) -> str:
        """DS01Spawner's form; the free counts (per profile and kind) are the cluster's."""
        store = self._limits()
        limits = self._resolve_limits(store)
        allocator = await self._blocking(self._allocator, store)
        holdings = await self._blocking(allocator.holdings)
        profiles = self._profiles()
        return render_form(
            profiles=profiles,
            limits=limits,
            offer=self._offer(allocator, holdings),
            images=self._images(limits, profiles),
            own_images=[],
            default_image=self.image,
            previous=self.orm_spawner.user_options if self.orm_spawner else None,
            queue_offered=False,  # `_choose` refuses it: README "More than one machine"
        )

    def _images(self, limits: Any, profiles: Any) -> tuple[str, ...] | str:
        """The images this user may start (`allowed_images`: configured, profiles' own)."""
        allowed = self._get_allowed_images()
        configured = allowed if allowed == "*" else list(allowed or {})
        return allowed_images(limits, configured, self.image, profiles)

    def _choose(self, allocator: GpuAllocator, limits: Any) -> SpawnChoice:
        """The user's options (a profile, gpus, mig, image) checked against their limits and
        the cluster, as on one host; the `queue` option (a request kept across hub restarts)
        is one host's only."""
        profiles = self._profiles()
        options = dict(self.user_options or {})
        options.pop("image", None)  # the image is `_image`'s: the lab's or one in the registry
        try:
            choice = resolve_choice(
                options,
                profiles=profiles,
                limits=limits,
                default_image=self.image,
                images=self._images(limits, profiles),
                own_images=(),
                offer=self._offer(allocator),
            )
        except OptionsError as error:
            raise SpawnException(str(error), reason="options", status_code=error.status) from None
        if choice.queue:
            raise SpawnException(
                "waiting for a GPU without a time limit (the queue option) is not offered on a "
                f"swarm; start without it (the spawn waits up to {self.gpu_wait_timeout:.0f}s in "
                f"the GPU queue, {self._setting('gpu_wait_timeout')}).",
                reason="options",
                status_code=400,
            )
        return choice

    async def _allocate(
        self, store: LimitsStore, limits: Any, choice: SpawnChoice
    ) -> tuple[GpuAllocator, Decision]:
        """Through the hub's GPU queue; each attempt reads the swarm anew (a node that came
        back offers its slots, one that left none), so a waiter starts when a slot frees on
        any node. The wait's place in line is in the progress (`wait_message`)."""
        request = choice.gpu_request(self.user.name, self.object_name)
        latest: list[GpuAllocator] = []
        deadline = utcnow() + timedelta(seconds=self.gpu_wait_timeout)
        shown: list[tuple] = []

        def situation(decision: Decision, **queue: Any) -> messages.Situation:
            inventory = latest[-1].inventory
            return messages.Situation(
                request,
                decision,
                inventory.slots,
                limits,
                simulated=inventory.simulated,
                deadline=deadline,
                timeout=self.gpu_wait_timeout,
                timeout_key=self._setting("gpu_wait_timeout"),
                **queue,
            )

        async def attempt() -> Decision:
            latest.append(await self._blocking(self._allocator, store))
            del latest[:-1]
            return await self._blocking(latest[-1].allocate, request, limits)

        async def abandon(decision: Decision) -> None:
            await self._blocking(latest[-1].release, self.object_name, "spawn gave up")

        def on_wait(status: QueueStatus) -> None:
            seen = (status.position, status.waiting, status.decision.reason)
            if shown[-1:] != [seen]:
                shown.append(seen)
                where = situation(status.decision, position=status.position, waiting=status.waiting)
                self._emit_message(35, messages.wait_message(where, utcnow()))

        if choice.wants_gpu:
            self._emit(30, f"asking for {choice.gpu_text()}, priority {limits.priority}")
        try:
            if not choice.wants_gpu:  # no slot to wait for: the allocator's claim only
                decision = await attempt()
            else:
                decision = await self._queue().acquire(
                    self.object_name,
                    limits.priority,
                    attempt,
                    user=self.user.name,
                    timeout=self.gpu_wait_timeout,
                    abandon=abandon,
                    on_wait=on_wait,
                )
        except AllocationStateError as error:
            raise self._refusal(messages.state_message(str(error)), 503) from None
        except GpuWaitTimeout as error:
            last = error.decision or Decision(reason="no attempt finished", code="busy")
            raise self._refusal(messages.timeout_message(situation(last)), 503) from None
        if not decision.ok:
            status = refusal_status(decision.code)
            raise self._refusal(messages.refusal_message(situation(decision)), status)
        return latest[-1], decision

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._init_progress()
        self._stopped_because: messages.Message | None = None

    async def start(self) -> tuple[str, int]:
        """`_start`, its steps in the progress stream; first, why the last server stopped
        under its user, if it did (`poll`)."""
        self._begin_progress()
        if self._stopped_because is not None:
            self._emit_message(2, self._stopped_because)
            self._stopped_because = None
        try:
            return await self._start()
        finally:
            self._finish_progress()

    async def _start(self) -> tuple[str, int]:
        store = self._limits()
        limits = self._resolve_limits(store)
        choice = self._choose(await self._blocking(self._allocator, store), limits)
        for note in choice.notes:
            self._emit(8, note)
        allocator, decision = await self._allocate(store, limits, choice)
        slots = [allocator.inventory.slot(slot_id) for slot_id in decision.granted]
        if slots:
            self._emit(45, f"GPU slot(s) {', '.join(s.id for s in slots)}")
        try:
            image = await self._blocking(self._image, allocator.trust, choice.image)
            service_id = await self._service_for(allocator, slots, choice, limits, image)
            check = await self._blocking(allocator.begin_start, self.object_name, service_id)
            if not check.ok:
                raise SpawnException(
                    f"GPU slots no longer this server's: {check}", reason="gpu_lost"
                )
            await self._blocking(scale_service, self.client_holder, service_id, 1)
            await self._blocking(allocator.commit, self.object_name)
        except BaseException:
            await self._blocking(allocator.release, self.object_name, "spawn failed")
            self._queue().notify()
            raise
        self.object_id = service_id
        self._emit(60, f"service {self.object_name} scaled to one; waiting for its task")
        return await self._running_address(service_id)

    @property
    def client_holder(self) -> Any:
        """docker-py's high-level shape (`.api`) over DockerSpawner's low-level client."""
        return SimpleNamespace(api=self.client)

    def _image(self, trust: provenance.Provenance, default: str | None = None) -> str:
        """The image the server runs: `default` (its profile's; None: the lab's `image`), or
        one of the user's own images (an admin's: anyone's) as published to the cluster's
        registry, pinned to the digest ds01hub recorded (`ds01hub.actions.registry`); any
        other is refused by name."""
        default = default or self.image
        requested = str((self.user_options or {}).get("image") or "")
        if not requested or normalize_image(requested) == normalize_image(default):
            return default
        admin = bool(getattr(self.user, "admin", False))
        try:
            found = records(self.client_holder, trust)
            pinned = resolve_user_image(found, requested, self.user.name, admin=admin)
        except ImageError as error:
            raise SpawnException(str(error), reason="image", status_code=error.status) from None
        if pinned is None:
            raise SpawnException(
                f"image {requested[:120]!r} is not available on the cluster: use the lab's "
                f"image ({default}) or one of your own (image-list)",
                reason="image",
                status_code=403,
            )
        return pinned

    async def _service_for(
        self, allocator: GpuAllocator, slots: list, choice: SpawnChoice, limits: Any, image: str
    ) -> str:
        """A new service for this start, made at zero replicas; a stopped one of this server
        is removed first (its hold ends: this start's claim holds the granted slots now).
        Why not scale the stopped one up again: Swarm makes no new task for a service of
        restart policy `none` whose slot's last task ended (seen on Docker 20.10: scaled
        0 -> 1 it stays without a task), and a new service is the path every start tests."""
        existing = await self.get_object()
        if existing is not None:
            await self.docker("remove_service", existing["ID"])
        wanted = tuple(slot.id for slot in slots)
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
            nano_cpus=int(choice.max_cpus * 1e9) if choice.max_cpus else None,
            memory_bytes=choice.memory,
        )
        body["EndpointSpec"] = {
            "Ports": [{"Protocol": "tcp", "TargetPort": self.server_port, "PublishMode": "host"}]
        }
        return await self._blocking(create_service, self.client_holder, body)

    async def _running_address(self, service_id: str) -> tuple[str, int]:
        """Wait for the service's task to run; its node's address and the port there."""
        task = await self._running_task(service_id)
        return await self._task_address(task)

    async def _tasks(self, service_id: str) -> list[dict]:
        return list(await self.docker("tasks", filters={"service": service_id}))

    async def _running_task(self, service_id: str) -> dict:
        """The service's newest task once it runs; SpawnException when it ended or the
        service is gone."""
        delay = 0.5
        while True:
            tasks = await self._tasks(service_id)
            task = max(tasks, key=lambda t: str(t.get("CreatedAt") or ""), default=None)
            if task is None:
                if await self.get_object() is None:
                    raise SpawnException(
                        f"server {self.object_name} did not start: its service is gone",
                        reason="start_failed",
                        status_code=500,
                    )
                await asyncio.sleep(delay)
                continue
            state = task["Status"]["State"]
            if state == "running":
                return task
            if state in ENDED_TASK_STATES:
                raise SpawnException(
                    f"server {self.object_name} did not start: {state} "
                    f"{task['Status'].get('Err', '')}",
                    reason="start_failed",
                    status_code=500,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 5)

    async def _task_address(self, task: dict) -> tuple[str, int]:
        """A running task's node address and the port its node publishes for the server."""
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

    async def get_url(self) -> str:
        """JupyterHub asks this after its restart for every server `poll` says is running. A
        hub killed between scaling the service to one and recording the address left a
        placeholder there: the task's address is returned instead (waiting, up to
        `start_timeout`, for a task still pulling its image), so JupyterHub adopts the
        server instead of waiting on an address that never was and then stopping it."""
        recorded = str(self.server.url)
        try:
            service = await self.get_object()
            if service is None:
                return recorded
            task = await asyncio.wait_for(self._running_task(service["ID"]), self.start_timeout)
            ip, port = await self._task_address(task)
        except (TimeoutError, SpawnException) as error:
            self.log.warning("ds01 %s: no running task to adopt: %s", self._log_name, error)
            return recorded
        url = f"http://{ip}:{port}{self.server.base_url}"
        if url != recorded:
            self.log.warning(
                "ds01 %s: adopting the running service at %s (the hub had %s)",
                self._log_name,
                url,
                recorded,
            )
        return url

    async def poll(self) -> int | str | None:
        """None while its task runs on a ready node; else why it is not running. A server
        whose task ended while it was desired to run (its node left the cluster, or it exited)
        is scaled to zero so that it never comes back unasked with its node (Swarm would not
        restart it, but a later `scale` to one would) and its user is told why at the next
        start (`node_lost_message`)."""
        service = await self.get_object()
        if service is None:
            return 0
        tasks = await self._tasks(service["ID"])
        nodes = await self.docker("nodes")
        (document,) = service_documents([service], tasks, nodes)
        if document["State"]["Running"]:
            return None
        for lost in lost_services([service], tasks, nodes):
            await self._blocking(scale_service, self.client_holder, lost.id, 0)
            if not lost.node:
                return f"its server ended: {lost.ended}"
            self._stopped_because = messages.node_lost_message(lost.node, lost.ended)
            self.log.warning("ds01 %s: %s", self._log_name, self._stopped_because.text())
            return self._stopped_because.headline
        node = next((n for n in nodes if n["ID"] == document["Node"]), None)
        if node is not None and node["Status"]["State"] != "ready":
            return f"its node {node['Description']['Hostname']} is {node['Status']['State']}"
        return 0

    def get_state(self) -> dict:
        """DockerSpawner's state, and why the server stopped under its user (told at the next
        start; kept across hub restarts)."""
        state = super().get_state()
        if self._stopped_because is not None:
            state[STOPPED_KEY] = self._stopped_because.to_dict()
        return state

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        try:
            self._stopped_because = messages.Message.from_dict(state[STOPPED_KEY])
        except (KeyError, messages.MessageError):
            self._stopped_because = None

    async def stop(self, now: bool = False) -> None:
        """Scale to zero and keep the service (its hold; a restart on the same slots)."""
        service = await self.get_object()
        if service is not None:
            await self._blocking(scale_service, self.client_holder, service["ID"], 0)
        self._queue().notify()  # its slots may be free now (a hold of 0)

    async def run_post_stop_hook(self) -> None:
        """After JupyterHub stopped a server, also one it found not running after its own
        restart: a service that never started (its spawn died between create and scale, e.g.
        with the hub) is removed. It holds no slot and has nothing to keep; a stopped one (it
        ran) stays for its hold."""
        result = super().run_post_stop_hook()
        if inspect.isawaitable(result):
            await result
        service = await self.get_object()
        if service is None:
            return
        tasks = await self.docker("tasks", filters={"service": service["ID"]})
        (document,) = service_documents([service], tasks, [])
        if document["State"]["Status"] != "created":
            return
        if await self._blocking(swarm_remover(self.client_holder), service["ID"]):
            self.log.warning(
                "ds01 %s: removed service %s: never started (its spawn was interrupted)",
                self._log_name,
                service["ID"],
            )
            self.object_id = ""

    async def delete_forever(self) -> None:
        """A deleted server's service goes (and with it its hold), as the container does on
        one host."""
        service = await self.get_object()
        if service is not None:
            await self.docker("remove_service", service["ID"])
        self._queue().notify()
