"""The Docker socket filter proxy: a unix socket in front of the engine that lets each user see
and act on their own containers only.

This is the socket edge. It identifies every client by SO_PEERCRED (uid -> user), parses each
HTTP/1.1 request with llhttp (`httptools`: Node.js's strict parser), asks
`ds01hub.dockerproxy.policy` what it must look up, looks it up on the upstream engine and the file
system, and forwards the request the policy returned. Decisions are per request, not per
connection: a keep-alive connection is parsed and checked again for every request.

Nothing the client wrote in a request head is ever forwarded as bytes. Each upstream request is
rebuilt from the parsed method, the canonical target (`proxy_policy.Target.render`) and an
allow-list of headers with checked values (`FORWARDED_HEADERS`), with framing of our own:
bodies are re-framed (a length we counted, or chunks we wrote). Heads with control characters,
bare CR or LF, obs-fold, duplicate or conflicting framing headers or transfer codings other
than ``chunked`` are refused with 400 and the connection closed. The engine's Go server ends a
header line at a bare LF; forwarding a client's header line as written once let a second,
unchecked request hide in a header value.

Each request gets its own upstream connection, sent with ``Connection: close``: the engine's
answer then ends where its stream ends, so it is relayed as it arrives without re-framing it
(the engine is trusted; its head is still parsed by llhttp). ``101 Switching Protocols``
(``docker attach``, ``docker exec -it``: ``Upgrade: tcp``) becomes a two-way splice. Endless
answers (``logs -f``, ``events``) stop as soon as the client hangs up.

Denial of service: a request head must arrive within ``--header-timeout`` seconds (an idle
kept-alive connection too), a body must not stall for longer, and each uid may hold at most
``--max-connections-per-user`` connections (the next get 429 with a message the CLI prints).
Streams being answered (``logs -f``, ``events``, ``attach``) are not timed out; they count
toward the cap.

Run it as root (``ds01hub proxy``): it needs the engine's socket, reads other users' /proc to
tell host processes from containerised ones, resolves bind paths as the engine would, and reads
the hub's label key and deployment id from ``--hub-state-dir`` (the hub's state directory): it signs
the containers users create and believes only signed ownership labels (`ds01hub.provenance`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import functools
import grp
import json
import logging
import os
import resource
import secrets
import signal
import stat
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import docker

from ds01hub import paths, peer, provenance
from ds01hub.aggregate import ContainerUse
from ds01hub.dockerproxy import policy
from ds01hub.dockerproxy.http import (
    MAX_HEAD,
    REASONS,
    ClientStream,
    HttpError,
    Message,
    Request,
    RequestBody,
    Stream,
    describe_headers,
    read_response_body,
    read_response_head,
    relay_until_eof,
    render_head,
    response_framing,
    splice,
    unless_client_leaves,
    upstream_headers,
)
from ds01hub.dockerproxy.policy import (
    ContainerFacts,
    Denied,
    ImageFacts,
    Invisible,
    Kind,
    PathFacts,
    Target,
    VolumeFacts,
)
from ds01hub.gpu.allocator import Owner
from ds01hub.host.aggregate_gate import (
    AggregateRefused,
    UserLockTimeout,
    counted_uses,
    start_within_caps,
    user_records,
)
from ds01hub.host.cgroups import CgroupError, ensure_parent
from ds01hub.hub.group_snapshot import SnapshotError, SnapshotReader
from ds01hub.labels import escape_name
from ds01hub.limits import LimitsError, LimitsStore
from ds01hub.peer import Caller
from ds01hub.provenance import Provenance

log = logging.getLogger("ds01hub.dockerproxy.server")

EXEC_CACHE_SIZE = 4096
HEADER_TIMEOUT = 30.0  # default --header-timeout
MAX_CONNECTIONS_PER_USER = 64  # default --max-connections-per-user
OVER_CAP_HEAD_SECONDS = 2.0  # how long a connection over the cap may take to send its head
# Content types a user's request may carry. Go's ParseForm merges an urlencoded *body* into
# the query parameters the engine reads (body first), which would bypass every query check.
USER_CONTENT_TYPES = (
    "",
    "application/json",
    "application/x-tar",
    "text/plain",
    "application/octet-stream",
)
# the images the platform itself provides (ds01hub.host.bootstrap's aliases)
DEFAULT_SHARED_IMAGES = ("ds01hub/base:latest", "ds01hub/singleuser:latest")


# --------------------------------------------------------------------------------------------
# The upstream engine


@dataclass(frozen=True)
class Fetched:
    """A whole upstream response to a look-up."""

    status: int
    head: Message
    body: bytes

    def json(self) -> object:
        return json.loads(self.body) if self.status == 200 and self.body else None

    def with_body(self, body: bytes) -> Fetched:
        return Fetched(self.status, self.head, body)

    def as_response(self) -> bytes:
        """The same response for a client (own framing; the client's connection stays open)."""
        bodiless = self.status in (204, 304) or 100 <= self.status < 200
        add = [] if bodiless else [("Content-Length", str(len(self.body)))]
        return self.head.render(("Content-Length", "Transfer-Encoding", "Connection"), add) + (
            b"" if bodiless else self.body
        )


def redacted(fetched: Fetched) -> Fetched:
    """An engine error without the full id of a conflicting container (it may be another
    user's: `policy.redact_conflict`)."""
    if fetched.status != 409:
        return fetched
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        message = json.loads(fetched.body)["message"]
        body = json.dumps({"message": policy.redact_conflict(message)}).encode() + b"\n"
        return fetched.with_body(body)
    return fetched


@dataclass
class Upstream:
    """The real engine's socket: a fresh connection per request, plus JSON look-ups. `trust`
    (the deployment's label key) decides whose a looked-up container is."""

    path: str
    trust: Provenance | None = None

    async def connect(self) -> Stream:
        try:
            reader, writer = await asyncio.open_unix_connection(self.path, limit=MAX_HEAD)
        except OSError as error:
            raise Denied(502, f"the Docker engine at {self.path} is unreachable: {error}") from None
        return Stream(reader, writer)

    async def fetch(self, path: str) -> Fetched:
        """One GET (Connection: close) for a policy fact."""
        return await self.request("GET", path)

    async def request(self, method: str, path: str, body: bytes | None = None) -> Fetched:
        """One whole request/response with the engine (Connection: close), for requests the
        proxy answers from what the engine said (create, rename, stand-ins for hidden objects).
        """
        stream = await self.connect()
        try:
            head = f"{method} {path} HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n"
            if body is not None:
                head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            await stream.write(head.encode() + b"\r\n" + (body or b""))
            response, parser = await read_response_head(stream)
            data = await read_response_body(stream, parser, 64 * 1024 * 1024)
            return Fetched(int(response.start[1]), response, data)
        finally:
            stream.close()

    async def get_json(self, path: str) -> tuple[int, object]:
        fetched = await self.fetch(path)
        return fetched.status, fetched.json()

    async def container(self, ref: str, version: str | None = None) -> ContainerFacts | None:
        return (await self.inspect(ref, version))[0]

    async def inspect(
        self, ref: str, version: str | None = None
    ) -> tuple[ContainerFacts | None, Fetched]:
        """Resolve `ref` exactly as the engine does (exact id, exact name, unique id prefix)."""
        prefix = f"/v{version}" if version else ""
        fetched = await self.fetch(f"{prefix}/containers/{quote(ref, safe='')}/json")
        if fetched.status in (404, 500):  # missing, or an ambiguous id prefix
            return None, fetched
        data = fetched.json()
        if fetched.status != 200 or not isinstance(data, dict):
            raise Denied(502, f"upstream answered {fetched.status} looking up container {ref}")
        return ContainerFacts.from_inspect(data, self.trust), fetched

    async def own_containers(self, user: str) -> list[dict[str, Any]]:
        """The user's containers (list entries), all states."""
        if self.trust is None:
            return []  # without the label key nothing is anyone's
        filters = quote(policy.owner_filters(None, user, self.trust), safe="")
        status, data = await self.get_json(f"/containers/json?all=1&filters={filters}")
        if status != 200 or not isinstance(data, list):
            raise Denied(502, f"upstream answered {status} listing containers")
        return policy.filter_owned_containers(data, user, self.trust)

    async def image(
        self, ref: str, version: str | None = None
    ) -> tuple[ImageFacts | None, Fetched]:
        """Resolve an image reference exactly as the engine does (name, id, id prefix)."""
        prefix = f"/v{version}" if version else ""
        fetched = await self.fetch(f"{prefix}/images/{quote(ref, safe='/:@')}/json")
        data = fetched.json()
        if fetched.status != 200 or not isinstance(data, dict):
            return None, fetched
        return ImageFacts.from_inspect(data), fetched

    async def images(self) -> list[dict[str, Any]]:
        status, data = await self.get_json("/images/json")
        if status != 200 or not isinstance(data, list):
            raise Denied(502, f"upstream answered {status} listing images")
        return data

    async def volume(self, name: str) -> VolumeFacts | None:
        status, data = await self.get_json(f"/volumes/{quote(name, safe='')}")
        if status != 200 or not isinstance(data, dict):
            return None
        return VolumeFacts.from_inspect(data)

    async def exec_container(self, exec_id: str) -> tuple[str, str] | None:
        """(exec id, container id) of an exec instance, or None when there is none."""
        status, data = await self.get_json(f"/exec/{quote(exec_id, safe='')}/json")
        if status == 404:
            return None
        if status != 200 or not isinstance(data, dict):
            raise Denied(502, f"upstream answered {status} looking up exec {exec_id}")
        return data["ID"], data["ContainerID"]

    async def count_containers(self, user: str) -> int:
        return len(await self.own_containers(user))


@dataclass
class SharedImages:
    """The ids of the images admins share (``--shared-image REF``), re-resolved every `ttl`
    seconds so a rebuilt shared tag is followed; plus, per caller, the images their limits'
    ``allowed_images`` patterns name (matched against the engine's tags, cached alike)."""

    upstream: Upstream
    refs: tuple[str, ...] = ()
    ttl: float = 30.0
    ids: frozenset[str] = frozenset()
    listing: list[dict[str, Any]] = field(default_factory=list)
    resolved_at: float = float("-inf")
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def refresh(self) -> None:
        async with self.lock:
            if time.monotonic() - self.resolved_at < self.ttl:
                return
            ids = set()
            for ref in self.refs:
                image, _ = await self.upstream.image(ref)
                if image is None:
                    log.warning("shared image %s is not on this host (yet)", ref)
                else:
                    ids.add(image.id)
            self.listing = await self.upstream.images()
            self.ids, self.resolved_at = frozenset(ids), time.monotonic()

    async def for_caller(self, patterns: Iterable[str] | None) -> frozenset[str]:
        if time.monotonic() - self.resolved_at >= self.ttl:
            await self.refresh()
        if not patterns:
            return self.ids
        return self.ids | policy.shared_by_pattern(self.listing, patterns)


def path_facts(path: str) -> PathFacts:
    """Resolve a host path the way the engine will (symlinks followed) and note sockets.

    The engine resolves the path again when it mounts, so a user who swaps a directory in their
    home for a symlink in between could still win a race; forwarding the resolved path narrows
    that to the components above it, which are the user's own directories.
    """
    real = os.path.realpath(path)
    try:
        is_socket = stat.S_ISSOCK(os.stat(real).st_mode)
    except OSError:
        is_socket = False
    return PathFacts(real, is_socket)


# --------------------------------------------------------------------------------------------
# The proxy


@dataclass
class Plan:
    """What to send upstream for one request, and how to treat the response."""

    target: str
    body: bytes | None  # None: stream the client's body through with its own framing
    filter_user: str | None = None  # GET /containers/json: keep only this user's containers
    learn_exec: tuple[str, str] | None = None  # exec create: (container id, owner) to remember
    answer: bytes | None = None  # a complete response already in hand (inspect = the look-up)


@dataclass
class Proxy:
    upstream: Upstream
    admins: peer.AdminRule = field(default_factory=peer.AdminRule)
    settings: policy.Settings = field(default_factory=policy.Settings)
    limits_for: Callable[[Caller], policy.UserLimits | None] = lambda caller: None
    shared: SharedImages | None = None  # None: only the --shared-image default of run()
    state_dir: Path | None = None  # where the per-user create locks live (flock)
    # the hub's state directory: the per-user aggregate locks every door takes (None: the
    # host's, ds01hub.paths.state_dir())
    hub_state_dir: Path | None = None
    create_locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    # asyncio's stream protocol forgets its task when the peer disconnects; keep them alive
    tasks: set[asyncio.Task] = field(default_factory=set)
    # exec id -> (container id, owner): immutable facts, so exec start/inspect/resize need no
    # look-ups once an exec is known (learned from exec create answers and from look-ups)
    exec_owners: dict[str, tuple[str, str]] = field(default_factory=dict)
    header_timeout: float = HEADER_TIMEOUT  # seconds for a request head (and a body's pauses)
    max_connections_per_user: int = MAX_CONNECTIONS_PER_USER
    open_connections: dict[int, int] = field(default_factory=dict)  # uid -> connections now

    @functools.cached_property
    def engine(self) -> docker.APIClient:
        """docker-py on the upstream socket, for the aggregate gate's reads (the same code the
        hub's spawner counts a user's containers with)."""
        return docker.APIClient(base_url=f"unix://{self.upstream.path}", version="auto")

    def counted(self, user: str, exclude: str) -> list[ContainerUse]:
        """The limits of `user`'s containers that count against their aggregate caps (hub,
        CLI and proxy ones alike: Docker's state by the signed owner label), but `exclude`."""
        records = user_records(self.engine, self.settings.signer(), user)
        return counted_uses(self.engine, records, exclude)

    def remember_exec(self, exec_id: str, container_id: str, owner: str) -> None:
        if len(self.exec_owners) >= EXEC_CACHE_SIZE:
            del self.exec_owners[next(iter(self.exec_owners))]
        self.exec_owners[exec_id] = (container_id, owner)

    async def limits(self, caller: Caller) -> policy.UserLimits | None:
        """The caller's limits (the file may be re-read: off the event loop)."""
        return await asyncio.to_thread(self.limits_for, caller)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One client connection: who it is, whether it fits under the cap, then its requests."""
        client = ClientStream(reader, writer)
        task = asyncio.current_task()
        if task:
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        uid: int | None = None
        try:
            creds = peer.credentials(writer.get_extra_info("socket"))
            uid = creds.uid
            already = self.open_connections.get(uid, 0)
            self.open_connections[uid] = already + 1
            if already >= 2 * self.max_connections_per_user:
                return  # far over the cap: not even a head is waited for (descriptors)
            # the password/group database may be LDAP: never block the loop on it
            try:
                caller: Caller | peer.IdentityError = await asyncio.to_thread(
                    peer.identify, creds, self.admins
                )
            except peer.IdentityError as refused:
                caller = refused
            if already >= self.max_connections_per_user:
                await self.refuse_over_cap(client, caller, uid, already)
            else:
                await self.serve_connection(client, caller, uid)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("proxy connection failed")
        finally:
            if uid is not None:
                self.open_connections[uid] -= 1
                if not self.open_connections[uid]:
                    del self.open_connections[uid]
            client.close()

    async def serve_connection(
        self, client: ClientStream, caller: Caller | peer.IdentityError, uid: int
    ) -> None:
        """Serve requests on one connection from `caller` (or refuse them all: its identity)."""
        while await self.serve_one(client, caller, uid):
            pass

    async def refuse_over_cap(
        self, client: ClientStream, caller: Caller | peer.IdentityError, uid: int, already: int
    ) -> None:
        """429 for a connection over the cap, once its head is in (so the CLI reads it).

        A client that connects sends its head at once; one that does not is closed after
        OVER_CAP_HEAD_SECONDS, so connections over the cap never pile up.
        """
        who = caller.user if isinstance(caller, Caller) else f"uid {uid}"
        limit = self.max_connections_per_user
        wait = min(self.header_timeout, OVER_CAP_HEAD_SECONDS)
        deadline = asyncio.get_running_loop().time() + wait
        with contextlib.suppress(HttpError):
            request = await client.next_request(deadline)
            if request is not None:
                message = (
                    f"too many connections to the ds01 docker proxy: {who} already has "
                    f"{already} open (the limit is {limit} per user). Close docker sessions "
                    "you no longer need (logs -f, attach, events, exec) and try again, or ask "
                    "an admin to raise --max-connections-per-user"
                )
                await refuse(client, who, *request.start[:2], Denied(429, message))

    async def serve_one(
        self, client: ClientStream, caller: Caller | peer.IdentityError, uid: int
    ) -> bool:
        """Serve one request; True to keep the connection for the next."""
        who = caller.user if isinstance(caller, Caller) else f"uid {uid}"
        deadline = asyncio.get_running_loop().time() + self.header_timeout
        try:
            request = await client.next_request(deadline)
        except HttpError as error:
            if error.status != 408 or client.requests.in_message:  # idle: just hang up
                await refuse(client, who, "?", "", Denied(error.status, str(error)))
            return False
        if request is None:
            return False
        body = RequestBody(client, request, self.header_timeout)
        method, raw_target = request.start[0], request.start[1]
        try:
            if isinstance(caller, peer.IdentityError):
                raise policy.forbid(f"Permission denied: {caller.message}")
            plan = await self.plan(caller, request, body)
            # admins' targets too: only a canonical rendering of a parsed target is forwarded
            plan = replace(plan, target=policy.parse_target(method, plan.target).render())
        except (Denied, HttpError) as error:
            denial = error if isinstance(error, Denied) else Denied(error.status, str(error))
            await refuse(client, who, method, raw_target, denial)
            await body.drain()
            return False
        try:
            return await self.forward(client, who, request, body, plan)
        except (Denied, HttpError) as error:  # nothing was answered yet
            denial = error if isinstance(error, Denied) else Denied(error.status, str(error))
            await refuse(client, who, method, raw_target, denial)
            return False

    async def plan(self, caller: Caller, request: Message, body: RequestBody) -> Plan:
        method, raw_target = request.start[0], request.start[1]
        if caller.admin:
            return Plan(raw_target, None)
        content_types = request.get_all("Content-Type")
        media = content_types[0].split(";")[0].strip().lower() if content_types else ""
        if len(content_types) > 1 or media not in USER_CONTENT_TYPES:
            raise Denied(400, f"Content-Type {media!r} is not accepted by the ds01 proxy")
        target = policy.parse_target(method, raw_target)
        policy.check_api_version(target)
        route = policy.classify(target)
        try:
            return await self.plan_route(caller, target, route, body)
        except Invisible as hidden:
            return await self.as_missing(caller, target, route, hidden, body)

    async def plan_route(
        self, caller: Caller, target: Target, route: policy.Route, body: RequestBody
    ) -> Plan:
        match route.kind:
            case Kind.PUBLIC:
                return Plan(target.render(), None)
            case Kind.INFO:
                return await self.plan_info(caller, target)
            case Kind.LIST_CONTAINERS:
                for key, ref in policy.container_list_refs(target):
                    target = await self.resolve_list_ref(caller, target, key, ref)
                checked = policy.check_list(caller, target, self.settings)
                return Plan(checked.render(), None, caller.user)
            case Kind.EVENTS:
                return Plan(policy.check_events(caller, target, self.settings).render(), None)
            case Kind.CREATE:
                return await self.plan_create(caller, target, await body.read(policy.MAX_JSON_BODY))
            case Kind.CONTAINER:
                return await self.plan_container(caller, target, route, body)
            case Kind.EXEC:
                return await self.plan_exec(caller, target, route)
            case Kind.IMAGE_PULL:
                policy.check_pull(caller)
            case Kind.IMAGE_TAG:
                policy.check_image_tag(caller, target)
                image, _ = await self.visible_image(caller, route.ref or "", target.version)
                # by the id that was checked: no retag in between can change what is tagged
                segments = ("images", image.id, "tag")
                return Plan(Target("POST", target.version, segments, target.query).render(), None)
            case Kind.IMAGE_DELETE:
                policy.check_image_delete(caller, route)
                return Plan(target.render(), None)
            case Kind.IMAGE_READ:
                return await self.plan_image_read(caller, target, route)
            case Kind.IMAGE_LIST:
                return await self.plan_image_list(caller, target)
            case Kind.BUILD:
                return await self.plan_build(caller, target, body)
        raise policy.forbid("Permission denied")  # pragma: no cover - classify is exhaustive

    async def as_missing(
        self,
        caller: Caller,
        target: Target,
        route: policy.Route,
        hidden: Invisible,
        body: RequestBody,
    ) -> Plan:
        """Answer for a hidden object exactly as the engine answers for a missing one: the
        same request, about a stand-in reference that cannot exist (nothing happens there),
        the engine's reply with the reference put back."""
        stand = policy.stand_in(hidden.kind, hidden.ref, secrets.token_hex(32))
        payload = hidden.body if isinstance(hidden.body, bytes) else None
        if hidden.rebuild is not None:
            asked = hidden.rebuild(stand.ref)
        elif route.kind is Kind.CREATE:
            asked = target
            payload = json.dumps({**hidden.body, "Image": stand.ref}).encode()
        elif route.kind in (Kind.CONTAINER, Kind.EXEC):
            asked = target.with_segment(1, stand.ref)
            if route.kind is Kind.EXEC and target.method == "POST" and payload is None:
                payload = await body.read(policy.MAX_JSON_BODY)
        elif route.kind in (Kind.IMAGE_READ, Kind.IMAGE_TAG):
            segments = ("images", *stand.ref.split("/"), *([route.action] if route.action else []))
            asked = Target(target.method, target.version, segments, target.query)
        else:  # pragma: no cover - every Invisible comes from a route above
            raise hidden
        await body.drain()
        fetched = await self.upstream.request(target.method, asked.render(), payload)
        log.warning(
            "denied user=%s method=%s path=%s status=%d reason=%s (%s)",
            caller.user,
            target.method,
            target.render(),
            fetched.status,
            hidden.message,
            hidden.why or "not visible",
        )
        answer = fetched.with_body(stand.restore(fetched.body)).as_response()
        return Plan(asked.render(), None, answer=answer)

    async def resolve_container(
        self, caller: Caller, ref: str, version: str | None = None
    ) -> tuple[ContainerFacts | None, Fetched | None]:
        """`ref` resolved among the caller's own containers (see `policy.resolve_among`).

        The engine's own resolution answers at once when it lands on one of theirs (one
        look-up, which is the inspect itself); otherwise their list decides. Another user's
        container comes back only for the log line of the refusal.
        """
        facts, fetched = await self.upstream.inspect(ref, version)
        if facts is not None and facts.owner == caller.user:
            return facts, fetched
        found = policy.resolve_among(ref, await self.upstream.own_containers(caller.user))
        if found is None:
            return facts, None
        return await self.upstream.inspect(found, version)

    async def plan_container(
        self, caller: Caller, target: Target, route: policy.Route, body: RequestBody
    ) -> Plan:
        facts, fetched = await self.resolve_container(caller, route.ref or "", target.version)
        inspected = route.action in ("exec", "start")
        data = await body.read(policy.MAX_JSON_BODY) if inspected else b""
        try:
            checked, new_body = policy.check_container_action(caller, route, target, facts, data)
        except Invisible as hidden:
            hidden.body = data if inspected else None
            raise
        assert facts is not None
        plan = Plan(checked.render(), new_body)
        if target.method == "POST" and route.action in ("start", "restart"):
            limits = await self.limits(caller)
            if limits is not None and limits.aggregate is not None:
                started = await self.start_within_caps(caller, limits, checked, new_body, fetched)
                plan.answer = redacted(started).as_response()
        if (target.method, route.action) == ("GET", "json") and not target.query and fetched:
            plan.answer = fetched.as_response()  # the look-up was this very request
        if route.action == "exec":
            plan.learn_exec = (facts.id, caller.user)
        return plan

    async def resolve_list_ref(self, caller: Caller, target: Target, key: str, ref: str) -> Target:
        """A container named in a list filter, as the caller's own full id (or as missing)."""
        facts, _ = await self.resolve_container(caller, ref, target.version)
        if facts is None or facts.owner != caller.user:
            hidden = Invisible("container", ref, why="list filter")
            hidden.rebuild = lambda stand: policy.check_list(
                caller, policy.replace_filter(target, key, ref, stand), self.settings
            )
            raise hidden
        return policy.replace_filter(target, key, ref, facts.id)

    async def visible_image(
        self, caller: Caller, ref: str, version: str | None = None
    ) -> tuple[ImageFacts, Fetched]:
        """The image `ref` names if the caller may use it, else `Invisible` (missing alike)."""
        image, fetched = await self.upstream.image(ref, version)
        if not policy.image_visible(caller, image, await self.shared_for(caller)):
            raise Invisible("image", ref, why="not shared" if image else "missing")
        assert image is not None
        return image, fetched

    async def shared_for(self, caller: Caller) -> frozenset[str]:
        if self.shared is None:
            return frozenset()
        limits = await self.limits(caller)
        return await self.shared.for_caller(limits.allowed_images if limits else None)

    async def plan_image_read(self, caller: Caller, target: Target, route: policy.Route) -> Plan:
        image, fetched = await self.visible_image(caller, route.ref or "", target.version)
        if route.action == "json":
            data = policy.filter_image_document(caller, json.loads(fetched.body))
        else:
            history = await self.upstream.fetch(target.render())
            if history.status != 200:
                return Plan(target.render(), None, answer=history.as_response())
            data = policy.filter_image_history(caller, json.loads(history.body))
            fetched = history
        answer = fetched.with_body(json.dumps(data).encode()).as_response()
        return Plan(target.render(), None, answer=answer)

    async def plan_image_list(self, caller: Caller, target: Target) -> Plan:
        for key, ref in policy.image_list_refs(target):
            try:
                await self.visible_image(caller, ref, target.version)
            except Invisible as hidden:
                hidden.rebuild = lambda stand, key=key, ref=ref: policy.replace_filter(
                    target, key, ref, stand
                )
                raise
        listing = await self.upstream.fetch(target.render())
        if listing.status != 200:
            return Plan(target.render(), None, answer=listing.as_response())
        kept = policy.filter_image_list(
            caller, json.loads(listing.body), await self.shared_for(caller)
        )
        return Plan(
            target.render(), None, answer=listing.with_body(json.dumps(kept).encode()).as_response()
        )

    async def plan_info(self, caller: Caller, target: Target) -> Plan:
        info = await self.upstream.fetch(target.render())
        if info.status != 200:
            return Plan(target.render(), None, answer=info.as_response())
        own = await self.upstream.own_containers(caller.user)
        images = policy.filter_image_list(
            caller, await self.upstream.images(), await self.shared_for(caller)
        )
        data = policy.own_info(json.loads(info.body), own, len(images))
        return Plan(
            target.render(), None, answer=info.with_body(json.dumps(data).encode()).as_response()
        )

    async def plan_build(self, caller: Caller, target: Target, body: RequestBody) -> Plan:
        checked = policy.check_build(caller, target, await self.limits(caller))
        context = await body.read(self.settings.max_build_context)
        shared = await self.shared_for(caller)
        uses = policy.build_images(target, context, self.settings.max_build_context)
        cache: list[str] = []
        while uses:
            use = uses.pop(0)
            image, _ = await self.upstream.image(use.reference, target.version)
            triggers = policy.check_build_image(caller, use, image, shared)
            if use.where.startswith("FROM"):  # only a base image's triggers run
                uses += triggers
            assert image is not None
            cache.append(image.id)
        visible = policy.filter_image_list(caller, await self.upstream.images(), shared)
        cache += [str(i.get("Id")) for i in visible]
        return Plan(policy.build_cache_sources(checked, cache).render(), context)

    async def plan_create(self, caller: Caller, target: Target, raw: bytes) -> Plan:
        body = policy.parse_json_body(raw, "create")
        if not isinstance(body, dict):
            raise Denied(400, "create body must be a JSON object")
        needs = policy.create_needs(caller, body, self.settings)
        containers = {}
        for ref in needs.containers:
            found, _ = await self.resolve_container(caller, ref, target.version)
            owned = found is not None and found.owner == caller.user
            containers[ref] = found if owned else None
        import_paths, volume_names = policy.import_needs(body.get("HostConfig"), containers)
        volumes = {name: await self.upstream.volume(name) for name in volume_names}
        all_paths = needs.paths + import_paths + policy.volume_needs(volumes)
        paths = {path: await asyncio.to_thread(path_facts, path) for path in all_paths}
        limits = await self.limits(caller)
        image = (await self.upstream.image(needs.image, target.version))[0] if needs.image else None
        shared = await self.shared_for(caller)
        async with self.create_slot(caller, limits):
            existing = 0
            if limits and limits.max_containers is not None:
                existing = await self.upstream.count_containers(caller.user)
            facts = policy.CreateFacts(containers, paths, existing, limits, volumes, image, shared)
            checked, new_body = policy.check_create(caller, target, body, facts, self.settings)
            await self.check_aggregate_at_create(caller, limits, checked, new_body)
            created = await self.upstream.request("POST", checked.render(), new_body)
        return Plan(checked.render(), new_body, answer=redacted(created).as_response())

    async def check_aggregate_at_create(
        self, caller: Caller, limits: policy.UserLimits | None, checked: Target, body: bytes
    ) -> None:
        """Fail fast, as a hub spawn does: a container that could not start beside the caller's
        running ones is not made (`docker run` then leaves nothing); its start checks again."""
        if limits is None or limits.aggregate is None:
            return
        name = checked.param("name") or ""
        running = await asyncio.to_thread(self.counted, caller.user, name)
        policy.check_aggregate(caller, limits, running, name, json.loads(body)["HostConfig"])

    async def start_within_caps(
        self,
        caller: Caller,
        limits: policy.UserLimits,
        checked: Target,
        body: bytes | None,
        inspected: Fetched | None,
    ) -> Fetched:
        """`docker start` (or restart) of the caller's container under their lock, once their
        aggregate caps allow it now (`ds01hub.host.aggregate_gate.start_within_caps`: the
        hub's own gate, so a proxy start and a hub spawn of one user cannot both pass), with
        their parent cgroup's caps written first when the container is under it."""
        cap = limits.aggregate
        document = inspected.json() if inspected else None
        if not isinstance(document, dict):
            raise Denied(502, "the Docker engine did not describe the container")
        name = str(document.get("Name") or "").removeprefix("/")
        host = document.get("HostConfig") or {}
        parent = limits.user_parent(caller.user, self.settings)

        async def start() -> Fetched:
            if cap is not None and parent is not None and host.get("CgroupParent") == parent:
                root = self.settings.aggregate_cgroup_root
                try:
                    await asyncio.to_thread(ensure_parent, root, parent, cap)
                except CgroupError as error:
                    raise Denied(500, error.message) from None
            return await self.upstream.request("POST", checked.render(), body)

        engine = await asyncio.to_thread(lambda: self.engine)  # made once: asks the version
        try:
            return await start_within_caps(
                self.hub_state_dir or paths.state_dir(),
                caller.user,
                cap,
                engine,
                lambda: user_records(engine, self.settings.signer(), caller.user),
                (name, str(document.get("Id"))),
                start,
            )
        except AggregateRefused as error:
            raise Denied(409, error.message) from None
        except UserLockTimeout as error:
            raise Denied(503, f"{error.message}; {error.hint}") from None

    @contextlib.asynccontextmanager
    async def create_slot(
        self, caller: Caller, limits: policy.UserLimits | None
    ) -> AsyncIterator[None]:
        """Count-and-create one at a time per user, also across proxy processes: an asyncio
        lock here, an flock on ``state_dir/create-<user>.lock`` between processes."""
        if limits is None or limits.max_containers is None:
            yield
            return
        async with self.create_locks.setdefault(caller.user, asyncio.Lock()):
            if self.state_dir is None:
                yield
                return
            path = self.state_dir / f"create-{escape_name(caller.user)}.lock"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the flock

    async def plan_exec(self, caller: Caller, target: Target, route: policy.Route) -> Plan:
        exec_id = route.ref or ""
        known = self.exec_owners.get(exec_id)
        if known is None:
            found = await self.upstream.exec_container(exec_id)
            if found is None:
                raise Invisible("exec", exec_id, why="missing")
            exec_id, container_id = found
            facts = policy.check_owner(
                caller, exec_id, await self.upstream.container(container_id), kind="exec"
            )
            self.remember_exec(exec_id, facts.id, caller.user)
        elif known[1] != caller.user:
            raise Invisible("exec", exec_id, why=f"owned by {known[1]}")
        return Plan(target.with_segment(1, exec_id).render(), None)

    async def forward(
        self, client: ClientStream, who: str, request: Request, body: RequestBody, plan: Plan
    ) -> bool:
        """Send the planned request upstream, rebuilt (`upstream_head`), and relay the answer."""
        if plan.body is not None and body.data is None:
            await body.drain()  # replaced by the policy's body
        if plan.answer is not None:
            await body.drain()
            await client.write(plan.answer)
            return request.keep_alive
        method = request.start[0]
        if plan.body is not None:
            body.data = plan.body
        headers = upstream_headers(request, body)
        upstream = await self.upstream.connect()
        log.info(
            "forwarded user=%s method=%s target=%s headers=%s",
            who,
            method,
            plan.target,
            describe_headers(headers),
        )
        try:
            await upstream.write(render_head(f"{method} {plan.target} HTTP/1.1", headers))
            await body.relay(upstream)
            return await self.relay_response(client, upstream, request, plan)
        finally:
            upstream.close()

    async def relay_response(
        self, client: ClientStream, upstream: Stream, request: Request, plan: Plan
    ) -> bool:
        response, parser = await read_response_head(upstream)
        status = int(response.start[1])
        if status == 101 and request.upgrade:
            await client.write(response.render())
            await splice(client, upstream)
            return False
        framing = response_framing(response, request.start[0])
        if 100 <= status < 200 or (framing.kind == "eof" and not request.upgrade):
            # an old-style hijack (200 and a raw stream): output only, then the end; the
            # client's bytes after its request are never forwarded unparsed
            await client.write(response.render(("Connection",), [("Connection", "close")]))
            await unless_client_leaves(client, relay_until_eof(upstream, client))
            return False
        keep_alive = request.keep_alive and not request.upgrade
        closing = [] if keep_alive else [("Connection", "close")]
        rewrite = (plan.filter_user and status == 200) or (plan.learn_exec and status == 201)
        if rewrite or request.upgrade:
            # whole: to rewrite it, or because a refused upgrade leaves the engine's
            # connection open (the answer ends where its framing says)
            data = await read_response_body(upstream, parser, 256 * 1024 * 1024)
            if rewrite:
                data = self.rewrite_body(plan, data)
            add = [("Content-Length", str(len(data))), *closing]
            drop = ("Content-Length", "Transfer-Encoding", "Connection")
            await client.write(response.render(drop, add) + data)
        else:
            await client.write(response.render(("Connection",), closing))
            # trusted engine: its framing as sent, to its end of stream (Connection: close)
            if not await unless_client_leaves(client, relay_until_eof(upstream, client)):
                return False
        return keep_alive

    def rewrite_body(self, plan: Plan, body: bytes) -> bytes:
        """The container list reduced to the caller's; an exec create remembered."""
        if plan.filter_user:
            listing = json.loads(body or b"[]")
            trust = self.settings.signer()
            kept = policy.filter_owned_containers(listing, plan.filter_user, trust)
            return body if len(kept) == len(listing) else json.dumps(kept).encode()
        if plan.learn_exec:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                self.remember_exec(json.loads(body)["Id"], *plan.learn_exec)
        return body


async def refuse(client: Stream, who: str, method: str, path: str, denial: Denied) -> None:
    """Log the refusal (one line, with who, what and why) and answer it."""
    log.warning(
        "denied user=%s method=%s path=%s status=%d reason=%s",
        who,
        method,
        path,
        denial.status,
        denial.message,
    )
    await send_error(client, denial.status, denial.message, method)


async def send_error(client: Stream, status: int, message: str, method: str = "GET") -> None:
    """Docker's error shape: the CLI prints `message`. (HEAD answers carry no body.)"""
    body = json.dumps({"message": message}).encode()
    head = (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    with contextlib.suppress(ConnectionError, OSError):
        await client.write(head.encode() + (b"" if method == "HEAD" else body))


# --------------------------------------------------------------------------------------------
# Limits and the command


def limits_loader(
    path: str | None, snapshot: str | os.PathLike | None = None
) -> Callable[[Caller], policy.UserLimits | None]:
    """The caller's limits from the YAML file (re-read when it changes): `path`, else the
    host's file, by the one rule for "no limits file" (ds01hub.limits.load_limits_or_defaults:
    with none named and none at the default path, the built-in defaults, which limit no
    container setting); with the hub's group properties and members from the ds01-ops
    service's `snapshot` (ds01hub.hub.group_snapshot), as a hub spawn resolves them. A
    snapshot that cannot be believed, or a bad property of one of the caller's groups,
    refuses what needs limits (never the looser file-only limits)."""
    store = LimitsStore(path or None)
    groups = SnapshotReader(snapshot) if snapshot is not None else None

    def limits_for(caller: Caller) -> policy.UserLimits:
        store.reload()
        try:
            resolved = (
                groups.resolve(store.current, caller.user, caller.groups)
                if groups is not None
                else store.current.resolve(caller.user, caller.groups)
            )
        except SnapshotError as error:
            raise Denied(503, f"{error.message} ({error.hint})") from None
        except LimitsError as error:
            raise Denied(
                409,
                f"Permission denied: {error.summary()} (a JupyterHub group of yours): "
                + "; ".join(error.lines())
                + ". An admin fixes the group's properties; until then you cannot create "
                "containers",
            ) from None
        return policy.UserLimits(
            host_config=resolved.api_host_config(),
            allowed_images=resolved.allowed_images,
            max_containers=resolved.max_containers_per_user,
            aggregate=resolved.aggregate,
            sources=dict(resolved.sources),
        )

    return limits_for


async def serve(proxy: Proxy, listen: str, ready: Callable[[], None] | None = None) -> None:
    """Listen on `listen` (mode 0666: identity comes from SO_PEERCRED) until cancelled; a path
    where another listener answers is refused (ds01hub.peer.listen_unix: SocketPathError)."""
    listener = peer.listen_unix(listen, 0o666, backlog=1024)  # bursts of connects
    server = await asyncio.start_unix_server(proxy.handle, sock=listener.sock, limit=MAX_HEAD)
    log.info(
        "ds01hub proxy listening on unix://%s, upstream unix://%s; full access: %s; "
        "header timeout %gs, at most %d connections per user, %d open files",
        listen,
        proxy.upstream.path,
        proxy.admins.describe(),
        proxy.header_timeout,
        proxy.max_connections_per_user,
        resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    )
    if ready:
        ready()
    try:
        async with server:
            await server.serve_forever()
    finally:
        listener.remove_path()


def raise_open_files_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: every connection holds one or two descriptors.

    The per-user cap keeps one user from taking them all; the default soft limit (1024)
    would be exhausted by a few users' legitimate streams.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s"
    )
    if args.admin_group:
        try:
            grp.getgrnam(args.admin_group)
        except KeyError:
            print(
                f"ds01hub proxy: --admin-group {args.admin_group}: no such group", file=sys.stderr
            )
            return 2
    try:
        snapshot = paths.hub_groups_snapshot(args.hub_state_dir)
        limits = limits_loader(args.limits, snapshot)
    except Exception as error:  # LimitsError names the key and the fix
        print(f"ds01hub proxy: --limits {args.limits}: {error}", file=sys.stderr)
        return 1
    if not os.path.exists(args.upstream):
        print(
            f"ds01hub proxy: --upstream {args.upstream}: no such socket; is dockerd running?",
            file=sys.stderr,
        )
        return 1
    state_dir = Path(args.state_dir)
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        print(f"ds01hub proxy: --state-dir {state_dir}: {error}", file=sys.stderr)
        return 1
    try:
        trust = provenance.load(args.hub_state_dir)
    except provenance.ProvenanceError as error:
        print(f"ds01hub proxy: --hub-state-dir: {error}", file=sys.stderr)
        return 1
    settings = policy.Settings(
        bind_roots=tuple(args.bind_root or policy.Settings().bind_roots),
        trust=trust,
        aggregate_cgroup_root=args.aggregate_cgroup_root,
        creator=Owner.current().label(),
    )
    upstream = Upstream(args.upstream, trust)
    raise_open_files_limit()
    proxy = Proxy(
        upstream,
        peer.AdminRule(frozenset(args.admin), frozenset(filter(None, [args.admin_group]))),
        settings,
        limits,
        header_timeout=args.header_timeout,
        max_connections_per_user=args.max_connections_per_user,
        shared=SharedImages(upstream, tuple(args.shared_image or DEFAULT_SHARED_IMAGES)),
        state_dir=state_dir,
        hub_state_dir=paths.state_dir(args.hub_state_dir),
    )

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None  # inside asyncio.run
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await serve(proxy, args.listen)

    try:
        asyncio.run(main())
    except peer.SocketPathError as error:
        print(f"ds01hub proxy: --listen {args.listen}: {error.message}", file=sys.stderr)
        return 1
    return 0
