"""The ds01-ops JupyterHub managed service and the `ds01hub cull` command.

One process per hub (`python -m ds01hub.services.ops`, registered by
`ds01hub.hub.services.configure_ops`) runs the
GPU-aware cull loop (`ds01hub.services.ops.culler`) with the lifecycle pass
(`ds01hub.services.ops.lifecycle`), and serves the admin page (`ds01hub.services.ops.admin_page`)
and the state metrics (`ds01hub.services.ops.metrics`) under
`/services/ds01-ops/`. Why a service and not a task inside the hub: Docker, NVML and SQLite
calls (slow on a busy engine) never stall the hub's event loop, a crash here never takes the
hub down (JupyterHub restarts its managed services), and the same code runs from a shell as
`ds01hub cull --once`, talking to the hub through the same REST API.

It shares the spawner's state directory (`$DS01HUB_STATE_DIR`: allocator lock, reservations,
`events.db`) and limits file, so it sees the same holdings and writes the same event log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import docker
from jupyterhub.services.auth import HubOAuth, HubOAuthCallbackHandler
from prometheus_client import CollectorRegistry
from tornado import web
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from traitlets import Bool, Float, Integer, List, Unicode, default
from traitlets.config import Application

from ds01hub import paths, provenance
from ds01hub.engine import EngineState, engine_unreachable, engine_url
from ds01hub.errors import Ds01hubError
from ds01hub.gpu.allocator import AllocationStateError, GpuAllocator, docker_lister
from ds01hub.gpu.cluster import cluster_inventory
from ds01hub.gpu.eventlog import EventLog
from ds01hub.gpu.inventory import Inventory, load_inventory
from ds01hub.gpu.queued import QueuedStore, QueueFileError
from ds01hub.gpu.swarm_state import swarm_lister, swarm_remover
from ds01hub.hub.client import HubClient
from ds01hub.hub.group_snapshot import SnapshotError
from ds01hub.hub.services import OPS_PORT, OPS_SERVICE
from ds01hub.limits import LimitsError, LimitsStore
from ds01hub.services.ops.admin_page import (
    AdminApiHandler,
    AdminPageHandler,
    ChartCache,
    MetricsHandler,
    overview,
    queue_rows,
)
from ds01hub.services.ops.culler import Culler
from ds01hub.services.ops.lifecycle import Lifecycle
from ds01hub.services.ops.metrics import LimitsCollector, StateCollector
from ds01hub.services.ops.node_metrics import (
    DEFAULT_SERVICE,
    NodeMetricsCollector,
    NodeMetricsSource,
)
from ds01hub.services.settings import HostSettings
from ds01hub.units import utcnow

__all__ = ["OpsService", "build_components"]

EVENTLOG_FILE = "events.db"  # the spawner's default too (DS01Spawner.event_log_path)


@dataclass
class Components:
    """The long-lived objects one culler process works with."""

    culler: Culler
    allocator: GpuAllocator
    eventlog: EventLog
    limits: LimitsStore
    inventory: Inventory
    engine: EngineState
    cluster: NodeMetricsSource | None = None  # a swarm: the nodes' metrics endpoints
    #: The admin page's chart sums, kept between page loads (re-read when the log changes).
    charts: ChartCache = field(default_factory=ChartCache)

    def overview(self, queue: Iterable[dict[str, Any]] = ()) -> dict[str, Any]:
        """The admin page's model (blocking: Docker and SQLite). While the Docker engine is
        unreachable the page says so (and since when) instead of failing; slot holders are
        unknown until it answers. `queue`: the starts waiting for a GPU (from the hub)."""
        self.limits.reload()
        self.inventory = refresh_inventory(self.allocator, self.cluster)
        try:
            status = self.allocator.status()
            self.engine.back()
        except Exception as error:
            if not engine_unreachable(error):
                raise
            self.engine.lost(error)
            status = []
        return overview(
            status,
            self.inventory,
            self.eventlog,
            self.culler.clock(),
            config_error=self.limits.last_error,
            pending_culls=self.culler.warnings.load().values(),
            engine=self.engine,
            queue=queue,
            fairshare=self._fairshare(),
            group_problems=self.culler.group_limits.problems,
            nodes=self.cluster.overview() if self.cluster is not None else None,
            chart_cache=self.charts,
            hub_groups=self.culler.snapshot.status(self.culler.clock()),
        )

    def queue(self, users: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The GPU queue's rows (`queue_rows`), blocking (the queue file, the event log): the
        hub's pending spawns and the stored requests, ordered by effective priority. An
        unreadable queue file leaves the stored requests out (the hub logs it too)."""
        try:
            stored = QueuedStore(self.allocator.state_dir).load()
        except QueueFileError as error:
            self.culler.log.warning("admin page: %s", error)
            stored = []
        config = self.limits.current

        def priority(user: str, groups: Sequence[str]) -> int:
            """With the user's hub groups' properties (the snapshot), else the file's."""
            try:
                return self.culler.snapshot.resolve(config, user, groups).priority
            except (SnapshotError, LimitsError):  # the page names the problem elsewhere
                return config.resolve(user, groups).priority

        return queue_rows(users, stored, self.allocator.fair_share(), priority)

    def _fairshare(self) -> list[dict[str, Any]] | None:
        """The fair-share rows (None when `gpu_allocation.fairshare` is off)."""
        from ds01hub.gpu.fairshare import report

        config = self.limits.current
        if config.gpu_allocation.fairshare is None:
            return None
        try:
            resolve = self.culler.snapshot.reporter(config)
        except SnapshotError:  # the page says so (its hub groups line); the log's groups here
            resolve = None
        return report(self.allocator.fair_share(), config, resolve)


def build_components(
    hub: HubClient,
    docker_client: docker.DockerClient,
    limits_path: str | os.PathLike | None,
    state_dir: str | os.PathLike,
    *,
    remove_stopped: bool = True,
    inventory: Inventory | None = None,
    extra_labels: Iterable[str] = (),
    clock: Callable[[], datetime] = utcnow,
    aggregate_cgroup_root: str = "",
    cluster: NodeMetricsSource | None = None,
    **culler_options: Any,
) -> Components:
    """Wire limits (`limits_path` as set, None for the default: reloaded on change, last good
    kept; ds01hub.limits.load_limits_or_defaults), the GPU inventory, the event log
    (`state_dir/events.db`, as the spawner's), the allocator, the lifecycle pass and the culler.
    With `cluster` (a swarm; `docker_client` is a manager's) the inventory is the swarm's
    (re-read each pass and page: `refresh_inventory`), holdings are read from Swarm's services,
    and there is no lifecycle pass (it removes containers)."""
    limits = LimitsStore(limits_path, log=culler_options.get("log"))
    eventlog = EventLog(Path(state_dir) / EVENTLOG_FILE)
    extra_labels = list(extra_labels)
    trust = provenance.load(state_dir)
    if cluster is not None:
        inventory = inventory or cluster_inventory(cluster.nodes())
        lister = swarm_lister(docker_client, trust)
        remover: Callable[[str], bool] | None = swarm_remover(docker_client)
        remove_stopped = False
    else:
        inventory = inventory or load_inventory(limits.current.gpu_allocation)
        lister = docker_lister(docker_client, extra_labels, trust=trust)
        remover = None
    allocator = GpuAllocator(
        None if cluster is not None else docker_client,
        inventory,
        state_dir,
        eventlog,
        clock,
        limits=limits,
        container_lister=lister,
        container_remover=remover,
        trust=trust,
    )
    lifecycle = (
        Lifecycle(
            docker_client,
            allocator,
            limits,
            eventlog,
            extra_labels=extra_labels,
            cgroup_root=aggregate_cgroup_root,
        )
        if remove_stopped
        else None
    )

    def demand() -> float | None:
        """The share of GPU slots held (running, stopped within its hold, or being started)."""
        slots = refresh_inventory(allocator, cluster).slots
        if not slots:
            return None
        held = {h.slot_id for h in allocator.holdings()}
        return len(held & {s.id for s in slots}) / len(slots)

    culler = Culler(
        hub,
        docker_client,
        inventory,
        limits,
        eventlog=eventlog,
        state_dir=state_dir,
        lifecycle=lifecycle,
        extra_labels=extra_labels,
        clock=clock,
        trust=trust,
        demand=demand,
        cluster=cluster,
        **culler_options,
    )
    name = f"the Docker engine at {engine_url()}"
    engine = EngineState(
        name, culler_options.get("log"), connect=_docker_from_env, ping_interval=2.0
    )
    return Components(culler, allocator, eventlog, limits, inventory, engine, cluster)


def refresh_inventory(allocator: GpuAllocator, cluster: NodeMetricsSource | None) -> Inventory:
    """The allocator's inventory, re-read from the swarm's nodes first in swarm mode (nodes
    join, leave and drain while ds01-ops runs), as the spawner reads it at each spawn."""
    if cluster is not None:
        allocator.inventory = cluster_inventory(cluster.nodes())
    return allocator.inventory


def listed_urls(entries: Iterable[str]) -> dict[str, list[str]]:
    """`hostname=URL` entries (`OpsService.node_metrics_urls`) -> hostname -> URLs."""
    found: dict[str, list[str]] = {}
    for entry in entries:
        host, sep, url = entry.partition("=")
        if not sep or not host or not url.startswith(("http://", "https://")):
            raise Ds01hubError(
                f"node_metrics_urls: {entry!r} is not hostname=URL; "
                "use e.g. gpu2=http://gpu2:9400/metrics"
            )
        found.setdefault(host, []).append(url)
    return found


def _docker_from_env() -> docker.DockerClient:
    return docker.from_env()


class OpsService(HostSettings, Application):
    """The ds01-ops managed service: the cull loop, the admin page, the state metrics."""

    name = "ds01hub-ops"
    description = __doc__

    @default("log_level")
    def _default_log_level(self) -> int:
        return logging.INFO  # every warning, cull and removal is worth a line in the hub log

    interval = Float(300.0, help="Seconds between cull passes.").tag(config=True)
    warn_before = Float(
        600.0,
        help="Warn users this many seconds before their server is culled (0: no warning).",
    ).tag(config=True)
    gpu_threshold = Float(
        5.0, help="GPU utilisation (percent) at or above which a slot counts as busy."
    ).tag(config=True)
    cpu_threshold = Float(
        10.0, help="CPU use (percent of one core) at or above which a container is busy."
    ).tag(config=True)
    gpu_samples = Integer(
        3, help="NVML utilisation samples per pass; all must be under the threshold."
    ).tag(config=True)
    gpu_sample_interval = Float(1.0, help="Seconds between those samples.").tag(config=True)
    cpu_sample_interval = Float(
        1.0,
        help="Seconds between the two readings of a container's cgroup CPU counter that give "
        "its CPU use (taken while the GPU is sampled).",
    ).tag(config=True)
    dry_run = Bool(False, help="Decide and report, but stop, warn and remove nothing.").tag(
        config=True
    )
    remove_stopped = Bool(
        True,
        help="Run the lifecycle pass: record expired GPU holds, remove containers stopped "
        "longer than container_hold_after_stop (their workspace mounts are kept).",
    ).tag(config=True)
    extra_labels = List(
        Unicode(),
        help="Only containers with these labels too (`key=value`): one hub of several on an "
        "engine. Default: every ds01-managed container.",
    ).tag(config=True)
    aggregate_cgroup_root = Unicode(
        help="""Where the cgroup v1 controllers are mounted, as DS01Spawner.aggregate_cgroup_root
        (the same key): a container the lifecycle pass removes takes its user's parent cgroup
        with it when it was their last. Default: $DS01HUB_AGGREGATE_CGROUP_ROOT; empty: no
        parents are removed here.""",
    ).tag(config=True)

    @default("aggregate_cgroup_root")
    def _default_aggregate_cgroup_root(self) -> str:
        return paths.aggregate_cgroup_root()

    swarm = Bool(
        False,
        help="The Docker engine (DOCKER_HOST) is a Swarm manager and servers are "
        "DS01SwarmSpawner's services: the culler reads them from Swarm and their GPU and CPU use "
        "from each node's metrics endpoint (node_metrics_service, node_metrics_urls); the "
        "admin page shows the use per node. No lifecycle pass then.",
    ).tag(config=True)
    node_metrics_service = Unicode(
        DEFAULT_SERVICE,
        help="Swarm mode: the global service whose tasks serve each node's metrics in "
        "dcgm-exporter's names (dcgm-exporter itself, or `python -m "
        "ds01hub.services.node_exporter`), its port published in host mode. Empty: only "
        "node_metrics_urls.",
    ).tag(config=True)
    node_metrics_urls = List(
        Unicode(),
        help="Swarm mode: `hostname=URL` entries (repeat for several URLs of a node: "
        "dcgm-exporter's, cAdvisor's for containers' CPU), for endpoints outside Swarm; a "
        "listed node wins over discovery.",
    ).tag(config=True)
    node_metrics_timeout = Float(
        5.0, help="Seconds one node's metrics endpoint may take to answer (then: unknown)."
    ).tag(config=True)

    aliases = {
        "node-metrics-service": "OpsService.node_metrics_service",
        "node-metrics-url": "OpsService.node_metrics_urls",
        "node-metrics-timeout": "OpsService.node_metrics_timeout",
        "interval": "OpsService.interval",
        "warn-before": "OpsService.warn_before",
        "gpu-threshold": "OpsService.gpu_threshold",
        "cpu-threshold": "OpsService.cpu_threshold",
        "gpu-samples": "OpsService.gpu_samples",
        "gpu-sample-interval": "OpsService.gpu_sample_interval",
        "cpu-sample-interval": "OpsService.cpu_sample_interval",
        "limits": "OpsService.limits_path",
        "state-dir": "OpsService.state_dir",
        "label": "OpsService.extra_labels",
        "aggregate-cgroup-root": "OpsService.aggregate_cgroup_root",
    }
    flags = {
        "swarm": (
            {"OpsService": {"swarm": True}},
            "the engine is a Swarm manager: servers are services, use per node from endpoints",
        ),
        "dry-run": ({"OpsService": {"dry_run": True}}, "decide only, act on nothing"),
        "keep-stopped": (
            {"OpsService": {"remove_stopped": False}},
            "skip the lifecycle pass (no stopped container is removed)",
        ),
    }

    def components(self, hub: Any, docker_client: Any) -> Components:
        """The culler and its parts with this service's settings (the service's loop and
        `ds01hub cull` alike)."""
        cluster = None
        if self.swarm:
            cluster = NodeMetricsSource(
                docker_client,
                urls=listed_urls(self.node_metrics_urls),
                service=self.node_metrics_service,
                timeout=self.node_metrics_timeout,
            )
        return build_components(
            hub,
            docker_client,
            self.limits_path or None,
            paths.state_dir(self.state_dir),
            remove_stopped=self.remove_stopped,
            extra_labels=self.extra_labels,
            aggregate_cgroup_root=self.aggregate_cgroup_root,
            warn_before=self.warn_before,
            gpu_threshold=self.gpu_threshold,
            cpu_threshold=self.cpu_threshold,
            gpu_samples=self.gpu_samples,
            gpu_sample_interval=self.gpu_sample_interval,
            cpu_sample_interval=self.cpu_sample_interval,
            cluster=cluster,
            log=self.log,
        )

    def start(self) -> None:
        hub = HubClient(os.environ["JUPYTERHUB_API_URL"], os.environ["JUPYTERHUB_API_TOKEN"])
        parts = self.components(hub, docker.from_env())
        self._reconcile(parts)
        registry = CollectorRegistry()
        registry.register(StateCollector(parts.allocator, parts.eventlog, parts.engine))
        registry.register(LimitsCollector([parts.limits]))
        if parts.cluster is not None:
            registry.register(NodeMetricsCollector(parts.cluster))
        app = make_web_app(parts, hub, registry)
        url = os.environ.get("JUPYTERHUB_SERVICE_URL", f"http://127.0.0.1:{OPS_PORT}")
        host, _, port = url.split("://", 1)[-1].split("/", 1)[0].rpartition(":")
        HTTPServer(app).listen(int(port or OPS_PORT), host or "127.0.0.1")
        loop = IOLoop.current()
        loop.spawn_callback(parts.culler.run_forever, self.interval, self.dry_run, parts.engine)
        self.log.info("ds01-ops on %s: culling every %.0fs", url, self.interval)
        loop.start()

    def _reconcile(self, parts: Components) -> None:
        """At hub start (this service starts with the hub): remove what a killed hub left
        that nothing claims (never-started containers), each with a `reconcile` event. The
        lifecycle pass does it again on every cull pass."""
        try:
            actions = parts.allocator.reconcile()
        except AllocationStateError as error:
            self.log.error("reconcile at start: %s", error)
            return
        for action in actions:
            self.log.warning("reconcile: %s (%s): %s", action.container, action.user, action.reason)


def make_web_app(parts: Components, hub: HubClient, registry: CollectorRegistry) -> web.Application:
    """The service's routes: the admin page, its JSON, the metrics, the OAuth callback."""
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", f"/services/{OPS_SERVICE}/")
    prefix = prefix.rstrip("/") + "/"

    async def is_admin(name: str) -> bool:
        model = await hub.get_user(name, include_stopped=False)
        return bool(model and model.get("admin"))

    async def queue() -> list[dict[str, Any]]:
        """Starts pending in the hub (only users with a server that is active)."""
        users = await hub.request("GET", "/users", params={"state": "active"}) or []
        return await asyncio.to_thread(parts.queue, users)

    return web.Application(
        [
            (prefix, AdminPageHandler),
            (prefix + "api/overview", AdminApiHandler),
            (prefix + "metrics", MetricsHandler),
            (prefix + "oauth_callback", HubOAuthCallbackHandler),
        ],
        hub_auth=HubOAuth(api_url=os.environ.get("JUPYTERHUB_API_URL"), cache_max_age=60),
        cookie_secret=os.urandom(32),
        ds01_overview=parts.overview,
        ds01_is_admin=is_admin,
        ds01_queue=queue,
        ds01_registry=registry,
    )


def main(argv: list[str] | None = None) -> None:
    """`python -m ds01hub.services.ops`: the managed service (see `hub.services.configure_ops`)."""
    app = OpsService.instance()
    app.initialize(argv)
    with contextlib.suppress(KeyboardInterrupt):  # JupyterHub stops services with SIGINT first
        app.start()


if __name__ == "__main__":
    main()
