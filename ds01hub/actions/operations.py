"""The users' container actions, shared by the broker (SSH users) and the hub-side service.

Every action is scoped to one user fixed at construction: containers are found by the labels
`ds01.managed=true` + `ds01.user=<user>` + `ds01.project=<project>` of this deployment, and only
those whose signature verifies (`ds01hub.provenance`) count, never by a name the client sends,
so no request can reach another user's container (nor one that merely claims to be theirs).
Starting and stopping go through the JupyterHub REST API (`HubClient`) with the spawn
`user_options`, so quotas and the GPU allocator run the same code as in the browser. Docker is
read (and used for exec, stats, removal of the user's own stopped containers) through a
docker-py client.

The pure half (names, views, stats arithmetic) sits at the top and is unit-tested on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from ds01hub import labels
from ds01hub.actions.engines import LocalContainers, SwarmContainers
from ds01hub.actions.names import OperationError, validate_name
from ds01hub.errors import Ds01hubError
from ds01hub.gpu.inventory import Inventory
from ds01hub.gpu.messages import EVENT_KEY, Message
from ds01hub.hub.client import HubClient, HubError, HubUnreachable
from ds01hub.limits import LimitsError, ResolvedLimits
from ds01hub.provenance import Provenance
from ds01hub.spawn_options import GPUS_OR_MIG, SPAWN_OPTION_KEYS, asks_gpus_and_mig
from ds01hub.units import utcnow

if TYPE_CHECKING:
    import docker

#: The project name shown for the user's default (unnamed) hub server.
DEFAULT_PROJECT = labels.DEFAULT_PROJECT

#: What `container-run` starts without a command: bash if the image has it, else sh.
LOGIN_SHELL = ["/bin/sh", "-c", "if [ -x /bin/bash ]; then exec /bin/bash -l; fi; exec /bin/sh -l"]

#: How the hub ends a spawn left in the GPU queue (DS01Spawner's `queue` option): JupyterHub's
#: failed progress event, "Spawn failed: queued: ...". Not a failure: a request that waits.
QUEUED_SPAWN = re.compile(r"(?:Spawn failed: )?(queued: .*)", re.DOTALL)

# ---- the services behind every action, when they fail --------------------------------------

DOCKER_HINT = (
    "the Docker engine (dockerd) is not running or not answering; your containers are kept "
    "and come back when it runs again: tell your admin (systemctl status docker)"
)
HUB_HINT = "JupyterHub is not running or not answering: tell your admin (see the hub's log)"


def root_cause(error: BaseException) -> str:
    """The innermost reason of a wrapped connection error ("Connection refused", "No such file
    or directory"), as docker-py/requests/urllib3 nest them in arguments and causes."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            return current.strerror
        nested = [a for a in current.args if isinstance(a, BaseException)]
        current = nested[0] if nested else (current.__cause__ or current.__context__)
    return str(error)


def docker_unreachable(where: str, error: BaseException | None = None) -> OperationError:
    reason = f" ({root_cause(error)})" if error is not None else ""
    return OperationError(
        f"Docker engine unreachable at {where}{reason}", hint=DOCKER_HINT, status=503
    )


def hub_failure(error: HubError, doing: str | None = None) -> OperationError:
    """A hub error as the user's error: no answer at all is `cannot reach the hub`, else what
    the hub said (its 4xx kept; anything else is the hub's fault: 502)."""
    if isinstance(error, HubUnreachable):
        return OperationError(error.message, hint=HUB_HINT, status=503)
    status = error.status if 400 <= error.status < 500 else 502
    return OperationError(f"{doing or 'the hub said'}: {error.message}", status=status)


def named_error(error: BaseException, docker_where: str) -> Ds01hubError | None:
    """The one place where a failure of the services behind every action -- the hub's API and
    the Docker engine (docker-py over requests) -- gets its name and a hint; None when
    `error` is none of those (a bug: the caller reports an internal error). Any other
    Ds01hubError (a refusal such as an ImageError, a 503 naming a service that is down) is
    its own name, except a host's failure (status 500: a state file that cannot be written),
    an internal error whose paths are not shown."""
    if isinstance(error, HubError):
        return hub_failure(error)
    if isinstance(error, Ds01hubError):
        return None if error.status == 500 else error
    try:
        import docker.errors
        import requests.exceptions
    except ImportError:  # the host CLI without docker-py never sees these errors
        return None
    if isinstance(error, requests.exceptions.Timeout):
        return OperationError(
            f"Docker engine at {docker_where} did not answer in time", hint=DOCKER_HINT, status=504
        )
    if isinstance(error, requests.exceptions.ConnectionError):
        return docker_unreachable(docker_where, error)
    if isinstance(error, docker.errors.APIError):
        explanation = error.explanation or str(error)
        return OperationError(f"the Docker engine refused: {explanation}", status=502)
    if isinstance(error, docker.errors.DockerException):
        return docker_unreachable(docker_where, error)
    return None


def is_gone(error: BaseException) -> bool:
    """Docker's 404: the container was removed meanwhile (e.g. by the hub on stop when
    `DockerSpawner.remove` is set)."""
    return getattr(error, "status_code", None) == 404


def start_failure(project: str, state: str, docker_state: Mapping[str, Any]) -> OperationError:
    """A start that ended without a running container, said with what Docker recorded."""
    if docker_state:
        what = f"exited with code {docker_state.get('ExitCode')}"
        if docker_state.get("OOMKilled"):
            what += " (out of memory)"
        if docker_state.get("Error"):
            what += f": {docker_state['Error']}"
    else:
        what = "does not exist"
    return OperationError(
        f"{project!r} did not start: the hub reported it ready, but it is {state} "
        f"(its container {what})",
        hint=f"see `container-list --all`; try `container-start {project}` again, or ask your "
        "admin to look at the hub's log",
        status=409,
    )


def project_to_server(project: str) -> str:
    """Hub server name of a project: the default project is the user's unnamed server."""
    return "" if project == DEFAULT_PROJECT else project


def server_to_project(server: str) -> str:
    return server or DEFAULT_PROJECT


def spawn_options(requested: Mapping[str, Any]) -> dict[str, Any] | None:
    """Keep the known spawn keys that were given; refuse unknown ones. None = reuse the last."""
    unknown = sorted(set(requested) - set(SPAWN_OPTION_KEYS))
    if unknown:
        raise OperationError(
            f"unknown spawn option(s) {', '.join(unknown)}",
            hint=f"known options: {', '.join(SPAWN_OPTION_KEYS)}",
        )
    options = {k: v for k, v in requested.items() if v is not None}
    if asks_gpus_and_mig(options):
        raise OperationError(f"ask for {GPUS_OR_MIG}", hint="drop one of the two options")
    return options or None


def _record_of(attrs: Mapping[str, Any]) -> labels.ContainerRecord:
    """The record of a container that `UserOperations` listed (and verified)."""
    record = labels.ContainerRecord.claimed(attrs)
    assert record is not None, "UserOperations lists only containers with verified labels"
    return record


def isoformat(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def container_state(docker_status: str | None, hub_pending: str | None) -> str:
    """One word for the user: starting / stopping (hub transition), running, or stopped."""
    if hub_pending == "spawn":
        return "starting"
    if hub_pending == "stop":
        return "stopping"
    if docker_status in ("running", "restarting", "paused"):
        return "running"
    return "stopped"


def queued_view(request: Any, project: str) -> dict[str, Any]:
    """A queued spawn request (`ds01hub.gpu.queued.QueuedRequest`) in `container-list`:
    state `queued`, its place in the hub's GPU queue and the estimate (earliest hold expiry)."""
    estimate = request.estimate
    return {
        "project": project,
        "state": "queued",
        "image": request.options.get("image"),
        "gpus": [],
        "queued_since": isoformat(datetime.fromtimestamp(request.since, UTC)),
        "queue_position": request.position,
        "queue_waiting": request.waiting,
        "queue_estimate": isoformat(datetime.fromtimestamp(estimate, UTC)) if estimate else None,
    }


def container_view(
    attrs: Mapping[str, Any] | None,
    server: Mapping[str, Any] | None,
    project: str,
    now: datetime,
    gpu_hold_after_stop: float | None,
    status: str | None = None,
) -> dict[str, Any]:
    """What `container-list` shows for one project, from its Docker inspect data or list entry
    (already verified: `UserOperations._summaries`) and its hub server model (either may be
    missing: a server still spawning has no container yet). A list entry has no start or stop
    time: `started_at`/`finished_at` (and the durations) are then None, and `status`, Docker's
    own line (`Exited (0) 3 hours ago`), says roughly how long ago."""
    record = labels.ContainerRecord.claimed(attrs) if attrs else None
    server = server or {}
    state = container_state(record.state if record else None, server.get("pending"))
    docker_state = (attrs or {}).get("State")
    started = labels.parse_docker_time(
        docker_state.get("StartedAt") if isinstance(docker_state, Mapping) else None
    )
    finished = record.finished_at if record else None
    running = state in ("running", "stopping")
    gpus = list(record.gpus) if record else []
    held_until = None
    if gpus and not running and finished and gpu_hold_after_stop is not None:
        until = finished + timedelta(seconds=gpu_hold_after_stop)
        held_until = until if until > now else None
    last_activity = labels.parse_docker_time(server.get("last_activity"))
    return {
        "project": project,
        "container": record.name if record else None,
        "id": record.id[:12] if record else None,
        "state": state,
        "image": (record.image if record else None)
        or (server.get("user_options") or {}).get("image"),
        "gpus": gpus,
        "gpus_released": bool(gpus) and not running and held_until is None,
        "started_at": isoformat(started),
        "finished_at": isoformat(finished),
        "uptime_s": (now - started).total_seconds() if running and started else None,
        "stopped_for_s": (now - finished).total_seconds() if not running and finished else None,
        "idle_s": (now - last_activity).total_seconds() if running and last_activity else None,
        "held_until": isoformat(held_until),
        "url": server.get("url") if server.get("ready") else None,
        "status": status,
    }


def cpu_percent(stats: Mapping[str, Any]) -> float | None:
    """CPU use from one `docker stats` sample, in percent of one core (400% = four cores)."""
    cpu, pre = stats.get("cpu_stats") or {}, stats.get("precpu_stats") or {}
    try:
        cpu_delta = cpu["cpu_usage"]["total_usage"] - pre["cpu_usage"]["total_usage"]
        system_delta = cpu["system_cpu_usage"] - pre["system_cpu_usage"]
        cores = cpu.get("online_cpus") or len(cpu["cpu_usage"].get("percpu_usage") or []) or 1
    except (KeyError, TypeError):
        return None
    if system_delta <= 0:
        return 0.0
    return cpu_delta / system_delta * cores * 100.0


def memory_used(stats: Mapping[str, Any]) -> int | None:
    """Memory in use without the page cache, as `docker stats` shows it."""
    mem = stats.get("memory_stats") or {}
    if "usage" not in mem:
        return None
    detail = mem.get("stats") or {}
    cache = detail.get("inactive_file", detail.get("total_inactive_file", detail.get("cache", 0)))
    return max(0, int(mem["usage"]) - int(cache))


def mig_profiles(inventory: Inventory | None) -> list[str] | None:
    """The MIG slice profiles this machine offers (what a guided prompt may suggest), None
    when the inventory is unknown here."""
    if inventory is None:
        return None
    return sorted({slot.profile for slot in inventory.slots if slot.profile})


def gpu_stats(inventory: Inventory | None, slot_id: str) -> dict[str, Any]:
    """One GPU slot of a container: its utilisation and memory in use now, and its size (the
    limit), as the inventory knows them (NVML, or SIMULATED, which it says)."""
    if inventory is None or not inventory.has_slot(slot_id):
        return {
            "slot": slot_id,
            "utilization_percent": None,
            "memory_used_mb": None,
            "memory_mb": None,
            "simulated": None,
        }
    slot = inventory.slot(slot_id)
    return {
        "slot": slot_id,
        "utilization_percent": inventory.utilization(slot_id),
        "memory_used_mb": inventory.memory_used_mb(slot_id),
        "memory_mb": slot.memory_mb,
        "simulated": slot.simulated,
    }


#: A cleanup result for a container that was removed before cleanup came to it.
_GONE = {"removed": True, "already_gone": True}


def _running(attrs: Mapping[str, Any]) -> bool:
    return bool((attrs.get("State") or {}).get("Running"))


def _needs_times(summary: Mapping[str, Any]) -> bool:
    """Whether a container's list entry lacks a time the user is shown: the start of a
    running one (uptime), the stop of a stopped one that holds GPUs (held until)."""
    if summary.get("State") in labels.RUNNING_STATES:
        return True
    gpus = labels.labels_of(summary).get(labels.GPUS)
    return summary.get("State") != "created" and bool(gpus)


@dataclass
class OperationsContext:
    """What the hub side hands every user's operations: the hub client (a service token), a
    docker-py client, the deployment's label key (which containers are ours), a resolver for
    limits and the GPU inventory (None where unavailable)."""

    hub: HubClient
    docker: docker.DockerClient
    trust: Provenance
    limits_for: Callable[[str, Iterable[str]], ResolvedLimits] | None = None
    inventory: Inventory | None = None  # slot sizes and live utilisation
    auto_create_users: bool = True
    clock: Callable[[], datetime] = utcnow
    spawn_timeout: float = 900.0
    inspect_workers: int = 8
    docker_url: str = "unix:///var/run/docker.sock"  # where `docker` talks to (for messages)
    #: The user's queued spawn requests (`ds01hub.gpu.queued.QueuedStore.of_user`), if known.
    queued_for: Callable[[str], list[Any]] | None = None
    #: Where the containers are (`ds01hub.actions.engines`): None = the one engine `docker`;
    #: `SwarmContainers` for a swarm (the manager's services, the nodes' engines).
    containers: LocalContainers | SwarmContainers | None = None

    @property
    def engine(self) -> LocalContainers | SwarmContainers:
        if self.containers is None:
            self.containers = LocalContainers(self.docker, self.docker_url)
        return self.containers


class UserOperations:
    """Everything one user may do to their own containers."""

    def __init__(self, ctx: OperationsContext, user: str):
        self.ctx = ctx
        self.user = user

    # ---- reading -------------------------------------------------------------------------

    async def _hub_user(self) -> dict[str, Any]:
        model = await self._hub(self.ctx.hub.get_user(self.user))
        if model is None:
            if not self.ctx.auto_create_users:
                raise OperationError(
                    f"user {self.user!r} is not known to the hub",
                    hint="log in to JupyterHub once in a browser, or ask an admin to add you",
                    status=403,
                )
            await self._hub(self.ctx.hub.create_user(self.user))
            model = await self._hub(self.ctx.hub.get_user(self.user)) or {}
        return model

    async def _hub(self, awaitable):
        try:
            return await awaitable
        except HubError as e:
            raise hub_failure(e) from None

    def _summaries(self, project: str | None = None) -> list[dict[str, Any]]:
        """List entries of this user's managed containers (optionally one project's), only
        those whose labels this deployment signed. One call to Docker: an entry carries the
        labels, the state and Docker's status line, but no start or stop time."""
        wanted = self.ctx.trust.label_filters([f"{labels.USER}={self.user}"])
        if project is not None:
            wanted.append(f"{labels.PROJECT}={project}")
        found = []
        for summary in self.ctx.engine.summaries(wanted):
            # the label filter only pre-selects: a label set that anyone can copy into an
            # image proves nothing until its signature verifies for this very container
            record = labels.ContainerRecord.from_docker(summary, self.ctx.trust)
            if record is not None and record.user == self.user:
                found.append(summary)
        return found

    def _containers(self, project: str | None = None) -> list[dict[str, Any]]:
        """Inspect data of this user's managed containers (optionally one project's), only
        those whose labels this deployment signed."""
        return self._inspect_all([summary["Id"] for summary in self._summaries(project)])

    def _inspect_all(self, ids: list[str]) -> list[dict[str, Any]]:
        """Inspect data of each id, a few at a time; containers removed meanwhile are left
        out."""
        if len(ids) <= 1 or self.ctx.inspect_workers <= 1:
            inspected = [self._inspect(i) for i in ids]
        else:
            workers = min(self.ctx.inspect_workers, len(ids))
            with ThreadPoolExecutor(workers, thread_name_prefix="ds01-inspect") as pool:
                inspected = list(pool.map(self._inspect, ids))
        return [attrs for attrs in inspected if attrs is not None]

    def _listed(self) -> list[tuple[dict[str, Any], str | None]]:
        """What `list_containers` shows, per container: (document, Docker's status line). The
        list entry says enough for most; only running containers (for their uptime) and
        stopped ones with GPU labels (for how long they still hold them, as the allocator
        reads it) are inspected, so a user with 200 stopped containers costs one list call,
        not 200 inspects."""
        summaries = self._summaries()
        wanted = [s["Id"] for s in summaries if _needs_times(s)]
        detailed = {attrs["Id"]: attrs for attrs in self._inspect_all(wanted)}
        listed = []
        for summary in summaries:
            if summary["Id"] in wanted and summary["Id"] not in detailed:
                continue  # removed since it was listed
            listed.append((detailed.get(summary["Id"], summary), summary.get("Status")))
        return listed

    def _inspect(self, container_id: str) -> dict[str, Any] | None:
        """Inspect data, or None when the container is gone (removed since it was listed)."""
        try:
            return self.ctx.engine.inspect(container_id)
        except Exception as e:
            if not is_gone(e):
                raise
            return None

    def _hold_after_stop(self, groups: Iterable[str]) -> float | None:
        try:
            limits = self.limits(groups)
        except Ds01hubError:  # the listing still works; quota and starts say what is wrong
            return None
        return getattr(limits, "gpu_hold_after_stop", None) if limits else None

    def limits(self, groups: Iterable[str] = ()) -> Any:
        """The user's effective limits (None without a resolver). A bad property of one of
        their hub groups is an OperationError naming it; an unbelievable hub-groups snapshot
        its SnapshotError: never the looser file-only limits."""
        if not self.ctx.limits_for:
            return None
        try:
            return self.ctx.limits_for(self.user, tuple(groups))
        except LimitsError as error:
            raise OperationError(
                f"{error.summary()} (a JupyterHub group of yours): " + "; ".join(error.lines()),
                hint="an admin fixes the group's properties (hub admin panel: Groups)",
                status=409,
            ) from None

    async def list_containers(self, include_stopped: bool = True) -> list[dict[str, Any]]:
        """This user's containers (and servers still spawning), sorted by project."""
        model, containers = await asyncio.gather(self._hub_user(), asyncio.to_thread(self._listed))
        servers = model.get("servers") or {}
        hold = self._hold_after_stop(model.get("groups") or ())
        now = self.ctx.clock()
        views = {}
        for attrs, status in containers:
            project = _record_of(attrs).project
            server = servers.get(project_to_server(project))
            views[project] = container_view(attrs, server, project, now, hold, status)
        for name, server in servers.items():
            project = server_to_project(name)
            if project not in views and server.get("pending"):
                views[project] = container_view(None, server, project, now, hold)
        queued = self.ctx.queued_for(self.user) if self.ctx.queued_for else []
        for request in queued:
            project = server_to_project(request.server)
            if views.get(project, {}).get("state") in (None, "stopped"):
                views[project] = {**views.get(project, {}), **queued_view(request, project)}
        rows = [views[p] for p in sorted(views)]
        if not include_stopped:
            rows = [r for r in rows if r["state"] != "stopped"]
        return rows

    async def describe(self, project: str) -> dict[str, Any]:
        """One container's view plus its process count (what `container-stop` shows first)."""
        view = await self._current_view(project)
        if view is None:
            raise self._no_such(project)
        return await self._with_processes(project, view)

    async def _with_processes(self, project: str, view: dict[str, Any]) -> dict[str, Any]:
        view["processes"] = None
        if view["state"] == "running":
            attrs = await self._owned(project)
            view["processes"] = await asyncio.to_thread(self._process_count, attrs["Id"])
        return view

    async def _current_view(self, project: str) -> dict[str, Any] | None:
        validate_name(project)
        rows = [r for r in await self.list_containers() if r["project"] == project]
        return rows[0] if rows else None

    def _process_count(self, container_id: str) -> int | None:
        try:
            top = self.ctx.engine.top(container_id)
        except Exception:
            return None
        return len(top.get("Processes") or [])

    async def _owned(self, project: str) -> dict[str, Any]:
        """The inspect data of this user's container for `project`, or a 404 error."""
        validate_name(project)
        found = await asyncio.to_thread(self._containers, project)
        if not found:
            raise self._no_such(project)
        return found[0]

    def _no_such(self, project: str) -> OperationError:
        return OperationError(
            f"you have no container named {project!r}",
            hint="see your containers with `container-list --all`; "
            f"create one with `container-create {project}`",
            status=404,
        )

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(
        self, project: str, options: Mapping[str, Any] | None = None, create: bool = False
    ) -> AsyncIterator[dict[str, Any]]:
        """Start (or with `create`, create) a container through the hub; yields progress events
        `{"event": "progress", ...}` and finally `{"event": "ready", "container": view}`."""
        validate_name(project)
        spawn = spawn_options(options or {})
        model = await self._hub_user()
        server_name = project_to_server(project)
        server = (model.get("servers") or {}).get(server_name)
        found = await asyncio.to_thread(self._containers, project)
        exists = bool(found) or bool(server and (server.get("pending") or server.get("ready")))
        if create and exists:
            raise OperationError(
                f"you already have a container named {project!r}",
                hint=f"start it with `container-start {project}`, or pick another name",
                status=409,
            )
        if not create and not exists:
            raise self._no_such(project)
        if server and server.get("ready") and any(_running(a) for a in found):
            yield {"event": "ready", "container": await self.describe(project)}
            return
        # not running, whatever the hub's record says (a container stopped behind the hub's
        # back is still "ready" to the hub until it polls): ask the hub, which polls first
        pending = bool(server and server.get("pending") == "spawn")
        if not pending:
            message = f"asking the hub to start {project}"
            yield {"event": "progress", "progress": 0, "message": message}
            pending = await self._ask_to_start(project, server_name, spawn) == 202
        if pending:
            async for event in self._progress(project, server_name):
                yield event
                if event["event"] == "queued":
                    return  # left in the GPU queue: the hub starts it when a GPU is granted
        yield {"event": "ready", "container": await self._started(project)}

    async def _ask_to_start(
        self, project: str, server_name: str, spawn: dict[str, Any] | None
    ) -> int:
        try:
            return await self.ctx.hub.start_server(self.user, server_name, spawn)
        except HubError as e:
            if e.status == 400 and "already running" in e.message:
                return 201  # it came up meanwhile: what runs is checked next
            raise hub_failure(e, f"could not start {project!r}") from None

    async def _started(self, project: str) -> dict[str, Any]:
        """The view of a container the hub says it started -- if it really runs; else the
        start failed, with what Docker recorded (never "running" for what is not)."""
        view = await self._current_view(project)
        if view is not None and view["state"] == "running":
            return await self._with_processes(project, view)
        found = await asyncio.to_thread(self._containers, project)
        docker_state = (found[0].get("State") or {}) if found else {}
        raise start_failure(project, view["state"] if view else "gone", docker_state)

    async def _progress(self, project: str, server_name: str) -> AsyncIterator[dict[str, Any]]:
        try:
            async for event in self.ctx.hub.progress(
                self.user, server_name, timeout=self.ctx.spawn_timeout
            ):
                if event.get("failed"):
                    message = str(event.get("message") or "spawn failed")
                    queued = QUEUED_SPAWN.match(message)
                    if queued:  # the `queue` option: not a failure, a request that waits
                        yield {"event": "queued", "project": project, "message": queued[1]}
                        return
                    raise OperationError(
                        f"could not start {project!r}: {message}",
                        hint="see your limits and use with `container-stats`; stopped "
                        "containers keep their GPUs for a while: `container-list --all`",
                        status=409,
                    )
                if event.get("ready"):
                    return
                progress = {
                    "event": "progress",
                    "progress": event.get("progress"),
                    "message": event.get("message", ""),
                }
                said = Message.from_event(event)  # checked: the hub's event, passed on
                if said is not None:
                    progress[EVENT_KEY] = said.to_dict()
                yield progress
        except HubError as e:
            raise hub_failure(e, f"could not follow the start of {project!r}") from None

    async def stop(
        self, project: str, timeout: float | None = None, force: bool = False
    ) -> dict[str, Any]:
        """Stop a container. With `timeout`/`force` Docker stops (or kills) it first, so the
        user's choice applies; the hub is always told, so its records and the GPU hold follow.
        A start still pending (e.g. queued for a GPU, no container yet) is cancelled."""
        validate_name(project)
        found = await asyncio.to_thread(self._containers, project)
        if not found:
            return await self._cancel_pending(project)
        attrs = found[0]
        container_id = attrs["Id"]
        if force:
            await asyncio.to_thread(self._docker_call, "kill", container_id)
        elif timeout is not None:
            await asyncio.to_thread(self._docker_call, "stop", container_id, timeout=int(timeout))
        model = await self._hub_user()
        server_name = project_to_server(project)
        server = (model.get("servers") or {}).get(server_name)
        if server and (server.get("ready") or server.get("pending")):
            await self._hub(self.ctx.hub.stop_server(self.user, server_name))
        elif _running(attrs) and not force and timeout is None:
            # running but unknown to the hub (e.g. the hub's database was reset): stop directly
            await asyncio.to_thread(self._docker_call, "stop", container_id)
        state = await self._wait_stopped(container_id, 60.0 + (timeout or 0))
        if state is not None and state.get("Running"):
            raise OperationError(
                f"{project!r} is still running: it did not stop in time",
                hint=f"kill it with `container-stop {project} --force`",
                status=409,
            )
        view = await self._current_view(project) if state is not None else None
        if view is None:  # removed on stop (the hub's DockerSpawner.remove) or meanwhile
            return self._gone_view(project, attrs)
        return await self._with_processes(project, view)

    def _gone_view(self, project: str, attrs: Mapping[str, Any]) -> dict[str, Any]:
        """What is left of a container that was removed: its name, nothing held."""
        view = container_view(None, None, project, self.ctx.clock(), None)
        view.update(container=attrs["Name"].lstrip("/"), removed=True, processes=None)
        return view

    async def _cancel_pending(self, project: str) -> dict[str, Any]:
        server_name = project_to_server(project)
        server = ((await self._hub_user()).get("servers") or {}).get(server_name)
        if not (server and server.get("pending") == "spawn"):
            raise self._no_such(project)
        await self._hub(self.ctx.hub.stop_server(self.user, server_name))
        return {"project": project, "state": "stopped", "cancelled": True, "held_until": None}

    def _docker_call(self, action: str, container_id: str, **kwargs: Any) -> bool:
        """`kill`, `stop` or `remove` on one of the user's containers; False when it is gone
        already (404), and a kill of one that is not running (409) is no failure."""
        try:
            getattr(self.ctx.engine, action)(container_id, **kwargs)
        except Exception as e:
            if is_gone(e):
                return False
            if not (action == "kill" and getattr(e, "status_code", None) == 409):
                raise
        return True

    async def _wait_stopped(self, container_id: str, timeout: float) -> dict[str, Any] | None:
        """The container's State once it no longer runs (or at the deadline); None: gone."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            attrs = await asyncio.to_thread(self._inspect, container_id)
            state = (attrs or {}).get("State") if attrs else None
            if state is None or not state.get("Running"):
                return state
            if asyncio.get_running_loop().time() >= deadline:
                return state
            await asyncio.sleep(0.5)

    async def remove(self, project: str, force: bool = False) -> dict[str, Any]:
        """Remove a container (its GPUs are released with it). A running one needs `force`.
        One removed meanwhile (by the hub, on stop) is `already_gone`: done, not an error."""
        return await self._remove(project, await self._owned(project), force)

    async def _remove(self, project: str, attrs: Mapping[str, Any], force: bool) -> dict[str, Any]:
        removed_by_stop = False
        if _running(attrs):
            if not force:
                raise OperationError(
                    f"{project!r} is running",
                    hint=f"stop it first with `container-stop {project}`, or pass --force",
                    status=409,
                )
            removed_by_stop = bool((await self.stop(project)).get("removed"))
        server_name = project_to_server(project)
        model = await self._hub_user()
        if server_name and server_name in (model.get("servers") or {}):
            await self._hub(self.ctx.hub.delete_server(self.user, server_name))
        removed_here = await asyncio.to_thread(self._docker_call, "remove", attrs["Id"])
        return {
            "project": project,
            "container": attrs["Name"].lstrip("/"),
            "removed": True,
            "already_gone": not (removed_here or removed_by_stop),
        }

    async def cleanup(self, include_running: bool = False) -> list[dict[str, Any]]:
        """Remove stopped containers (with `include_running`, stop and remove all of them).
        Each container gets its own result: one that fails (`removed` false, `error`, `hint`)
        does not hide the others, done before or after it."""
        results = []
        for row in await self.list_containers():
            if row["id"] is None or not (row["state"] == "stopped" or include_running):
                continue  # not asked for, or still spawning (no container to remove yet)
            project = row["project"]
            try:
                found = await asyncio.to_thread(self._containers, project)
                if not found:
                    results.append({**_GONE, "project": project, "container": row["container"]})
                    continue
                results.append(await self._remove(project, found[0], force=include_running))
            except Exception as e:
                error = named_error(e, self.ctx.docker_url)
                if error is None:
                    raise
                results.append(
                    {
                        "project": project,
                        "container": row["container"],
                        "removed": False,
                        "error": error.message,
                        "hint": error.hint,
                    }
                )
        return results

    # ---- inside containers ---------------------------------------------------------------

    async def exec_create(
        self, project: str, command: list[str] | None, tty: bool, env: Mapping[str, str]
    ) -> dict[str, Any]:
        """Create an exec in the user's running container, as the container's user."""
        attrs = await self._owned(project)
        if not _running(attrs):
            raise OperationError(
                f"{project!r} is not running",
                hint=f"start it with `container-start {project}`",
                status=409,
            )
        config = attrs.get("Config") or {}
        shell = command or LOGIN_SHELL
        exec_id = await asyncio.to_thread(
            self.ctx.engine.exec_create,
            attrs["Id"],
            shell,
            stdin=True,
            tty=tty,
            user=config.get("User") or "",
            environment={k: v for k, v in env.items() if k in ("TERM", "LANG", "COLORTERM")},
            workdir=config.get("WorkingDir") or None,
        )
        return {"exec_id": exec_id, "container_id": attrs["Id"]}

    async def record_activity(self, project: str) -> None:
        """A shell in the container is in use: keep the idle culler off it (best effort)."""
        when = isoformat(self.ctx.clock()) or ""
        # the hub may not know the server (started outside it): then there is nothing to keep
        with contextlib.suppress(HubError):
            await self.ctx.hub.record_activity(self.user, project_to_server(project), when)

    async def owns_exec(self, exec_id: str) -> dict[str, Any]:
        """The exec's inspect data if it runs in one of this user's containers, else 404."""
        try:
            info = await asyncio.to_thread(self.ctx.engine.exec_inspect, exec_id)
        except Exception:
            info = None
        owned = {a["Id"] for a in await asyncio.to_thread(self._containers)}
        if not info or info.get("ContainerID") not in owned:
            raise OperationError("no such exec session", status=404)
        return info

    # ---- usage ---------------------------------------------------------------------------

    async def stats(self) -> list[dict[str, Any]]:
        """CPU, memory and GPU use of each running container against its limits."""
        containers = [a for a in await asyncio.to_thread(self._containers) if _running(a)]
        samples = await asyncio.gather(
            *(asyncio.to_thread(self._sample, a["Id"]) for a in containers)
        )
        rows = []
        for attrs, sample in zip(containers, samples, strict=True):
            if sample is None:  # removed since it was listed
                continue
            record = _record_of(attrs)
            host = attrs.get("HostConfig") or {}
            rows.append(
                {
                    "project": record.project,
                    "container": record.name,
                    "cpu_percent": cpu_percent(sample),
                    "cpu_limit_percent": (host.get("NanoCpus") or 0) / 1e7 or None,
                    "memory_bytes": memory_used(sample),
                    "memory_limit_bytes": host.get("Memory") or None,
                    "pids": (sample.get("pids_stats") or {}).get("current"),
                    "pids_limit": host.get("PidsLimit") or None,
                    "gpus": [gpu_stats(self.ctx.inventory, slot) for slot in record.gpus],
                }
            )
        return rows

    def _sample(self, container_id: str) -> dict[str, Any] | None:
        """One `docker stats` sample, or None when the container is gone."""
        try:
            return self.ctx.engine.stats(container_id)
        except Exception as e:
            if is_gone(e):
                return None
            raise

    async def quota(self) -> dict[str, Any]:
        """The user's limits and how much of them is in use now."""
        model = await self._hub_user()
        rows = await self.list_containers()
        limits = self.limits(model.get("groups") or ())
        held = [slot for r in rows if not r["gpus_released"] for slot in r["gpus"]]
        keys = (
            "group",
            "max_gpus",
            "max_gpus_per_container",
            "max_cpus",
            "memory",
            "max_containers_per_user",
            "idle_timeout",
            "gpu_hold_after_stop",
            "allowed_images",
        )
        return {
            "user": self.user,
            "groups": model.get("groups") or [],
            "limits": {k: getattr(limits, k, None) for k in keys} if limits else None,
            "sources": {k: limits.sources.get(k) for k in keys} if limits else {},
            "notices": limits.notices() if limits else [],
            "containers": len(rows),
            "running": sum(1 for r in rows if r["state"] != "stopped"),
            "gpus_held": len(held),
            "gpus": [{"slot": slot, "name": self._slot_name(slot)} for slot in held],
            "mig_profiles": mig_profiles(self.ctx.inventory),
        }

    def _slot_name(self, slot_id: str) -> str:
        """'NVIDIA A100 80GB', '... (SIMULATED)'; 'GPU' for a slot this machine no longer has."""
        inventory = self.ctx.inventory
        if inventory is None or not inventory.has_slot(slot_id):
            return "GPU"
        slot = inventory.slot(slot_id)
        return slot.name + (" (SIMULATED)" if slot.simulated else "")
