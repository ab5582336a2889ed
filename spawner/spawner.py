"""DS01Spawner: DockerSpawner plus ds01hub's limits, quotas and GPU allocation on every spawn.

One spawn, step by step (each step is a progress event):
1. resolve the user's limits from the YAML (re-read off the event loop when it changed, the last
   good file kept when the new one is broken; JupyterHub groups count);
2. validate the spawn options (form or REST `user_options`, `ds01hub.spawner.options`);
3. check `max_containers_per_user` (fail fast, naming what counts and how to free one);
4. GPUs: through the hub-wide priority queue to `GpuAllocator.allocate` (waits while `busy`,
   gives up after `gpu_wait_timeout`); a restart re-validates the container's own slots. The
   claim on the granted slots is renewed while the spawn works (image pull, create);
5. create the container (or re-create it: device requests and limits are fixed at create) with
   the limits, device requests, GPU env, workspace, uid/gid and the signed `ds01.*` labels
   (`ds01hub.provenance`: only those count, never what an image claims); then, right before
   `docker start` and under the user's own lock, the user's aggregate caps are checked again
   from Docker's state (`ds01hub.host.aggregate_gate`: two spawns of one user cannot both
   pass) and `GpuAllocator.begin_start` confirms under the allocator's lock that the
   slots are still this container's alone. A container whose slots were reclaimed or whose
   claim lapsed never starts on them: the spawn asks for GPUs again (up to `_START_ATTEMPTS`
   times) or fails saying why.

Stopping keeps the container, so it holds its GPUs for `gpu_hold_after_stop`; deleting the
named server removes it and releases everything. Docker labels are the allocation state, so a
hub killed mid-spawn leaks nothing (see `ds01hub.gpu.allocator`); at hub start,
before JupyterHub checks its servers, containers that never started and that nothing claims
are removed (`_reconcile_at_hub_start`); one JupyterHub then finds not running is removed
when it stops its server (`run_post_stop_hook`), and one that started but whose address the
hub never recorded is adopted (`get_url`).

The hub-wide context (limits, inventory, allocator) is built when the hub starts, not at the
first spawn: a broken limits file stops the hub with its problems (`_prepare_at_hub_start`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import os
import pwd
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import docker
import docker.errors
from docker.utils import kwargs_from_env
from dockerspawner import DockerSpawner
from jupyterhub.spawner import SpawnException
from jupyterhub.utils import url_path_join, wait_for_http_server
from traitlets import CaselessStrEnum, Dict, Float, Int, List, Unicode, default

from ds01hub import labels, paths, provenance
from ds01hub.actions.images import list_user_images
from ds01hub.aggregate import ContainerUse, aggregate_refusal, is_user_parent, parent_for
from ds01hub.engine import engine_unreachable, engine_url, short_error
from ds01hub.gpu import messages
from ds01hub.gpu.allocator import (
    DEFAULT_RESERVATION_TTL,
    DEFAULT_START_GRACE,
    AllocationStateError,
    GpuAllocator,
    docker_lister,
)
from ds01hub.gpu.decision import Decision
from ds01hub.gpu.eventlog import EventLog, EventLogError, NewEvent
from ds01hub.gpu.fairshare import FairShare
from ds01hub.gpu.inventory import Inventory, Slot, load_inventory
from ds01hub.gpu.queued import QueuedRequest, QueuedStore, QueueLimitError
from ds01hub.host.aggregate_gate import (
    AggregateRefused,
    UserLockTimeout,
    counted_uses,
    remove_unused_parent,
    start_within_caps,
    user_records,
)
from ds01hub.host.cgroups import CgroupError, ensure_parent
from ds01hub.hub.group_limits import group_refusal, orm_user_limits
from ds01hub.hub.group_snapshot import SnapshotError, SnapshotReader
from ds01hub.limits import (
    AggregateLimits,
    LimitsError,
    LimitsStore,
    ResolvedLimits,
    record_expired,
)
from ds01hub.units import utcnow

from . import metrics
from .container_plan import ContainerPlan, recreate_reason
from .gpu_queue import GpuQueue, GpuWaitTimeout, QueueStatus
from .options import (
    GpuOffer,
    OptionsError,
    ProfileList,
    SpawnChoice,
    allowed_images,
    form_user_options,
    image_allowed,
    profile_list_trait,
    render_form,
    resolve_choice,
)
from .progress import ProgressEvents, refusal_status
from .queued import QueuedStarter
from .recovery import EngineRecovery

__all__ = ["DS01Spawner"]

#: How often one spawn asks for GPUs when the check before `docker start` finds its slots gone.
_START_ATTEMPTS = 3


class _SlotsLost(Exception):
    """The check before `docker start` refused: the slots are not this container's alone."""


@dataclass
class _HubContext:
    """What all spawners of one hub share: limits, inventory, allocator, event log, queue."""

    limits: LimitsStore
    inventory: Inventory
    allocator: GpuAllocator
    eventlog: EventLog
    queue: GpuQueue
    docker: Any
    label_filter: tuple[str, ...]
    #: Allocator, event log and listing calls block (file lock, SQLite, Docker): their own
    #: threads, so a lock held by another process never stalls DockerSpawner's one thread.
    executor: ThreadPoolExecutor
    #: Follows the engine: servers, spawns and GPU holds when it stops (.recovery).
    recovery: EngineRecovery
    #: Spawn requests left in the GPU queue without a time limit (.queued).
    queued: QueuedStarter | None = None
    #: The hub's REST API root, for starting a queued request's server.
    hub_api_url: str = ""
    #: The hub groups as the ds01-ops pass saw them, for queued starts (no ORM user there).
    hub_groups: SnapshotReader | None = None


class DS01Spawner(ProgressEvents, ProfileList, DockerSpawner):
    """See the module docstring; every setting below is `c.DS01Spawner.<name>`."""

    _contexts: dict[tuple, _HubContext] = {}

    limits_path = Unicode(
        "",
        config=True,
        help="""The resource-limits YAML (DS01 format). Empty: $DS01HUB_LIMITS, else
        /etc/ds01hub/resource-limits.yaml. Checked when the hub starts (a broken file stops
        it, listing the problems); re-read off the event loop on the next spawn after it
        changed; a broken edit keeps the last good file (hub log, ds01-ops admin page and
        `ds01_limits_last_reload_ok` on /hub/metrics say why).""",
    )
    limits_parse_timeout = Float(
        10.0,
        config=True,
        help="""Seconds a spawn waits for the limits file to be re-read after it changed; a
        read that takes longer counts as a failed reload (the last good file stays in force
        meanwhile; the read finishes in the background and then takes effect).""",
    )
    state_dir = Unicode(
        "",
        config=True,
        help="""Allocator state (reservations, revocations, lock, the label key and the
        deployment id), shared with the CLI broker, the ds01 and ds01-ops services, the socket
        proxy and `ds01hub status`. Empty: $DS01HUB_STATE_DIR, else /var/lib/ds01hub.""",
    )
    event_log_path = Unicode(
        "",
        config=True,
        help="""SQLite event log of allocations (GPU-hours). Empty: `state_dir`/events.db.""",
    )
    profile_list = profile_list_trait()

    gpu_wait_timeout = Float(
        600.0,
        config=True,
        help="""Seconds a spawn waits in the GPU queue for a free slot before it gives up with
        a message naming the holders. Keep it below `Spawner.start_timeout`, which JupyterHub
        applies to the whole start (the hub log warns when it is not).""",
    )
    gpu_recheck_interval = Float(
        5.0,
        config=True,
        help="""While spawns wait for GPUs, the queue retries at least this often (holds of
        stopped containers expire by time; other processes free slots too).""",
    )
    queue_api_token = Unicode(
        "",
        config=True,
        help="""A hub API token with the `servers` scope with which the hub starts the server of
        a queued request (the `queue` spawn option: "wait for a GPU") when its GPU is granted.
        `ds01hub.hub.services.configure_queue(c, state_dir)` registers one. Empty: the `queue`
        option is refused.""",
    )
    max_queued_per_user = Int(
        2,
        config=True,
        help="""Queued spawn requests (the `queue` option) a user may have at once.""",
    )
    queue_first_wait = Float(
        10.0,
        config=True,
        help="""Seconds a spawn with the `queue` option waits in the GPU queue, like any spawn,
        before its request is stored (it then waits without a time limit, across hub
        restarts, and the spawn ends saying so).""",
    )
    reservation_ttl = Float(
        DEFAULT_RESERVATION_TTL,
        config=True,
        help="""Seconds a GPU claim of a spawn lives without renewal. The spawn renews it
        every third of this while it works (image pull, create), and it dies with the hub
        process whatever its age; so this only bounds a spawn that stopped making progress
        inside a live hub.""",
    )
    start_grace = Float(
        DEFAULT_START_GRACE,
        config=True,
        help="""Seconds a claim checked right before `docker start` outlives the hub process:
        a start sent just before the hub was killed may still land, and nobody else gets its
        slots meanwhile.""",
    )
    workspace_root = Unicode(
        "",
        config=True,
        help="""Host directory holding one workspace per user (`workspace_root`/<escaped user
        name>, created on first spawn, mode 0750, owned by the user's uid/gid when known),
        mounted read-write at `workspace_mount`. Empty: no workspace mount.""",
    )
    workspace_mount = Unicode(
        "/workspace",
        config=True,
        help="Where the user's workspace appears in the container.",
    )
    user_id_source = CaselessStrEnum(
        ["image", "passwd"],
        default_value="image",
        config=True,
        help="""Which uid/gid the container runs as. `image`: the image's USER. `passwd`: the
        host account of the same name (the spawn fails, saying so, when there is none);
        `user_ids` entries win over both.""",
    )
    user_ids = Dict(
        key_trait=Unicode(),
        value_trait=List(),
        config=True,
        help="""Explicit uid/gid per user name: {"alice": [1001, 1001]}.""",
    )
    aggregate_cgroup_root = Unicode(
        "",
        config=True,
        help="""Where the cgroup v1 controllers are mounted (`/sys/fs/cgroup`) when Docker uses
        the cgroupfs driver: a user with `aggregate` limits then gets a parent cgroup
        `<cgroup_parent or /ds01>/u-<user>` there, with their caps written into it (memory,
        cpu, pids), so the kernel caps all their containers together (the hub must run as
        root). Empty: aggregate limits are checked at spawn only. Not for systemd slices.
        Default: $DS01HUB_AGGREGATE_CGROUP_ROOT (ds01hub.env), which the Docker proxy reads
        too (`ds01hub proxy --aggregate-cgroup-root`), so both doors place alike.""",
    )
    cgroup_parents = Dict(
        key_trait=Unicode(),
        value_trait=Unicode(),
        config=True,
        help="""cgroup parent per limits group ({"students": "/ds01/students"}); wins over the
        YAML's `cgroup_parent`. Lets the host cap a whole group (systemd slice / cgroupfs).""",
    )
    container_label_filter = List(
        Unicode(),
        config=True,
        help="""Extra `key=value` labels that every container counted here must carry (tests).
        Several hubs on one Docker engine need none: each counts only its own deployment's
        signed containers (the deployment id and label key in `state_dir`).""",
    )

    # -- shared hub context ------------------------------------------------------------------

    @property
    def context(self) -> _HubContext:
        try:
            return self._shared_context()
        except LimitsError as error:  # only when the hub-start check did not run
            self.log.error("ds01: %s:\n%s", error.summary(), "\n".join(error.lines()))
            raise SpawnException(
                f"The hub's limits file is broken ({error.summary()}); an administrator must "
                "fix it (ds01hub check-config).",
                reason="limits",
                status_code=503,
            ) from None

    def _shared_context(self) -> _HubContext:
        """The context of this hub's settings, built once (LimitsError: the file is broken)."""
        state_dir = str(paths.state_dir(self.state_dir))
        key = (
            str(paths.limits_path(self.limits_path)),
            state_dir,
            tuple(self.container_label_filter),
        )
        if key not in self._contexts:
            self._contexts[key] = self._new_context(self.limits_path or None, Path(state_dir))
        return self._contexts[key]

    @classmethod
    def prepare_for_hub(cls, app: Any) -> None:
        """Build the hub-wide context as JupyterHub starts (`app`: the JupyterHub
        application), with a spawner of the hub's configuration. A broken limits file stops
        the hub here, its problems in the hub's log; anything else that fails (Docker not up
        yet) is logged and tried again at the first spawn."""
        # a spawner of the hub's configuration for nobody: DockerSpawner derives some settings
        # (the container name) from a user, so it gets a stand-in that spawns nothing
        nobody = SimpleNamespace(name="ds01-hub-start", groups=[])
        try:
            context = cls(config=app.config, log=app.log, user=nobody)._shared_context()
        except LimitsError as error:
            app.log.critical(
                "ds01: %s; the hub does not start on it. Fix it (ds01hub check-config) and "
                "start the hub again:\n%s",
                error.summary(),
                "\n".join(error.lines()),
            )
            app.exit(1)
        except Exception as error:
            app.log.warning(
                "ds01: the hub-wide spawner context could not be built at start (%s: %.200s); "
                "it is tried again at the first spawn",
                type(error).__name__,
                error,
            )
        else:
            _reconcile_at_hub_start(context, app.log)
            context.hub_api_url = app.hub.api_url
            if context.queued is not None:
                resumed = context.queued.resume()
                if resumed:
                    app.log.info("ds01: %d queued spawn request(s) wait for GPUs", resumed)

    def _new_context(self, limits_path: str | None, state_dir: Path) -> _HubContext:
        store = LimitsStore(limits_path, parse_timeout=self.limits_parse_timeout, log=self.log)
        metrics.watch_limits(store)
        inventory = load_inventory(store.current.gpu_allocation)
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        eventlog = EventLog(self.event_log_path or state_dir / "events.db")
        metrics.watch_eventlog(eventlog)
        client_kwargs = self._docker_client_kwargs()
        client = docker.DockerClient(**client_kwargs)
        label_filter = tuple(self.container_label_filter)
        trust = provenance.load(state_dir)
        allocator = GpuAllocator(
            client,
            inventory,
            state_dir,
            eventlog,
            limits=store,
            reservation_ttl=self.reservation_ttl,
            start_grace=self.start_grace,
            container_lister=docker_lister(client, label_filter, trust=trust),
            trust=trust,
        )
        if self.gpu_wait_timeout + 30 > self.start_timeout:
            self.log.warning(
                "DS01Spawner.gpu_wait_timeout (%ss) leaves under 30s of Spawner.start_timeout "
                "(%ss) for the container to start: raise start_timeout",
                self.gpu_wait_timeout,
                self.start_timeout,
            )
        self.log.info(
            "ds01: limits %s, %d GPU slot(s)%s, state %s, deployment %s",
            limits_path,
            len(inventory.slots),
            " (SIMULATED)" if inventory.simulated else "",
            state_dir,
            trust.deployment,
        )
        executor = ThreadPoolExecutor(4, thread_name_prefix="ds01-allocator")

        async def fair_share() -> FairShare:
            return await asyncio.get_running_loop().run_in_executor(executor, allocator.fair_share)

        queue = GpuQueue(self.gpu_recheck_interval, fair_share)
        recovery = EngineRecovery(
            client,
            allocator,
            queue,
            executor,
            extra_labels=label_filter,
            log=self.log,
            fresh_client=lambda: docker.APIClient(**client_kwargs),
            engine_name=f"the Docker engine at {engine_url(client_kwargs.get('base_url'))}",
        )
        context = _HubContext(
            store, inventory, allocator, eventlog, queue, client, label_filter, executor, recovery
        )
        context.hub_groups = SnapshotReader(paths.hub_groups_snapshot(state_dir))
        if self.queue_api_token:
            token = self.queue_api_token
            context.queued = QueuedStarter(
                QueuedStore(state_dir),
                functools.partial(_serve_queued, context, token, self.gpu_recheck_interval),
                self.log,
            )
        return context

    def _docker_client_kwargs(self) -> dict[str, Any]:
        kwargs = kwargs_from_env()
        kwargs.update(self.client_kwargs)
        kwargs.setdefault("version", "auto")
        return kwargs

    async def _blocking(self, function: Callable, *args: Any) -> Any:
        """Run a blocking ds01 call (allocator, event log, listing) on the context's threads."""
        executor = self.context.executor
        return await asyncio.get_running_loop().run_in_executor(executor, function, *args)

    # -- naming, progress --------------------------------------------------------------------

    @default("aggregate_cgroup_root")
    def _aggregate_cgroup_root_default(self) -> str:
        return paths.aggregate_cgroup_root()

    @default("object_name")
    def _object_name_default(self) -> str:
        """`{project}._.{user}` (ds01hub.labels), whatever `name_template` says."""
        return labels.container_name(self.user.name, self.name or None)

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._init_progress()
        self._created_in_this_spawn = False
        self._spawn_slots: tuple[Slot, ...] = ()
        self._check_seconds = 0.0  # the check before `docker start`, for the timing log line
        self._user_parent: tuple[str, AggregateLimits] | None = None  # (cgroup, caps) to write

    # -- the options form --------------------------------------------------------------------

    @default("options_form")
    def _default_options_form(self):
        return DS01Spawner._render_options_form

    @default("options_from_form")
    def _default_options_from_form(self):
        return form_user_options

    async def _render_options_form(self) -> str:
        context = self.context
        limits = await self._resolve_limits()
        profiles = self._profiles()
        holdings = await self._blocking(context.allocator.holdings)
        offer = GpuOffer.from_slots(context.inventory.slots, holdings, context.inventory.simulated)
        images = allowed_images(limits, self._configured_images(), self.image, profiles)
        own = await self._own_images()
        return render_form(
            profiles=profiles,
            limits=limits,
            offer=offer,
            images=images,
            own_images=own,
            default_image=self.image,
            previous=self.orm_spawner.user_options if self.orm_spawner else None,
        )

    def _configured_images(self) -> list[str] | str:
        allowed = self._get_allowed_images()
        return allowed if allowed == "*" else list(allowed or {})

    async def _own_images(self) -> list[str]:
        found = await self._blocking(list_user_images, self.context.docker, self.user.name)
        return [image.tag for image in found]

    async def check_allowed(self, image: str) -> str:
        """DockerSpawner's own image check: `start` has validated the image already."""
        return self._choice.image

    # -- one spawn ---------------------------------------------------------------------------

    async def _resolve_limits(self) -> ResolvedLimits:
        store = self.context.limits
        await store.refresh()  # off the event loop: other users are served meanwhile
        if not store.last_reload_ok:  # the problems were logged once, when the reload failed
            self.log.warning(
                "ds01: %s: the last good limits apply (the edited file has %d problem(s))",
                self._log_name,
                len(store.last_problems),
            )
        try:  # the groups' properties as the hub has them now: an edit applies at once
            limits = orm_user_limits(store.current, self.user.name, self.user.groups)
        except LimitsError as error:
            raise SpawnException(
                group_refusal(self.user.name, error), reason="limits", status_code=409
            ) from None
        cgroup = self.cgroup_parents.get(limits.group or "")
        if cgroup:
            limits = replace(limits, cgroup_parent=cgroup)
        return limits

    async def _record_expired(self, limits: ResolvedLimits) -> None:
        """The event log records an expiry once; a log that cannot be written never stops
        the spawn (the expiry applies either way)."""
        if not limits.expired:
            return
        try:
            await self._blocking(
                record_expired, self.context.eventlog, self.user.name, limits.group, limits.expired
            )
        except EventLogError as error:
            self.log.warning("ds01: %s: expiry not recorded: %s", self._log_name, error)

    async def _choose(self, limits: ResolvedLimits) -> SpawnChoice:
        context = self.context
        profiles = self._profiles()
        images = allowed_images(limits, self._configured_images(), self.image, profiles)
        wanted = (self.user_options or {}).get("image")
        own: list[str] = []
        if wanted and images != "*" and not image_allowed(str(wanted), images):
            own = await self._own_images()
        offer = GpuOffer.from_slots(context.inventory.slots, (), context.inventory.simulated)
        try:
            return resolve_choice(
                self.user_options or {},
                profiles=profiles,
                limits=limits,
                default_image=self.image,
                images=images,
                own_images=own,
                offer=offer,
            )
        except OptionsError as error:
            raise SpawnException(str(error), reason="options", status_code=error.status) from None

    async def _check_container_quota(self, limits: ResolvedLimits) -> None:
        cap = limits.max_containers_per_user
        if cap is None:
            return
        records = await self._blocking(self._user_records)
        mine = self.object_name
        in_use = {r.project: r.state for r in records if r.name != mine}
        for name, spawner in self.user.spawners.items():
            project = name or labels.DEFAULT_PROJECT
            if spawner is not self and spawner.pending == "spawn" and project not in in_use:
                in_use[project] = "starting"
        if len(in_use) < cap:
            return
        listing = ", ".join(f"{p} ({s})" for p, s in sorted(in_use.items()))
        source = limits.sources.get("max_containers_per_user", "limits")
        raise SpawnException(
            f"over quota: {self.user.name} may have {cap} container(s) "
            f"(max_containers_per_user from {source}) and has {len(in_use)}: {listing}. "
            "A stopped server's container still counts: delete one (hub home page: delete, "
            "or `container-remove NAME`) before starting another.",
            reason="quota",
            status_code=409,
        )

    async def _apply_aggregate(self, limits: ResolvedLimits, choice: SpawnChoice) -> ResolvedLimits:
        """Refuse a spawn beyond the user's aggregate caps (the sum of their running
        containers' limits and this one's: fail fast; `start_object` checks again under the
        user's lock); with `aggregate_cgroup_root`, start it under the user's parent cgroup,
        which `start_object` writes the caps into."""
        self._user_parent = None
        cap = limits.aggregate
        if cap is None:
            return limits
        running = await self._blocking(self._counted_uses)
        new = ContainerUse(self.object_name, choice.max_cpus, choice.memory, limits.pids_limit)
        refusal = aggregate_refusal(self.user.name, cap, running, new)
        if refusal:
            raise SpawnException(refusal, reason="aggregate", status_code=409)
        if not self.aggregate_cgroup_root:
            return limits
        parent = parent_for(limits.cgroup_parent, self.user.name)
        if parent is None:
            self.log.warning(
                "ds01: %s: aggregate caps not enforced by a cgroup: %s is a systemd slice",
                self._log_name,
                limits.cgroup_parent,
            )
            return limits
        self._user_parent = (parent, cap)
        self._emit(11, f"aggregate caps {cap.describe()}: cgroup {parent}")
        return replace(limits, cgroup_parent=parent)

    async def _write_user_parent(self) -> None:
        """The user's parent cgroup with their caps, created if missing (it is removed when
        their last container is gone): right before `docker start`, under the user's lock."""
        if self._user_parent is None:
            return
        parent, cap = self._user_parent
        try:
            await self._blocking(ensure_parent, self.aggregate_cgroup_root, parent, cap)
        except CgroupError as error:
            raise SpawnException(str(error), reason="aggregate", status_code=500) from None

    async def _remove_user_parent(self, parent: str) -> None:
        """The user's last container is gone: their parent cgroup goes too (`parent`: the
        removed container's; only a per-user parent of this user's, under the user's lock)."""
        if not self.aggregate_cgroup_root or not parent:
            return
        if not is_user_parent(parent, self.user.name):
            return  # a group's own parent or a systemd slice: not the user's
        try:
            removed = await remove_unused_parent(
                self.context.allocator.state_dir,
                self.user.name,
                self._user_records,
                self.aggregate_cgroup_root,
                parent,
                blocking=self._blocking,
            )
        except (CgroupError, UserLockTimeout) as error:  # left for the next delete
            self.log.warning("ds01 %s: cgroup %s kept: %s", self._log_name, parent, error)
            return
        if removed:
            self.log.info("ds01 %s: removed the unused cgroup parent %s", self._log_name, parent)

    def _counted_uses(self) -> list[ContainerUse]:
        """The limits of the user's other containers that count against their caps."""
        return counted_uses(self.context.docker.api, self._user_records(), self.object_name)

    def _user_records(self) -> list[labels.ContainerRecord]:
        """The user's containers of this deployment (signatures verified: an image or a build
        step that claims the user never counts against their quota)."""
        context = self.context
        return user_records(
            context.docker.api, context.allocator.trust, self.user.name, context.label_filter
        )

    async def _allocate(self, choice: SpawnChoice, limits: ResolvedLimits) -> tuple[Slot, ...]:
        if not choice.wants_gpu:
            return ()
        context = self.context
        sim = " (SIMULATED)" if context.inventory.simulated else ""
        self._emit(30, f"asking for {choice.gpu_text()}{sim}, priority {limits.priority}")
        request = choice.gpu_request(self.user.name, self.object_name)
        deadline = utcnow() + timedelta(seconds=self.gpu_wait_timeout)
        arrival = time.time()  # kept by a queued request: its place across hub restarts
        last_status: list[tuple] = []

        def situation(decision: Decision, **queue: Any) -> messages.Situation:
            return messages.Situation(
                request,
                decision,
                context.inventory.slots,
                limits,
                simulated=context.inventory.simulated,
                deadline=deadline,
                timeout=self.gpu_wait_timeout,
                timeout_key=self._setting("gpu_wait_timeout"),
                **queue,
            )

        async def attempt() -> Decision:
            return await self._blocking(context.allocator.allocate, request, limits)

        async def abandon(decision: Decision) -> None:
            await self._blocking(context.allocator.release, self.object_name, "spawn gave up")

        def on_wait(status: QueueStatus) -> None:
            seen = (status.position, status.waiting, status.decision.reason)
            if last_status[-1:] != [seen]:
                last_status.append(seen)
                where = situation(status.decision, position=status.position, waiting=status.waiting)
                self._emit_message(35, messages.wait_message(where, utcnow()))

        timeout = self.gpu_wait_timeout
        if choice.queue:
            if context.queued is None:
                raise SpawnException(
                    "waiting for a GPU without a time limit (the queue option) is not enabled "
                    "on this hub; an administrator enables it with configure_queue in the hub's "
                    "configuration. Start without it (the spawn then waits up to "
                    f"{self.gpu_wait_timeout:.0f}s).",
                    reason="options",
                    status_code=400,
                )
            timeout = min(self.queue_first_wait, timeout)
        try:
            with metrics.waiting_for_gpu(limits.group):
                decision = await context.queue.acquire(
                    self.object_name,
                    limits.priority,
                    attempt,
                    user=self.user.name,
                    timeout=timeout,
                    abandon=abandon,
                    on_wait=on_wait,
                    arrival=arrival,
                )
        except AllocationStateError as error:
            raise self._refusal(messages.state_message(str(error)), 503) from None
        except GpuWaitTimeout as error:
            if choice.queue:
                raise await self._enqueue(choice, limits, error, arrival) from None
            await self._record_failure(str(error))
            last = error.decision or Decision(reason="no attempt finished", code="busy")
            raise self._refusal(messages.timeout_message(situation(last)), 503) from None
        if not decision.ok:
            await self._record_failure(decision.reason or "")
            status = refusal_status(decision.code)
            raise self._refusal(messages.refusal_message(situation(decision)), status)
        slots = tuple(context.inventory.slot(slot_id) for slot_id in decision.granted)
        taken = "".join(
            f"; took slot {h.slot_id} from {h.user} ({h.state}, priority {h.priority})"
            for h in decision.reclaimed
        )
        self._emit(
            45,
            f"GPU slot(s) {', '.join(s.id for s in slots)}{sim}: "
            f"{', '.join(s.uuid for s in slots)}{taken}",
        )
        return slots

    async def _enqueue(
        self, choice: SpawnChoice, limits: ResolvedLimits, waited: GpuWaitTimeout, arrival: float
    ) -> SpawnException:
        """Store the request (the `queue` option) with when it first asked (`arrival`: its
        place in the GPU queue, also after a hub restart) and say so; the hub starts the server
        when its GPU is granted (`_serve_queued`)."""
        context = self.context
        assert context.queued is not None
        context.hub_api_url = context.hub_api_url or self.hub.api_url
        options = {k: v for k, v in choice.user_options().items() if k != "queue"}
        request = QueuedRequest(
            self.user.name,
            self.name,
            self.object_name,
            options,
            limits.priority,
            tuple(group.name for group in self.user.groups),
            since=arrival,
        )
        try:
            stored = await self._blocking(
                context.queued.store.add, request, self.max_queued_per_user
            )
        except QueueLimitError as error:
            return SpawnException(str(error), reason="queue_limit", status_code=429)
        context.queued.follow(stored)
        decision = waited.decision
        if decision is not None and decision.earliest_expiry is not None:
            estimate = f"the earliest GPU hold ends {decision.earliest_expiry:%Y-%m-%d %H:%M} UTC"
        else:
            estimate = "no estimate: the GPUs are in use by running containers"
        await self._record_event("spawn-failure", f"queued: {choice.gpu_text()}; {estimate}")
        return SpawnException(
            f"queued: no {choice.gpu_text()} is free now; your request waits in the GPU queue "
            f"({len(context.queue)} waiting, by priority then arrival) and this server starts "
            f"by itself when a GPU is granted, also after a hub restart ({estimate}). Delete "
            "the server (or start it without the queue option) to withdraw the request.",
            reason="queued",
            status_code=202,
        )

    async def _record_failure(self, reason: str) -> None:
        await self._record_event("spawn-failure", reason)

    async def _record_event(self, kind: str, reason: str) -> None:
        """One event about this server; it waits in the hub process if the log is not
        writable now (a spawn never fails for want of a log line)."""
        event = NewEvent(kind, self.user.name, container=self.object_name, reason=reason)
        record = self.context.eventlog.record_many
        await self._blocking(lambda: record([event], defer=True))

    def _run_as(self) -> tuple[int, int] | None:
        explicit = self.user_ids.get(self.user.name)
        if explicit:
            return int(explicit[0]), int(explicit[1])
        if self.user_id_source != "passwd":
            return None
        try:
            entry = pwd.getpwnam(self.user.name)
        except KeyError:
            raise SpawnException(
                f"no Unix account {self.user.name!r} on this host, and containers run as the "
                "host account (c.DS01Spawner.user_id_source = 'passwd'); ask an admin to add "
                "one or to set c.DS01Spawner.user_ids",
                reason="uid",
                status_code=400,
            ) from None
        return entry.pw_uid, entry.pw_gid

    def _workspace(self, run_as: tuple[int, int] | None) -> tuple[str, str] | None:
        if not self.workspace_root:
            return None
        host = Path(self.workspace_root) / labels.escape_name(self.user.name)
        if not host.exists():
            host.mkdir(parents=True, mode=0o750)
            if run_as and os.geteuid() == 0:
                os.chown(host, *run_as)
        return str(host), self.workspace_mount

    def _plan(self, limits, choice, slots) -> ContainerPlan:
        run_as = self._run_as()
        return ContainerPlan(
            user=self.user.name,
            project=self.name or None,
            limits=limits,
            choice=choice,
            slots=slots,
            simulated=self.context.inventory.simulated,
            run_as=run_as,
            workspace=self._workspace(run_as),
            creator=self.context.allocator.creator_label(),
            name=self.object_name,
            trust=self.context.allocator.trust,
        )

    async def start(self):
        """See the module docstring; progress events on every step."""
        self._begin_progress()
        self._began = time.monotonic()
        self.context.recovery.track(self)
        try:
            return await self._start()
        except SpawnException as error:  # a refusal: its reason is already a short code
            metrics.spawn_failed(error.reason)
            raise
        except Exception as error:
            if engine_unreachable(error):
                metrics.spawn_failed("engine")
                raise self._engine_stopped(error) from None
            metrics.spawn_failed("error")
            raise
        finally:
            self._finish_progress()

    async def _start(self):
        began = time.perf_counter()
        limits = await self._resolve_limits()
        self._emit(
            5,
            f"limits: group {limits.group or '-'} ({limits.group_reason}), "
            f"priority {limits.priority}",
        )
        for notice in limits.notices():
            self._emit(6, f"note: {notice}")
        await self._record_expired(limits)
        choice = await self._choose(limits)
        self._choice = choice
        for note in choice.notes:
            self._emit(8, note)
        await self._check_container_quota(limits)
        limits = await self._apply_aggregate(limits, choice)
        self._emit(10, f"quota ok; image {choice.image}, {choice.gpu_text()}")
        for attempt in range(1, _START_ATTEMPTS + 1):
            slots = await self._allocate(choice, limits)
            try:
                started = await self._attempt(limits, choice, slots, began)
                await self._forget_queued(started_at=time.time())
                return started
            except _SlotsLost as lost:
                if attempt == _START_ATTEMPTS:
                    raise self._refusal(messages.lost_message(str(lost), attempt), 503) from None
                self._emit(40, f"not starting on those GPU slots: {lost}; asking again")
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _attempt(self, limits, choice, slots, began: float):
        """One try at steps 5 with `slots` granted: undone completely when it fails."""
        self._created_in_this_spawn = False
        self._spawn_slots = slots
        keeper = asyncio.ensure_future(self._keep_claim()) if slots else None
        try:
            existing = await self.get_object()  # after allocate, which removes ghosts
            return await self._run_container(existing, limits, choice, slots, began)
        except BaseException as error:  # also the hub cancelling the spawn (user pressed stop)
            await self._undo_failed_start(slots, str(error) or type(error).__name__)
            raise
        finally:
            if keeper is not None:
                keeper.cancel()
            self._spawn_slots = ()

    async def _keep_claim(self) -> None:
        """Renew this spawn's GPU claim every third of `reservation_ttl` until the spawn ends.
        When it is gone, stop renewing: the check before `docker start` then refuses."""
        allocator = self.context.allocator
        while True:
            await asyncio.sleep(self.reservation_ttl / 3)
            try:
                if not await self._blocking(allocator.renew, self.object_name):
                    self.log.warning("ds01 %s: its GPU claim lapsed", self._log_name)
                    return
            except AllocationStateError as error:
                self.log.error("ds01 %s: renewing its GPU claim: %s", self._log_name, error)

    async def _run_container(self, existing, limits, choice, slots, began: float):
        """Step 5 of the module docstring: (re-)create the container if needed, start it."""
        context = self.context
        plan = self._plan(limits, choice, slots)
        self._plan_in_use = plan
        if existing is not None:
            reason = await self._reclaimed(existing) or recreate_reason(existing, plan)
            if reason:
                self._emit(50, f"re-creating container {self.object_name}: {reason}")
                await self.remove_object()
                self.object_id = ""
            else:
                self._emit(50, f"restarting container {self.object_name}")
        self.user_options = {**(self.user_options or {}), **choice.user_options()}
        if self.orm_spawner is not None:
            self.orm_spawner.user_options = self.user_options
        if not self.object_id:
            self._emit(55, f"creating container {self.object_name}")
        own_steps = time.perf_counter() - began
        docker_began = time.perf_counter()
        self._check_seconds = 0.0
        result = await super().start()
        committed = time.perf_counter()
        if slots:
            await self._blocking(context.allocator.commit, self.object_name)
        # The check before `docker start` runs inside DockerSpawner.start but is ours.
        own_steps += time.perf_counter() - committed + self._check_seconds
        self._emit(90, f"container {self.object_name} started; waiting for Jupyter")
        # bench/spawn.py reads this line: the time DS01Spawner adds to DockerSpawner's start.
        self.log.info(
            "ds01 %s: own steps %.1f ms, DockerSpawner.start %.1f ms",
            self._log_name,
            own_steps * 1000,
            (committed - docker_began - self._check_seconds) * 1000,
        )
        await self._until_up(result)
        return result

    async def _reclaimed(self, existing: dict) -> str | None:
        """A higher priority took GPU slots from this (stopped) container: the allocator
        records that beside the labels, which cannot change, so the container is re-created
        (with new device requests and labels) even if it got the same slot numbers back."""
        if not (existing.get("Config") or {}).get("Labels", {}).get(labels.GPUS):
            return None
        lost = await self._blocking(self.context.allocator.revoked, existing["Id"])
        if not lost:
            return None
        entry = (await self._blocking(self.context.allocator.revocations)).get(existing["Id"])
        if entry and entry.get("reason"):  # GpuAllocator.end_hold (the engine stopped)
            return f"its GPU slot(s) {', '.join(lost)} were given back ({entry['reason']})"
        return f"its GPU slot(s) {', '.join(lost)} were reclaimed by a higher priority"

    async def _undo_failed_start(self, slots, reason: str) -> None:
        """A container this spawn created is removed (forced: its start may have landed);
        an existing one that failed to restart is stopped if it runs and kept (its hold runs
        as for any stop). Only then is the claim released, so the slots are never free while
        a container of this spawn may still run on them."""
        if self.object_id:
            try:
                if self._created_in_this_spawn:
                    await self.docker("remove_container", self.object_id, v=True, force=True)
                    self.object_id = ""
                else:
                    await self.docker("stop", self.object_id)
            except docker.errors.NotFound:
                self.object_id = ""
            except Exception as error:  # the engine went away: its hold ends once it is back
                if engine_unreachable(error):
                    self.context.recovery.note_casualty(self)
                elif isinstance(error, docker.errors.APIError):
                    self.log.error("ds01 %s: undoing the failed start: %s", self._log_name, error)
                else:
                    raise
        if slots:
            try:
                await self._blocking(self.context.allocator.release, self.object_name, reason)
            except AllocationStateError as error:  # the claim then lapses at its TTL
                self.log.error("ds01 %s: %s", self._log_name, error)
        await self._record_failure(reason)
        self.context.queue.notify()

    async def start_object(self):
        """`docker start` under the user's lock, once the user's aggregate caps allow it now
        (`ds01hub.host.aggregate_gate`: two spawns of one user cannot both pass) and the
        allocator has confirmed under its lock that the container's GPU slots are its own
        alone (`begin_start`). Docker's answer is awaited even when the spawn is cancelled
        meanwhile, so the undo never races the start."""
        try:
            await start_within_caps(
                self.context.allocator.state_dir,
                self.user.name,
                self._plan_in_use.limits.aggregate,
                self.context.docker.api,
                self._user_records,
                (self.object_name, self.object_id),
                self._start_checked,
                blocking=self._blocking,
                on_wait=lambda: self._emit(58, "waiting for another start of yours to finish"),
            )
        except AggregateRefused as error:
            raise SpawnException(str(error), reason="aggregate", status_code=409) from None
        except UserLockTimeout as error:
            raise SpawnException(str(error), reason="aggregate", status_code=503) from None

    async def _start_checked(self) -> None:
        """Under the user's lock: their cgroup parent, the GPU check, `docker start`."""
        await self._write_user_parent()
        if self._spawn_slots:
            checking = time.perf_counter()
            await self._confirm_slots()
            self._check_seconds += time.perf_counter() - checking
        await _complete_even_if_cancelled(super().start_object())

    async def _confirm_slots(self) -> None:
        allocator = self.context.allocator
        for _ in range(_START_ATTEMPTS):
            check = await self._blocking(allocator.begin_start, self.object_name, self.object_id)
            if check.ok:
                return
            if not check.stop_first:
                raise _SlotsLost(check.reason)
            # `preempt_running`: a higher priority took these slots from running containers.
            self._emit(
                60, f"stopping {len(check.stop_first)} preempted container(s): {check.reason}"
            )
            for container_id in check.stop_first:
                await self._blocking(self.context.docker.api.stop, container_id)
        raise _SlotsLost(check.reason)

    async def create_object(self):
        """DockerSpawner's create, with the plan's labels, env, limits and device requests
        deep-merged over `extra_create_kwargs` / `extra_host_config` (the plan wins)."""
        configured = (self.extra_create_kwargs, self.extra_host_config, self.cpu_limit)
        plan = self._plan_in_use = await self._with_image_labels(self._plan_in_use)
        host_config = plan.host_config()
        try:
            self.extra_create_kwargs = _merged(
                await self._evaluated(configured[0]), _literal(plan.create_kwargs())
            )
            self.extra_host_config = _merged(
                await self._evaluated(configured[1]), _literal(host_config)
            )
            if "nano_cpus" in host_config:  # Docker refuses NanoCpus with CpuPeriod/CpuQuota
                self.cpu_limit = None
            created = await super().create_object()
            self._created_in_this_spawn = True
            return created
        finally:
            self.extra_create_kwargs, self.extra_host_config, self.cpu_limit = configured

    async def _with_image_labels(self, plan: ContainerPlan) -> ContainerPlan:
        """The plan with its image's labels (pulled by now), so that none of them can land on
        a reserved key; an image with reverse-proxy routing labels is refused."""
        info = await self.docker("inspect_image", plan.choice.image)
        found = (info.get("Config") or {}).get("Labels") or {}
        if routing := labels.routing_keys(found):
            raise SpawnException(
                f"image {plan.choice.image} carries the reverse-proxy routing label "
                f"{routing[0]!r}, which only admins may set: rebuild it without that label",
                reason="options",
                status_code=403,
            )
        return replace(plan, image_labels=found)

    async def _evaluated(self, value):
        value = self._eval_if_callable(value)
        if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
            value = await value
        return dict(value or {})

    def get_env(self):
        env = super().get_env()
        plan = getattr(self, "_plan_in_use", None)
        if plan is not None:
            env.update(plan.environment())
        return env

    # -- the engine going away (.recovery) ----------------------------------------------------

    async def poll(self):
        """DockerSpawner's poll (the container's state), also while the engine is unreachable:
        then stopped, since dockerd stops its containers when it stops (running where
        live-restore keeps them). Every poll registers the server with the engine watcher."""
        recovery = self.context.recovery
        recovery.track(self)
        try:
            return await super().poll()
        except Exception as error:
            if not engine_unreachable(error):
                raise
            return recovery.stopped_status(self, error)

    async def _until_up(self, address: tuple[str, int]) -> None:
        """Wait for Jupyter to answer (at most `http_timeout`, as the hub would), polling the
        container every second: a container that exits, an engine that goes away, or no answer
        in time fails the spawn at once with the reason, and the undo of the failed start gives
        back what it holds. (The hub waited on an address where nothing ran, then stopped a
        server whose container kept its GPU for the whole hold.)"""
        if self.internal_ssl or self.server is None:
            return  # the hub's own wait (with its TLS context) decides
        ip, port = address
        host = f"[{ip}]" if ":" in ip else ip
        url = url_path_join(f"http://{host}:{int(port)}", self.server.base_url, "api")
        answered = asyncio.ensure_future(wait_for_http_server(url, timeout=self.http_timeout))
        try:
            while not (await asyncio.wait({answered}, timeout=1.0))[0]:
                status = await self.poll()
                if status is not None:
                    raise await self._stopped_during_start(status)
        finally:
            answered.cancel()
        if answered.exception() is not None:  # only the time limit escapes the wait
            raise SpawnException(
                f"Jupyter did not answer at {url} within {self.http_timeout:.0f}s "
                "(Spawner.http_timeout); the container was started, the server never came up",
                reason="timeout",
                status_code=500,
            )

    async def _stopped_during_start(self, status: Any) -> SpawnException:
        """Why the container stopped before Jupyter answered: its engine went away, or it
        exited (the last lines of its log say why: a container this spawn made is removed)."""
        if await self._blocking(self.context.recovery.went_away_since, self._began):
            return self._engine_stopped(status)
        try:
            tail = await self.docker("logs", self.object_id, tail=5)
            last = short_error(tail.decode(errors="replace")) or "(empty)"
        except Exception as error:
            last = f"(unavailable: {short_error(error)})"
        return SpawnException(
            f"container {self.object_name} stopped while Jupyter was starting "
            f"({short_error(status)}); its log ends: {last}",
            reason="exited",
            status_code=500,
        )

    def _engine_stopped(self, error: BaseException | str) -> SpawnException:
        """The failure of a spawn whose engine went away (its container, if any, is noted so
        that its GPU hold ends when the engine is back)."""
        self.context.recovery.note_casualty(self)
        message = (
            f"the Docker engine stopped during your spawn ({short_error(error)}). Start your "
            "server again once it is back (usually within a minute); whatever this spawn "
            "reserved is given back."
        )
        self._emit(95, message)
        return SpawnException(message, reason="engine", status_code=503)

    # -- stop, delete ------------------------------------------------------------------------

    async def get_url(self):
        """JupyterHub asks this after its restart for every server `poll` says is running. A
        hub killed between `docker start` and recording the address left a placeholder
        there; the address Docker reports is returned instead, so JupyterHub adopts the
        server rather than wait on an address that never was, then stop it."""
        recorded = self.server.url
        try:
            ip, port = await self.get_ip_and_port()
        except Exception as error:  # noqa: BLE001 - keep JupyterHub's own check going
            self.log.warning("ds01 %s: no address from Docker: %s", self._log_name, error)
            return recorded
        host = f"[{ip}]" if ":" in ip else ip
        url = f"{'https' if self.internal_ssl else 'http'}://{host}:{port}{self.server.base_url}"
        if url != recorded:
            self.log.warning(
                "ds01 %s: adopting the running container at %s (the hub had %s)",
                self._log_name,
                url,
                recorded,
            )
            await self._record_event(
                "reconcile", f"adopted: running at {url}; the hub had not recorded its address"
            )
        return url

    async def stop(self, now=False):
        """Stop and keep the container: it holds its GPUs for `gpu_hold_after_stop`."""
        if self.object_id:
            await super().stop(now=now)
        else:
            self.clear_state()
        context = self.context
        await self._blocking(context.allocator.sweep)
        context.queue.notify()

    async def _cancel_queued(self) -> None:
        """Deleting a server also withdraws its queued request."""
        if await self._forget_queued():
            await self._record_event("reconcile", "queued request withdrawn: server deleted")

    async def _forget_queued(self, started_at: float | None = None) -> bool:
        """The server started (from the queue or not: the user's hub pages say so for a day)
        or is gone: no request waits for it."""
        queued = self.context.queued
        if queued is None:
            return False
        stopped = queued.stop_waiting(self.object_name)
        removed = await self._blocking(queued.store.remove, self.object_name, started_at)
        return removed or stopped

    async def run_post_stop_hook(self):
        """After JupyterHub stopped a server, also one it found not running after its own
        restart (it calls `stop` only for running ones): a container that never started
        (its spawn died between create and start, e.g. with the hub) is removed, with a
        `reconcile` event. It holds no GPU and has nothing to keep."""
        result = super().run_post_stop_hook()
        if inspect.isawaitable(result):
            await result
        try:
            if self.object_id and await self._remove_if_never_started():
                self.object_id = ""
                await self._blocking(self.context.allocator.sweep)
        except Exception as error:
            if not engine_unreachable(error):
                raise  # while the engine is away the container stays; reconcile removes it later

    async def _remove_if_never_started(self) -> bool:
        """True when the container had never started and is now removed (never forced: a
        start that lands first wins, and the container is then stopped as usual); the user's
        cgroup parent goes too if that was their last container."""
        container = await self.get_object()
        if container is None or container["State"].get("Status") != "created":
            return False
        try:
            await self.docker("remove_container", self.object_id, v=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as error:
            if error.status_code == 409:
                return False
            raise
        reason = "removed: never started (its spawn was interrupted); its GPU slots are free"
        self.log.warning("ds01 %s: %s", self._log_name, reason)
        await self._record_event("reconcile", reason)
        await self._remove_user_parent(_cgroup_parent_of(container))
        return True

    async def delete_forever(self):
        """The named server is deleted: remove its container and release its GPUs."""
        await self._cancel_queued()
        container = await self.get_object()
        if container is not None:
            await self.remove_object()
        self.object_id = ""
        context = self.context
        await self._blocking(context.allocator.release, self.object_name, "server deleted")
        context.queue.notify()
        if container is not None:
            await self._remove_user_parent(_cgroup_parent_of(container))


def _cgroup_parent_of(container: dict) -> str:
    """The cgroup parent an inspected container was made with ("" for Docker's default)."""
    return str((container.get("HostConfig") or {}).get("CgroupParent") or "")


async def _complete_even_if_cancelled(awaitable: Any) -> Any:
    """Await `awaitable`; if the caller is cancelled meanwhile, still wait for it to finish
    (a Docker call in a thread cannot be called back) before the cancellation goes on."""
    task = asyncio.ensure_future(awaitable)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await task
        raise


def _literal(value: Any) -> Any:
    """Double the braces in strings: DockerSpawner formats `extra_*` values as templates, and a
    user name or image must reach Docker as it is."""
    if isinstance(value, str):
        return value.replace("{", "{{").replace("}", "}}")
    if isinstance(value, dict):
        return {_literal(k): _literal(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_literal(v) for v in value)
    return value


def _merged(base: dict, override: dict) -> dict:
    """Recursive dict merge; `override` wins."""
    result = dict(base)
    for key, value in override.items():
        if isinstance(result.get(key), dict) and isinstance(value, dict):
            result[key] = _merged(result[key], value)
        else:
            result[key] = value
    return result


async def _serve_queued(
    context: _HubContext, token: str, retry: float, request: QueuedRequest
) -> None:
    """Wait in the hub's GPU queue for a stored request (no time limit), then ask the hub's
    REST API to start its server: the spawn finds this process's claim on the slots and
    starts on them. A refusal that waiting cannot fix (the user's quota changed) or a start
    the hub refuses ends the request, with a `spawn-failure` event saying why."""
    from ds01hub.hub.client import HubClient, HubError, HubUnreachable

    loop = asyncio.get_running_loop()
    options = request.options
    choice = SpawnChoice(image=str(options.get("image", "")), gpus=int(options.get("gpus", 0)))
    choice = replace(choice, mig=options.get("mig"))
    gpu_request = choice.gpu_request(request.user, request.container)
    allocator = context.allocator

    async def attempt() -> Decision:
        return await loop.run_in_executor(context.executor, allocator.allocate, gpu_request, limits)

    async def release(decision: Decision | None = None) -> None:
        await loop.run_in_executor(
            context.executor, allocator.release, request.container, "queued start failed"
        )

    def failed(reason: str) -> None:
        event = NewEvent("spawn-failure", request.user, container=request.container, reason=reason)
        context.eventlog.record_many([event], defer=True)

    # no ORM user here: the hub groups' properties as the other doors see them (the snapshot
    # of the last ds01-ops pass); the spawn it leads to resolves them live again
    hub_groups = context.hub_groups
    try:
        limits = (
            hub_groups.resolve(context.limits.current, request.user, request.groups)
            if hub_groups is not None
            else context.limits.current.resolve(request.user, request.groups)
        )
    except (LimitsError, SnapshotError) as error:
        failed(f"queued request ended: {error}")
        return

    noted: list[tuple] = []

    def on_wait(status: QueueStatus) -> None:
        """Note where the request stands (for `container-list`) when that changed."""
        expiry = status.decision.earliest_expiry
        seen = (status.position, status.waiting, expiry.timestamp() if expiry else None)
        if noted[-1:] != [seen] and context.queued is not None:
            noted.append(seen)
            note = context.queued.store.note
            loop.run_in_executor(context.executor, note, request.container, *seen)

    while True:
        decision = await context.queue.acquire(
            request.container,
            limits.priority,
            attempt,
            user=request.user,
            timeout=None,
            abandon=release,
            on_wait=on_wait,
            arrival=request.since,  # its place when it first asked, whatever restarts since
        )
        if not decision.ok:
            failed(f"queued request ended: {decision.reason}")
            return
        client = HubClient(context.hub_api_url, token)
        try:
            await client.start_server(request.user, request.server, options)
        except HubUnreachable:
            await release()  # the hub's API is not up yet (hub start): ask again
            await asyncio.sleep(retry)
            continue
        except HubError as error:
            await release()
            failed(f"queued request ended: the hub refused to start it: {error}")
            return
        return


def _reconcile_at_hub_start(context: _HubContext, log: Any) -> None:
    """Before JupyterHub checks its servers: what a killed hub left that nothing claims
    (never-started containers) is removed, each with a `reconcile` event. When that cannot be
    done now (the engine not up yet, a full state directory), ds01-ops and the lifecycle pass
    do it later; the hub starts either way."""
    try:
        actions = context.allocator.reconcile()
    except Exception as error:
        log.warning("ds01: reconcile at hub start: %s: %.200s", type(error).__name__, error)
        return
    for action in actions:
        log.warning("ds01: reconcile: %s (%s): %s", action.container, action.user, action.reason)


def _prepare_at_hub_start() -> None:
    """JupyterHub runs no spawner code before the first spawn, so a hub would start on a broken
    limits file and fail every spawn. JupyterHub imports this module while it starts (it loads
    every spawner entry point for its configuration, and `spawner_class = "ds01"`), whatever
    else the admin's config says: wrap `JupyterHub.init_spawners` (the step that starts from
    the configured spawner class) so that it first builds the hub-wide context,
    `DS01Spawner.prepare_for_hub`, when the hub's spawner class is DS01Spawner (or a subclass).
    Processes without JupyterHub's application (the CLI, the services) are left alone."""
    app_module = sys.modules.get("jupyterhub.app")
    hub_class = getattr(app_module, "JupyterHub", None)
    init_spawners = getattr(hub_class, "init_spawners", None)
    if init_spawners is None or getattr(init_spawners, "ds01_prepared", False):
        return

    @functools.wraps(init_spawners)
    async def prepare_then_init_spawners(app: Any) -> Any:
        spawner_class = getattr(app, "spawner_class", None)
        if isinstance(spawner_class, type) and issubclass(spawner_class, DS01Spawner):
            spawner_class.prepare_for_hub(app)
        return await init_spawners(app)

    prepare_then_init_spawners.ds01_prepared = True  # type: ignore[attr-defined]
    hub_class.init_spawners = prepare_then_init_spawners


_prepare_at_hub_start()
