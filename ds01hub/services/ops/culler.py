"""GPU-aware idle culling, in the spirit of jupyterhub-idle-culler.

A server is culled (stopped through the Hub REST API, its container kept: the GPU hold and the
container hold then run their course, see `ds01hub.services.ops.lifecycle`) only when *all* of these
hold:

- no JupyterHub activity (the server's `last_activity`, fed by the proxy, the single-user
  server's activity reports and `container-run` shells) for the user's `idle_timeout`;
- no GPU activity: NVML utilisation of each of the container's slots under `gpu_threshold` in
  every one of several samples, and no compute process of the container on them (NVML pids are
  mapped to containers through `/proc/<pid>/cgroup`);
- CPU (percent of one core, from the container's cgroup counter read twice
  `cpu_sample_interval` apart: `ds01hub.services.ops.cgroups`) under `cpu_threshold`.

So a long training run with no browser open is never culled, and a missing signal (stats
unavailable) counts as activity: the culler never stops what it cannot see is idle. A null
`idle_timeout` means never. `max_runtime` (when set) stops a server after that long regardless.

High demand (DS01's `policies.high_demand_threshold` / `high_demand_idle_reduction`): while
more than that share of the GPU slots is allocated, idle timeouts shrink (0.5: halved). A
`.keep-alive` file in the workspace (a regular file; its times are the user's and are not
trusted) holds off idle culling for at most `policies.keepalive_max_duration` (24 h) past the
moment it would be due; it never holds off `max_runtime`.

Users are warned `warn_before` ahead: the warning is kept in `state_dir/cull-warnings.json`
(the CLI shows it on the user's next command via `pending_warnings`, the hub's pages as a
banner via `hub_announcement`) and written into the container
(`/tmp/ds01hub/cull-warning.txt`, for the notebook and terminals); a server is culled
only after its warning has stood for the lead time. Every cull is a `cull` event whose reason
starts with its code (`idle:`, `max_runtime:`), which the metrics count by.

The module has two halves: `decide` (pure, on plain data and an injected `now`) and `Culler`,
the thin loop that gathers the data from the hub, Docker and NVML and acts on the verdicts.
`ds01hub.services.ops.app` runs the loop as the ds01-ops JupyterHub managed service (which also
serves the admin page and the metrics) and as `ds01hub cull [--once] [--dry-run]`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import re
import tarfile
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ds01hub import labels, paths, provenance
from ds01hub.actions.operations import cpu_percent as docker_cpu_percent
from ds01hub.actions.operations import project_to_server
from ds01hub.engine import EngineState, engine_unreachable
from ds01hub.gpu.eventlog import EventLog
from ds01hub.gpu.inventory import Inventory
from ds01hub.hub.client import HubClient
from ds01hub.hub.group_limits import GroupLimits, fetch_group_limits
from ds01hub.hub.group_snapshot import SnapshotReader, write_snapshot
from ds01hub.limits import LimitsConfig, LimitsError, LimitsStore, record_expired
from ds01hub.provenance import Provenance
from ds01hub.services.ops.cgroups import CgroupCpu, cpu_percent_between
from ds01hub.services.ops.lifecycle import Lifecycle
from ds01hub.services.ops.node_metrics import NodeMetricsSource, Placement
from ds01hub.services.ops.warnings import CullWarning, WarningStore
from ds01hub.units import human_duration, utcnow

if TYPE_CHECKING:
    import docker

__all__ = [
    "CullPolicy",
    "CullWarning",
    "Culler",
    "ServerActivity",
    "Verdict",
    "decide",
]

CONTAINER_WARNING_PATH = "/tmp/ds01hub/cull-warning.txt"
KEEP_ALIVE_PATH = "/workspace/.keep-alive"  # the default workspace mount's
# Go's os.ModeType bits (Docker's path stat `mode`): dir, symlink, named pipe, socket, device,
# char device, irregular. A `.keep-alive` counts only as a regular file.
_GO_MODE_TYPE = (1 << 31) | (1 << 27) | (1 << 25) | (1 << 24) | (1 << 26) | (1 << 21) | (1 << 19)


def is_regular_file(stat_header: str | None) -> bool:
    """Whether Docker's `X-Docker-Container-Path-Stat` header (base64 JSON) is a regular file;
    anything unreadable is not."""
    if not stat_header or len(stat_header) > 4096:
        return False
    try:
        stat = json.loads(base64.b64decode(stat_header, validate=True))
        mode = stat["mode"]
    except (ValueError, TypeError, KeyError):
        return False
    return (
        isinstance(mode, int)
        and not isinstance(mode, bool)
        and mode >= 0
        and not (mode & _GO_MODE_TYPE)
    )


# -- the decision (pure) -----------------------------------------------------------------------


@dataclass(frozen=True)
class CullPolicy:
    """The user's limits that matter here plus the culler's thresholds."""

    idle_timeout: float | None  # seconds; None = never culled for idleness
    max_runtime: float | None = None  # seconds; None = no limit
    warn_before: float = 600.0  # lead time of the warning; 0 = cull without one
    gpu_threshold: float = 5.0  # percent utilisation; at or above = busy
    cpu_threshold: float = 10.0  # percent of one core; at or above = busy
    high_demand_threshold: float | None = None  # share of GPU slots allocated; None = never
    high_demand_reduction: float = 0.5  # the idle timeout shrinks by this share then
    keep_alive_max: float | None = 24 * 3600.0  # seconds `.keep-alive` may add; None = ignored

    def idle_limit(self, demand: float | None, keep_alive: bool) -> tuple[float | None, str]:
        """The idle time after which the server is due, and why it differs from
        `idle_timeout` ('' when it does not): high demand shrinks it, `.keep-alive` extends
        it by at most `keep_alive_max`."""
        if self.idle_timeout is None:
            return None, ""
        limit, notes = self.idle_timeout, []
        threshold = self.high_demand_threshold
        if threshold is not None and demand is not None and demand > threshold:
            limit = self.idle_timeout * (1 - self.high_demand_reduction)
            notes.append(
                f"high demand: {demand:.0%} of GPU slots allocated (over {threshold:.0%}), "
                f"idle_timeout {human_duration(self.idle_timeout)} cut to {human_duration(limit)}"
            )
        if keep_alive and self.keep_alive_max:
            limit += self.keep_alive_max
            more = human_duration(self.keep_alive_max)
            notes.append(f".keep-alive in the workspace: {more} more")
        return limit, "; ".join(notes)


@dataclass(frozen=True)
class ServerActivity:
    """What the culler knows about one running server and its container.

    `gpu_samples`: slot -> utilisation samples (None where NVML has none: MIG devices);
    `gpu_processes`: slot -> pids of *this container's* compute processes there;
    `cpu_percent`: None when unknown (not sampled or stats failed).
    """

    user: str
    server: str
    container: str
    container_id: str = ""
    group: str | None = None
    slots: tuple[str, ...] = ()  # the GPU slots it holds (its `ds01.gpus` label)
    started: datetime | None = None
    last_activity: datetime | None = None
    gpu_samples: Mapping[str, tuple[int | None, ...]] = field(default_factory=dict)
    gpu_processes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    cpu_percent: float | None = None
    keep_alive: bool = False  # a `.keep-alive` file is in its workspace
    unknown: tuple[str, ...] = ()  # signals that could not be read (a node's endpoint): busy

    @property
    def idle_since(self) -> datetime | None:
        """The last moment the hub saw the server used (or its start, if never used)."""
        moments = [m for m in (self.last_activity, self.started) if m is not None]
        return max(moments) if moments else None


@dataclass(frozen=True)
class Verdict:
    """`action`: keep, warn or cull; `code` says why in one word (active, busy, never,
    warned, idle, max_runtime, unknown); `warning`: the warning in force after this pass."""

    action: str
    code: str
    reason: str
    warning: CullWarning | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "code": self.code,
            "reason": self.reason,
            "cull_at": self.warning.cull_at.isoformat() if self.warning else None,
        }


def busy_signals(activity: ServerActivity, policy: CullPolicy) -> list[str]:
    """Why the container is not idle, from its GPU and CPU signals ([] = idle)."""
    signals = list(activity.unknown)
    for slot, samples in sorted(activity.gpu_samples.items()):
        known = [s for s in samples if s is not None]
        if known and max(known) >= policy.gpu_threshold:
            signals.append(f"GPU {slot} at {max(known)}%")
    for slot, pids in sorted(activity.gpu_processes.items()):
        if pids:
            signals.append(f"{len(pids)} compute process(es) on GPU {slot}")
    if activity.cpu_percent is None:
        signals.append("CPU use unknown")
    elif activity.cpu_percent >= policy.cpu_threshold:
        signals.append(f"CPU at {activity.cpu_percent:.0f}%")
    return signals


def idle_description(
    activity: ServerActivity, policy: CullPolicy, now: datetime, demand: float | None = None
) -> str:
    idle_for = (now - activity.idle_since).total_seconds() if activity.idle_since else 0
    slots = sorted(set(activity.gpu_samples) | set(activity.gpu_processes))
    parts = [f"no hub activity for {human_duration(idle_for)}"]
    if slots:
        parts.append(
            f"GPU {','.join(slots)} under {policy.gpu_threshold:g}% with no compute processes"
        )
    if activity.cpu_percent is not None:
        parts.append(f"CPU {activity.cpu_percent:.1f}% < {policy.cpu_threshold:g}%")
    _, note = policy.idle_limit(demand, activity.keep_alive)
    extra = f"; {note}" if note else ""
    return ", ".join(parts) + f" (idle_timeout {human_duration(policy.idle_timeout or 0)}{extra})"


def needs_sampling(
    activity: ServerActivity, policy: CullPolicy, now: datetime, demand: float | None = None
) -> bool:
    """True when the hub signal alone no longer protects the server, so GPU and CPU must be
    sampled (sampling is slow; most servers are skipped here). `demand`: the share of GPU
    slots allocated now."""
    limit, _ = policy.idle_limit(demand, activity.keep_alive)
    if limit is None or activity.idle_since is None:
        return False
    lead = max(policy.warn_before, 0.0)
    return now >= activity.idle_since + timedelta(seconds=max(limit - lead, 0))


def _warn_or_cull(
    activity: ServerActivity,
    code: str,
    reason: str,
    since: datetime,
    due: datetime,
    policy: CullPolicy,
    now: datetime,
    warning: CullWarning | None,
) -> Verdict:
    """Warn first (once per idle period), cull once the warning has stood its lead time."""
    if policy.warn_before <= 0:
        if now >= due:
            return Verdict("cull", code, reason)
        return Verdict("keep", "active", f"{code} due at {due:%Y-%m-%d %H:%M} UTC")
    current = warning if warning and (warning.code, warning.since) == (code, since) else None
    if current is None:
        cull_at = max(due, now + timedelta(seconds=policy.warn_before))
        new = CullWarning(
            activity.user, activity.server, activity.container, code, reason, since, now, cull_at
        )
        return Verdict("warn", code, reason, new)
    if now >= current.cull_at:
        return Verdict("cull", code, reason)
    return Verdict(
        "keep", "warned", f"warned; stopping at {current.cull_at:%Y-%m-%d %H:%M} UTC", current
    )


def decide(
    activity: ServerActivity,
    policy: CullPolicy,
    now: datetime,
    warning: CullWarning | None = None,
    demand: float | None = None,
) -> Verdict:
    """Keep, warn or cull one running server. `warning` is the one given earlier, if any;
    `demand` the share of GPU slots allocated now (None: unknown, no high demand)."""
    if policy.max_runtime is not None and activity.started is not None:
        due = activity.started + timedelta(seconds=policy.max_runtime)
        if now >= due - timedelta(seconds=max(policy.warn_before, 0)):
            reason = (
                f"running for {human_duration((now - activity.started).total_seconds())} "
                f"(max_runtime {human_duration(policy.max_runtime)})"
            )
            return _warn_or_cull(
                activity, "max_runtime", reason, activity.started, due, policy, now, warning
            )
    if policy.idle_timeout is None:
        return Verdict("keep", "never", "idle_timeout is null: never culled")
    since = activity.idle_since
    if since is None:
        return Verdict("keep", "unknown", "the hub reports no start or activity time")
    if not needs_sampling(activity, policy, now, demand):
        ago = human_duration((now - since).total_seconds())
        _, note = policy.idle_limit(demand, activity.keep_alive)
        return Verdict("keep", "active", f"hub activity {ago} ago" + (f" ({note})" if note else ""))
    busy = busy_signals(activity, policy)
    if busy:
        return Verdict("keep", "busy", "busy: " + ", ".join(busy))
    limit, _ = policy.idle_limit(demand, activity.keep_alive)
    assert limit is not None  # idle_timeout is set
    due = since + timedelta(seconds=limit)
    reason = idle_description(activity, policy, now, demand)
    return _warn_or_cull(activity, "idle", reason, since, due, policy, now, warning)


# -- the loop's edges: /proc, Docker, NVML, the hub -------------------------------------------

_CONTAINER_ID = re.compile(r"[0-9a-f]{64}")


def container_id_in_cgroup(text: str) -> str | None:
    """The Docker container id in a /proc/<pid>/cgroup file (cgroup v1 `/docker/<id>`, v2
    `docker-<id>.scope` both carry the 64-hex id), None for a host process."""
    match = _CONTAINER_ID.search(text)
    return match.group(0) if match else None


def container_of_pid(pid: int, proc_root: str | os.PathLike = "/proc") -> str | None:
    try:
        return container_id_in_cgroup((Path(proc_root) / str(pid) / "cgroup").read_text())
    except OSError:  # the process ended meanwhile, or is not visible here
        return None


def warning_archive(text: str) -> bytes:
    """A tar of `ds01hub/cull-warning.txt` to unpack into the container's /tmp."""
    buffer = io.BytesIO()
    payload = text.encode()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        folder = tarfile.TarInfo("ds01hub")
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(folder)
        entry = tarfile.TarInfo("ds01hub/cull-warning.txt")
        entry.size, entry.mode = len(payload), 0o644
        tar.addfile(entry, io.BytesIO(payload))
    return buffer.getvalue()


@dataclass(frozen=True)
class ServerReport:
    """One line of a pass's report: a server and what the culler decided for it."""

    user: str
    server: str
    container: str
    verdict: Verdict

    def to_dict(self) -> dict[str, Any]:
        project = self.server or "default"
        return {"user": self.user, "project": project, "container": self.container} | (
            self.verdict.to_dict()
        )


@dataclass
class PassReport:
    """What one pass decided (and, unless a dry run, did)."""

    at: datetime
    dry_run: bool
    servers: list[ServerReport] = field(default_factory=list)
    lifecycle: list[Any] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    demand: float | None = None  # the share of GPU slots allocated during the pass

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(),
            "dry_run": self.dry_run,
            "demand": self.demand,
            "servers": [s.to_dict() for s in self.servers],
            "lifecycle": [a.to_dict() for a in self.lifecycle],
            "errors": list(self.errors),
        }


class Culler:
    """The thin loop: gather activity from the hub, Docker and NVML, `decide`, act.

    `hub` is a `HubClient` whose token has `ds01hub.hub.services.OPS_SCOPES` (list users,
    read their groups, activity and servers, stop servers); `inventory` the
    GPU inventory (real or SIMULATED NVML); `limits` a `LimitsStore` (reloaded each pass) or a
    fixed `LimitsConfig`; `lifecycle` an optional `ds01hub.services.ops.lifecycle.Lifecycle` run
    after the servers. It sees only its deployment's containers (`trust`, default the state
    directory's:
    `ds01hub.provenance`); `extra_labels` (`key=value`) narrows that further (tests). `clock`
    gives `now` (tests inject it).
    """

    def __init__(
        self,
        hub: HubClient,
        docker_client: docker.DockerClient,
        inventory: Inventory,
        limits: LimitsStore | LimitsConfig,
        *,
        eventlog: EventLog | None = None,
        state_dir: str | os.PathLike | None = None,
        lifecycle: Lifecycle | None = None,
        warn_before: float = 600.0,
        gpu_threshold: float = 5.0,
        cpu_threshold: float = 10.0,
        gpu_samples: int = 3,
        gpu_sample_interval: float = 1.0,
        cpu_sample_interval: float = 1.0,
        stats_workers: int = 8,
        notify_containers: bool = True,
        proc_root: str | os.PathLike = "/proc",
        extra_labels: Iterable[str] = (),
        clock: Callable[[], datetime] = utcnow,
        log: logging.Logger | None = None,
        trust: Provenance | None = None,
        demand: Callable[[], float | None] | None = None,
        keep_alive_path: str = KEEP_ALIVE_PATH,
        cluster: NodeMetricsSource | None = None,
    ):
        self.hub = hub
        self.docker = docker_client
        self.inventory = inventory
        self.limits = limits
        self.eventlog = eventlog
        state_dir = paths.state_dir(state_dir)
        self.warnings = WarningStore(state_dir)
        self.snapshot_path = paths.hub_groups_snapshot(state_dir)
        self.snapshot = SnapshotReader(self.snapshot_path)  # as the other doors read it
        self.trust = trust or provenance.load(state_dir)
        self.lifecycle = lifecycle
        self.warn_before = warn_before
        self.gpu_threshold = gpu_threshold
        self.cpu_threshold = cpu_threshold
        self.gpu_samples = max(1, gpu_samples)
        self.gpu_sample_interval = gpu_sample_interval
        self.cpu_sample_interval = cpu_sample_interval
        self.cgroups = CgroupCpu(self._main_pid, Path(proc_root) / "self" / "mountinfo", proc_root)
        # only where no cgroup counter can be read: `docker stats` (a second per container)
        self._stats_pool = ThreadPoolExecutor(stats_workers, thread_name_prefix="ds01-cull-stats")
        self.notify_containers = notify_containers
        self.proc_root = proc_root
        self.extra_labels = list(extra_labels)
        self.clock = clock
        self.log = log or logging.getLogger("ds01hub.services.ops.culler")
        # the hub groups' limits as of the last pass (the admin page lists the bad ones)
        self.group_limits = GroupLimits()
        self.demand = demand
        self.keep_alive_path = keep_alive_path
        # a swarm: servers are services, their use comes from the nodes' metrics endpoints
        self.cluster = cluster
        self._placements: dict[str, Placement] = {}  # service id -> its task, as of this pass
        if cluster is not None:
            self.notify_containers = False  # the task's engine is not this one

    # -- gathering ----------------------------------------------------------------------------

    async def hub_users(self, page: int = 200) -> list[dict]:
        """Users with at least one active server, with their servers and groups."""
        users: list[dict] = []
        offset = 0
        while True:
            params = {"state": "active", "offset": str(offset), "limit": str(page)}
            batch = await self.hub.request("GET", "/users", params=params) or []
            users += batch
            if len(batch) < page:
                return users
            offset += page

    def running_records(self) -> dict[tuple[str, str], labels.ContainerRecord]:
        """(user, hub server name) -> the running managed container (in a swarm: service)."""
        if self.cluster is not None:
            placements = self.cluster.running(self.trust, self.extra_labels)
            self._placements = {p.record.id: p for p in placements.values()}
            return {key: placement.record for key, placement in placements.items()}
        filters = {"label": self.trust.label_filters(self.extra_labels), "status": "running"}
        records = {}
        for entry in self.docker.api.containers(filters=filters):
            record = labels.ContainerRecord.from_docker(entry, self.trust)
            if record is not None:
                records[(record.user, project_to_server(record.project))] = record
        return records

    async def refresh_group_limits(self, now: datetime, write: bool = True) -> None:
        """The hub groups' limits for this pass, written (with `write`: not in a dry run) to
        the snapshot the doors without the hub's database read (ds01hub.hub.group_snapshot);
        on failure the last ones stay, in memory and in the file (logged)."""
        try:
            self.group_limits = await fetch_group_limits(self.hub)
        except Exception as error:
            self.log.warning("group properties not read (keeping the last): %s", error)
            return
        if not write:
            return
        try:
            await asyncio.to_thread(write_snapshot, self.snapshot_path, self.group_limits, now)
        except OSError as error:
            self.log.warning("hub group snapshot %s not written: %s", self.snapshot_path, error)

    def record_expired_groups(self, now: datetime) -> int:
        """Put every group property's expiry that has passed in the event log, once for each
        member (as a spawn of theirs would), so the log says when their limits changed."""
        if self.eventlog is None:
            return 0
        new = 0
        for name, layer in self.group_limits.layers.items():
            expiry = layer.expiry
            if expiry is None or not expiry.expired(now):
                continue
            for user in self.group_limits.members.get(name, ()):
                try:
                    new += record_expired(self.eventlog, user, name, [expiry])
                except Exception as error:  # a full disk must not stop the culling
                    self.log.warning("expiry of %s not recorded: %s", expiry.source, error)
                    return new
        return new

    def policy_for(self, user: str, groups: Iterable[str]) -> CullPolicy:
        limits = getattr(self.limits, "current", self.limits)  # a store: refreshed per pass
        groups = list(groups)
        try:
            hub_groups = self.group_limits.for_groups(groups)
        except LimitsError:  # a bad group property: its spawns are refused; the file rules here
            hub_groups = []
        resolved = limits.resolve(user, groups, hub_groups=hub_groups)
        policies = limits.policies
        return CullPolicy(
            idle_timeout=resolved.idle_timeout,
            max_runtime=resolved.max_runtime,
            warn_before=self.warn_before,
            gpu_threshold=self.gpu_threshold,
            cpu_threshold=self.cpu_threshold,
            high_demand_threshold=policies.high_demand_threshold,
            high_demand_reduction=policies.high_demand_idle_reduction,
            keep_alive_max=policies.keepalive_max_duration,
        )

    def current_demand(self) -> float | None:
        """The share of GPU slots allocated now; None when unknown (no high demand then)."""
        if self.demand is None:
            return None
        try:
            return self.demand()
        except Exception as error:
            self.log.warning("GPU demand unknown this pass: %s", error)
            return None

    def has_keep_alive(self, container_id: str) -> bool:
        """Whether the container's workspace has a `.keep-alive` regular file (Docker's path
        stat, a HEAD: nothing of the file is read). Unknown counts as absent."""
        api = self.docker.api
        try:
            url = api._url("/containers/{0}/archive", container_id)
            response = api.head(url, params={"path": self.keep_alive_path}, timeout=30)
        except Exception as error:
            self.log.warning("no .keep-alive check for %s: %s", container_id[:12], error)
            return False
        if response.status_code != 200:
            return False
        return is_regular_file(response.headers.get("X-Docker-Container-Path-Stat"))

    def record_expired_limits(self, now: datetime) -> int:
        """Put every `user_overrides` expiry that has passed in the event log (once each), so
        the log says when a user's limits changed even if they never spawn again."""
        if self.eventlog is None:
            return 0
        config = getattr(self.limits, "current", self.limits)
        new = 0
        for user, expiry in config.expired_overrides(now):
            try:
                new += record_expired(self.eventlog, user, None, [expiry])
            except Exception as error:  # a full disk must not stop the culling
                self.log.warning("expiry of %s not recorded: %s", expiry.source, error)
                break
        return new

    def _main_pid(self, container_id: str) -> int | None:
        """The container's main process (to find a cgroup outside the usual places)."""
        try:
            state = self.docker.api.inspect_container(container_id).get("State") or {}
        except Exception as error:
            self.log.warning("cannot inspect %s: %s", container_id[:12], error)
            return None
        pid = state.get("Pid")
        return pid if isinstance(pid, int) and pid > 0 else None

    def cpu_percent(self, container_id: str) -> float | None:
        """One `docker stats` sample (Docker averages over about a second); None on failure.
        Only for containers whose cgroup counter cannot be read (`cpu_activity`)."""
        try:
            return docker_cpu_percent(self.docker.api.stats(container_id, stream=False))
        except Exception as error:
            self.log.warning("no CPU stats for %s: %s", container_id[:12], error)
            return None

    async def cpu_activity(self, container_ids: Iterable[str]) -> dict[str, float | None]:
        """CPU % of every container over `cpu_sample_interval`: its cgroup counter read
        before and after (one file read each); `docker stats` for any without a counter."""
        ids = list(container_ids)
        self.cgroups.forget_all_but(ids)
        before = await asyncio.to_thread(self.cgroups.readings, ids)
        start = time.monotonic()
        await asyncio.sleep(self.cpu_sample_interval)
        after = await asyncio.to_thread(self.cgroups.readings, ids)
        elapsed = time.monotonic() - start
        percent = {cid: cpu_percent_between(before[cid], after[cid], elapsed) for cid in ids}
        missing = [cid for cid in ids if before[cid] is None]
        if missing:
            loop = asyncio.get_running_loop()
            samples = await asyncio.gather(
                *(loop.run_in_executor(self._stats_pool, self.cpu_percent, c) for c in missing)
            )
            percent.update(zip(missing, samples, strict=True))
        return percent

    async def gpu_activity(
        self, containers: Mapping[str, tuple[str, ...]]
    ) -> tuple[dict[str, dict], dict[str, dict]]:
        """Sample NVML `gpu_samples` times: per container id, slot -> utilisation samples and
        slot -> pids of that container computing on the slot."""
        samples: dict[str, dict[str, list]] = {cid: {} for cid in containers}
        processes: dict[str, dict[str, set]] = {cid: {} for cid in containers}
        for index in range(self.gpu_samples):
            if index:
                await asyncio.sleep(self.gpu_sample_interval)
            for cid, slots in containers.items():
                for slot in slots:
                    samples[cid].setdefault(slot, []).append(self.inventory.utilization(slot))
                    mine = {
                        pid
                        for pid in self.inventory.processes(slot)
                        if container_of_pid(pid, self.proc_root) == cid
                    }
                    processes[cid].setdefault(slot, set()).update(mine)
        return (
            {cid: {s: tuple(v) for s, v in slots.items()} for cid, slots in samples.items()},
            {
                cid: {s: tuple(sorted(v)) for s, v in slots.items()}
                for cid, slots in processes.items()
            },
        )

    # -- one pass -----------------------------------------------------------------------------

    async def run_once(self, dry_run: bool = False) -> PassReport:
        """Decide for every running server; unless `dry_run`, warn, cull, run the lifecycle
        pass and save the warnings."""
        now = self.clock()
        report = PassReport(now, dry_run)
        if hasattr(self.limits, "refresh"):  # a LimitsStore: read off the loop, time-limited
            await self.limits.refresh()
        if not dry_run:
            await asyncio.to_thread(self.record_expired_limits, now)
        await self.refresh_group_limits(now, write=not dry_run)
        if not dry_run:
            await asyncio.to_thread(self.record_expired_groups, now)
        users = await self.hub_users()
        records = await asyncio.to_thread(self.running_records)
        previous = self.warnings.load()
        candidates: list[tuple[ServerActivity, CullPolicy]] = []
        for user in users:
            for server, model in (user.get("servers") or {}).items():
                record = records.get((user["name"], server))
                if record is None or not model.get("ready") or model.get("pending"):
                    continue  # not ours, or starting/stopping: leave it to the hub
                activity = ServerActivity(
                    user=user["name"],
                    server=server,
                    container=record.name,
                    container_id=record.id,
                    group=record.group,
                    slots=record.gpus,
                    started=labels.parse_docker_time(model.get("started")),
                    last_activity=labels.parse_docker_time(model.get("last_activity")),
                )
                candidates.append((activity, self.policy_for(user["name"], user.get("groups", []))))
        demand = await asyncio.to_thread(self.current_demand)
        report.demand = demand
        candidates = await self._keep_alives(candidates, now, demand)
        candidates = await self._sample(candidates, now, demand)
        kept: list[CullWarning] = []
        for activity, policy in candidates:
            verdict = decide(activity, policy, now, previous.get(activity.container), demand)
            report.servers.append(
                ServerReport(activity.user, activity.server, activity.container, verdict)
            )
            if dry_run:
                continue
            pending = verdict.warning
            try:
                await self._act(activity, verdict, previous.get(activity.container))
            except Exception as error:  # one server's failure must not stop the pass
                report.errors.append(f"{activity.container}: {error}")
                self.log.exception("acting on %s failed", activity.container)
                pending = previous.get(activity.container)  # a failed cull: again next pass
            if pending is not None:
                kept.append(pending)
        if self.lifecycle is not None:
            report.lifecycle = await asyncio.to_thread(self.lifecycle.run_once, dry_run)
        if not dry_run:
            self.warnings.save(kept)
        return report

    async def _keep_alives(
        self,
        candidates: list[tuple[ServerActivity, CullPolicy]],
        now: datetime,
        demand: float | None,
    ) -> list[tuple[ServerActivity, CullPolicy]]:
        """Look for `.keep-alive` only where it could matter: servers that would be sampled
        without one."""
        result = list(candidates)
        if self.cluster is not None:  # the workspace is on the task's node: not seen from here
            return result
        for i, (activity, policy) in enumerate(candidates):
            if policy.keep_alive_max and needs_sampling(activity, policy, now, demand):
                found = await asyncio.to_thread(self.has_keep_alive, activity.container_id)
                result[i] = (replace(activity, keep_alive=found), policy)
        return result

    async def _sample(
        self,
        candidates: list[tuple[ServerActivity, CullPolicy]],
        now: datetime,
        demand: float | None = None,
    ) -> list[tuple[ServerActivity, CullPolicy]]:
        """Add GPU and CPU signals to the servers the hub signal no longer protects."""
        due = [i for i, (a, p) in enumerate(candidates) if needs_sampling(a, p, now, demand)]
        if not due:
            return candidates
        targets = {candidates[i][0].container_id: candidates[i][0] for i in due}
        if self.cluster is not None:
            return await self._sample_nodes(candidates, due)
        gpu_slots = {
            cid: tuple(s for s in activity.slots if self.inventory.has_slot(s))
            for cid, activity in targets.items()
        }
        cpu_task = asyncio.ensure_future(self.cpu_activity(targets))
        samples, processes = await self.gpu_activity(gpu_slots)
        cpu = await cpu_task
        sampled = list(candidates)
        for i in due:
            activity, policy = candidates[i]
            cid = activity.container_id
            sampled[i] = (
                replace(
                    activity,
                    gpu_samples=samples.get(cid, {}),
                    gpu_processes=processes.get(cid, {}),
                    cpu_percent=cpu[cid],
                ),
                policy,
            )
        return sampled

    async def _sample_nodes(
        self, candidates: list[tuple[ServerActivity, CullPolicy]], due: list[int]
    ) -> list[tuple[ServerActivity, CullPolicy]]:
        """A swarm's servers: their nodes' endpoints scraped `gpu_samples` times (at least
        twice, for CPU) `gpu_sample_interval` apart (`cpu_sample_interval` for two)."""
        from ds01hub.services.ops.node_metrics import sampled_activity

        assert self.cluster is not None
        placements = {i: self._placements.get(candidates[i][0].container_id) for i in due}
        hosts = {p.node for p in placements.values() if p is not None}
        rounds = max(self.gpu_samples, 2)
        gap = self.gpu_sample_interval if self.gpu_samples > 1 else self.cpu_sample_interval
        scrapes = []
        for index in range(rounds):
            if index:
                await asyncio.sleep(gap)
            scrapes.append(await asyncio.to_thread(self.cluster.scrape, hosts, time.monotonic()))
        slots = {n.hostname: n.slots for n in await asyncio.to_thread(self.cluster.nodes)}
        sampled = list(candidates)
        for i, placement in placements.items():
            activity, policy = candidates[i]
            if placement is None:  # stopped since the pass began
                sampled[i] = (replace(activity, unknown=("its task is gone",)), policy)
                continue
            signals = sampled_activity(placement, slots.get(placement.node, ()), scrapes)
            sampled[i] = (
                replace(
                    activity,
                    gpu_samples=signals.gpu_samples,
                    cpu_percent=signals.cpu_percent,
                    unknown=signals.unknown,
                ),
                policy,
            )
        return sampled

    async def _act(
        self, activity: ServerActivity, verdict: Verdict, previous: CullWarning | None
    ) -> None:
        if verdict.action == "warn":
            self.log.info("warning %s: %s", activity.container, verdict.warning.message())
            await self._notify(activity.container_id, verdict.warning.message() + "\n")
        elif verdict.action == "cull":
            self.log.info("culling %s: %s", activity.container, verdict.reason)
            await self.hub.stop_server(activity.user, activity.server)
            await self._notify(activity.container_id, "")  # no stale warning after a restart
            if self.eventlog is not None:
                self.eventlog.record(
                    "cull",
                    activity.user,
                    container=activity.container,
                    group=activity.group,
                    reason=f"{verdict.code}: {verdict.reason}",
                )
        elif previous is not None and verdict.warning is None:
            await self._notify(activity.container_id, "")  # the warning no longer applies

    async def _notify(self, container_id: str, text: str) -> None:
        """Best effort: write (or empty) the warning file inside the container."""
        if not self.notify_containers:
            return
        folder = str(Path(CONTAINER_WARNING_PATH).parent.parent)
        try:
            await asyncio.to_thread(
                self.docker.api.put_archive, container_id, folder, warning_archive(text)
            )
        except Exception as error:
            self.log.warning("could not write the warning into %s: %s", container_id[:12], error)

    async def run_forever(
        self, interval: float, dry_run: bool = False, engine: EngineState | None = None
    ) -> None:
        """A pass every `interval` seconds; a failed pass is logged and the loop goes on. With
        `engine`, passes wait while the Docker engine is unreachable (said once when it goes,
        once when it is back) instead of failing with a traceback every interval."""
        while True:
            try:
                if engine is None or await asyncio.to_thread(engine.probe):
                    report = await self.run_once(dry_run)
                    for line in report.servers:
                        if line.verdict.action != "keep":
                            self.log.info("%s", line.to_dict())
            except Exception as error:
                if engine is not None and engine_unreachable(error):
                    engine.lost(error)
                else:
                    self.log.exception("cull pass failed")
            await asyncio.sleep(interval)
