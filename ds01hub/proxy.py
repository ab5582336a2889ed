"""The Docker socket filter proxy: a unix socket in front of the engine that lets each user see
and act on their own containers only.

This is the socket edge. It identifies every client by SO_PEERCRED (uid -> user), parses each
HTTP/1.1 request itself (it needs the raw bytes to splice hijacked streams: ``docker attach``,
``docker exec -it``), asks `ds01hub.proxy_policy` what it must look up, looks it up on the
upstream engine and the file system, and forwards exactly the request the policy returned.
Decisions are per request, not per connection: a keep-alive connection is re-checked every time.

Each request gets its own upstream connection, sent with ``Connection: close``: the engine's
answer then ends where its stream ends, so it is relayed as it arrives without re-parsing its
framing (client bodies, in contrast, are parsed strictly: no smuggling). Responses without
framing (old-style hijack) and ``101 Switching Protocols`` become a two-way splice. Endless
answers (``logs -f``, ``events``) stop as soon as the client hangs up.

Run it as root (``ds01hub proxy``): it needs the engine's socket, reads other users' /proc to
tell host processes from containerised ones, resolves bind paths as the engine would, and reads
the hub's label key and deployment id from ``--state-dir`` (the hub's state directory): it signs
the containers users create and believes only signed ownership labels (`ds01hub.provenance`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import grp
import json
import logging
import os
import pwd
import select
import signal
import socket
import stat
import struct
import sys
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ds01hub import provenance
from ds01hub import proxy_policy as policy
from ds01hub.provenance import Provenance
from ds01hub.proxy_policy import Caller, ContainerFacts, Denied, Kind, PathFacts, Target

log = logging.getLogger("ds01hub.proxy")

MAX_HEAD = 64 * 1024
READ_SIZE = 256 * 1024
EXEC_CACHE_SIZE = 4096
COALESCE_BYTES = 16 * 1024
COALESCE_SECONDS = 0.0005  # delay added to a streamed line at most (docker logs -f)
DRAIN_SECONDS = 30  # how long a refused upload may keep sending before we hang up
# Content types a user's request may carry. Go's ParseForm merges an urlencoded *body* into
# the query parameters the engine reads (body first), which would bypass every query check.
USER_CONTENT_TYPES = (
    "",
    "application/json",
    "application/x-tar",
    "text/plain",
    "application/octet-stream",
)
LIMIT_KEYS = ("Memory", "MemorySwap", "NanoCpus", "PidsLimit", "ShmSize", "IpcMode", "CgroupParent")


class HttpError(Exception):
    """A malformed message: answered with 400 and the connection closed."""


# --------------------------------------------------------------------------------------------
# HTTP/1.1 framing


class Stream:
    """A stream with a push-back buffer, so bytes read ahead are never lost."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.buffer = bytearray()
        self.eof = False

    async def fill(self) -> bool:
        """Read more into the buffer; False at end of stream."""
        data = await self.reader.read(READ_SIZE)
        if not data:
            self.eof = True
            return False
        self.buffer += data
        return True

    def take(self, n: int | None = None) -> bytes:
        n = len(self.buffer) if n is None else n
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    async def read_some(self) -> bytes:
        if self.buffer:
            return self.take()
        data = await self.reader.read(READ_SIZE)
        self.eof = not data
        return data

    async def read_head(self) -> bytes | None:
        """The bytes up to and including the blank line, or None at a clean end of stream."""
        start = 0
        while (end := self.buffer.find(b"\r\n\r\n", start)) < 0:
            if len(self.buffer) > MAX_HEAD:
                raise HttpError("header section too large")
            start = max(0, len(self.buffer) - 3)
            if not await self.fill():
                if self.buffer:
                    raise HttpError("connection closed inside a header section")
                return None
        if end + 4 > MAX_HEAD:
            raise HttpError("header section too large")
        return self.take(end + 4)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


@dataclass
class Message:
    """A request or response head: the start line's three parts and the header fields."""

    start: tuple[str, str, str]
    headers: list[tuple[str, str]]

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[-1] if values else None

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def tokens(self, name: str) -> set[str]:
        return {t.strip().lower() for v in self.get_all(name) for t in v.split(",") if t.strip()}

    def render(self, drop: Iterable[str] = (), add: Iterable[tuple[str, str]] = ()) -> bytes:
        dropped = {d.lower() for d in drop}
        lines = [" ".join(self.start)]
        lines += [f"{k}: {v}" for k, v in self.headers if k.lower() not in dropped]
        lines += [f"{k}: {v}" for k, v in add]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def parse_head(data: bytes, request: bool) -> Message:
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise HttpError("non-ASCII header section") from None
    lines = text[:-4].split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) != 3:
        raise HttpError(f"malformed start line {lines[0][:80]!r}")
    version = parts[2] if request else parts[0]
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpError(f"unsupported protocol version {version[:20]!r}")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or line[0] in " \t":
            raise HttpError(f"malformed header line {line[:80]!r}")
        if any(c in name for c in '()<>@,;\\"/[]?={} \t'):
            raise HttpError(f"malformed header name {name[:40]!r}")
        headers.append((name, value.strip()))
    return Message((parts[0], parts[1], parts[2]), headers)


@dataclass(frozen=True)
class Framing:
    """How a message body is delimited: 'none', 'length' (with `length`), 'chunked', 'eof'."""

    kind: str
    length: int = 0


def request_framing(message: Message) -> Framing:
    """Strict framing: one Content-Length or exactly `chunked`, never both (smuggling)."""
    encodings = message.get_all("Transfer-Encoding")
    lengths = message.get_all("Content-Length")
    if encodings:
        if lengths or len(encodings) > 1 or encodings[0].strip().lower() != "chunked":
            raise HttpError("unsupported Transfer-Encoding / Content-Length combination")
        return Framing("chunked")
    if lengths:
        if len(lengths) > 1 or not lengths[0].isdigit():
            raise HttpError("invalid Content-Length")
        return Framing("length", int(lengths[0]))
    return Framing("none")


def response_framing(response: Message, method: str) -> Framing:
    status = int(response.start[1])
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return Framing("none")
    if "chunked" in response.tokens("Transfer-Encoding"):
        return Framing("chunked")
    length = response.get("Content-Length")
    if length is not None and length.isdigit():
        return Framing("length", int(length))
    return Framing("eof")


class ChunkScanner:
    """Finds where a chunked body ends without copying it (strict: hex sizes, no trailers).

    Chunk extensions and trailers are refused rather than passed on, so the engine can never
    read a different body than the one this proxy delimited.
    """

    def __init__(self) -> None:
        self.remaining = 0  # data bytes left in the current chunk
        self.crlf_due = False  # the CRLF that ends a chunk's data
        self.done = False

    def scan(self, data: bytes | bytearray) -> int:
        """How many bytes at the start of `data` belong to the body (0: need more data)."""
        pos, size_limit = 0, len(data)
        while not self.done and pos < size_limit:
            if self.remaining:
                step = min(self.remaining, size_limit - pos)
                pos += step
                self.remaining -= step
                self.crlf_due = not self.remaining
                continue
            if self.crlf_due:
                if size_limit - pos < 2:
                    break
                if data[pos : pos + 2] != b"\r\n":
                    raise HttpError("chunk data not followed by CRLF")
                pos += 2
                self.crlf_due = False
                continue
            end = data.find(b"\r\n", pos)
            if end < 0:
                if size_limit - pos > 32:
                    raise HttpError("chunk size line too long")
                break
            line = bytes(data[pos:end])
            if not line or len(line) > 16 or line.strip(b"0123456789abcdefABCDEF"):
                raise HttpError(f"malformed chunk size line {line[:20]!r}")
            size = int(line, 16)
            if size == 0:
                if size_limit < end + 4:
                    break
                if data[end + 2 : end + 4] != b"\r\n":
                    raise HttpError("chunked trailers are not supported")
                pos, self.done = end + 4, True
                break
            pos, self.remaining = end + 2, size
        return pos


async def relay_body(src: Stream, dst: Stream, framing: Framing) -> None:
    """Copy one body from `src` to `dst` as it arrives, preserving its framing."""
    if framing.kind == "length":
        left = framing.length
        while left:
            if not src.buffer and not await src.fill():
                raise HttpError("connection closed inside a body")
            data = src.take(min(left, len(src.buffer)))
            left -= len(data)
            await dst.write(data)
    elif framing.kind == "chunked":
        scanner = ChunkScanner()
        while not scanner.done:
            used = scanner.scan(src.buffer) if src.buffer else 0
            if used:
                await dst.write(src.take(used))
            elif not await src.fill():
                raise HttpError("connection closed inside a chunked body")
    elif framing.kind == "eof":
        while data := await src.read_some():
            await dst.write(data)


async def read_body(src: Stream, framing: Framing, limit: int) -> bytes:
    """A whole body, de-chunked, refused beyond `limit` bytes."""
    collected = bytearray()

    class Sink:
        async def write(self, data: bytes) -> None:
            collected.extend(data)
            if len(collected) > limit + 64 * 1024:
                raise Denied(413, f"request body larger than {limit} bytes")

    await relay_body(src, Sink(), framing)  # type: ignore[arg-type]
    return dechunk(bytes(collected)) if framing.kind == "chunked" else bytes(collected)


def dechunk(data: bytes) -> bytes:
    out, pos = bytearray(), 0
    while True:
        end = data.index(b"\r\n", pos)
        size = int(data[pos:end], 16)
        if size == 0:
            return bytes(out)
        out += data[end + 2 : end + 2 + size]
        pos = end + 4 + size


async def relay_until_eof(src: Stream, dst: Stream) -> None:
    """Copy until the engine closes, in large pieces.

    The engine flushes every log line (~100 bytes) separately; reading each one as it comes
    costs a system call and a callback per line. After a small piece, reading pauses for
    COALESCE_SECONDS so the kernel gathers the next lines into one large read.
    """
    transport = src.writer.transport
    while data := await src.read_some():
        await dst.write(data)
        if len(data) < COALESCE_BYTES and not src.eof:
            transport.pause_reading()
            try:
                await asyncio.sleep(COALESCE_SECONDS)
            finally:
                transport.resume_reading()


async def unless_client_leaves(client: Stream, relay: Coroutine[Any, Any, None]) -> bool:
    """Run a (possibly endless: logs -f, events) relay; stop it if the client hangs up.

    Bytes the client sends meanwhile (a pipelined request) stay in its buffer. False when the
    client left before the relay finished.
    """

    async def client_gone() -> None:
        while await client.fill():
            if len(client.buffer) >= MAX_HEAD:
                break  # enough read ahead
        if not peer_hung_up(client):
            await asyncio.Event().wait()  # read ahead, or only half-closed: let the relay end

    relaying = asyncio.ensure_future(relay)
    watching = asyncio.ensure_future(client_gone())
    try:
        await asyncio.wait({relaying, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not relaying.done():
            relaying.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
    with contextlib.suppress(asyncio.CancelledError):
        await relaying
    return not relaying.cancelled()


def peer_hung_up(stream: Stream) -> bool:
    """True when the peer closed both directions (POLLHUP), not just its sending side."""
    sock = stream.writer.get_extra_info("socket")
    if sock is None:
        return True
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLHUP)
    return any(events & select.POLLHUP for _, events in poller.poll(0))


class Discard:
    """A sink that forgets what it is given (draining a refused request's body)."""

    async def write(self, data: bytes) -> None:
        pass


class RequestBody:
    """The client's request body, read at most once: parsed, streamed on, or drained."""

    def __init__(self, client: Stream, framing: Framing):
        self.client = client
        self.framing = framing
        self.consumed = framing.kind == "none"

    async def read(self, limit: int) -> bytes:
        self.consumed = True
        return await read_body(self.client, self.framing, limit)

    async def relay(self, upstream: Stream) -> None:
        self.consumed = True
        await relay_body(self.client, upstream, self.framing)

    async def drain(self) -> None:
        """Swallow an unread body so the client can read our refusal (not a broken pipe)."""
        if not self.consumed:
            self.consumed = True
            with contextlib.suppress(HttpError, ConnectionError, OSError):
                await asyncio.wait_for(
                    relay_body(self.client, Discard(), self.framing), DRAIN_SECONDS
                )


async def splice(client: Stream, upstream: Stream) -> None:
    """Two-way copy after a hijack; a half-close from the client is passed on (stdin EOF)."""

    async def pump(src: Stream, dst: Stream, half_close: bool) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read_some():
                await dst.write(data)
            if half_close and dst.writer.can_write_eof():
                dst.writer.write_eof()

    upward = asyncio.create_task(pump(client, upstream, True))
    try:
        await pump(upstream, client, False)
    finally:
        upward.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await upward


# --------------------------------------------------------------------------------------------
# Callers


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected, from the kernel (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def same_mount_namespace(pid: int) -> bool:
    """Whether `pid` sees our file system: root in a container must not count as root here."""
    try:
        return os.stat(f"/proc/{pid}/ns/mnt").st_ino == os.stat("/proc/self/ns/mnt").st_ino
    except OSError:
        return False


@dataclass(frozen=True)
class AdminRule:
    """Who gets full access: root, the named users and the members of the named group."""

    users: frozenset[str] = frozenset()
    group: str | None = None

    def allows(self, caller: Caller) -> bool:
        return (
            caller.uid == 0
            or caller.user in self.users
            or (self.group is not None and self.group in caller.groups)
        )


def identify(pid: int, uid: int, admins: AdminRule) -> Caller | None:
    """The caller behind a uid, or None when the uid has no account (refused)."""
    try:
        account = pwd.getpwuid(uid)
    except KeyError:
        return None
    gids = os.getgrouplist(account.pw_name, account.pw_gid)
    groups = []
    for gid in gids:
        with contextlib.suppress(KeyError):
            groups.append(grp.getgrgid(gid).gr_name)
    caller = Caller(uid, account.pw_gid, account.pw_name, account.pw_dir, tuple(groups))
    if admins.allows(caller) and same_mount_namespace(pid):
        caller = Caller(uid, account.pw_gid, account.pw_name, account.pw_dir, tuple(groups), True)
    return caller


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

    def as_response(self) -> bytes:
        """The same response for a client (own framing; the client's connection stays open)."""
        add = [("Content-Length", str(len(self.body)))]
        return self.head.render(("Content-Length", "Transfer-Encoding", "Connection"), add) + (
            self.body
        )


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
        stream = await self.connect()
        try:
            request = f"GET {path} HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n"
            await stream.write(request.encode())
            head = await stream.read_head()
            if head is None:
                raise HttpError("upstream closed without a response")
            response = parse_head(head, request=False)
            body = await read_body(stream, response_framing(response, "GET"), 64 * 1024 * 1024)
            return Fetched(int(response.start[1]), response, body)
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
        if fetched.status == 404:
            return None, fetched
        data = fetched.json()
        if fetched.status != 200 or not isinstance(data, dict):
            raise Denied(502, f"upstream answered {fetched.status} looking up container {ref}")
        return ContainerFacts.from_inspect(data, self.trust), fetched

    async def exec_container(self, exec_id: str) -> tuple[str, str] | None:
        """(exec id, container id) of an exec instance, or None when there is none."""
        status, data = await self.get_json(f"/exec/{quote(exec_id, safe='')}/json")
        if status == 404:
            return None
        if status != 200 or not isinstance(data, dict):
            raise Denied(502, f"upstream answered {status} looking up exec {exec_id}")
        return data["ID"], data["ContainerID"]

    async def image_exists(self, reference: str) -> bool:
        status, _ = await self.get_json(f"/images/{quote(reference, safe='/:@')}/json")
        return status == 200

    async def image_labels(self, reference: str) -> dict[str, str]:
        """The image's own labels (what the engine would merge into a container); none for
        an image that is not here (the create then fails, the CLI pulls and asks again)."""
        status, data = await self.get_json(f"/images/{quote(reference, safe='/:@')}/json")
        if status == 404:
            return {}
        if status != 200 or not isinstance(data, dict):
            raise Denied(502, f"upstream answered {status} looking up image {reference}")
        found = (data.get("Config") or {}).get("Labels") or {}
        return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}

    async def count_containers(self, user: str, trust: Provenance) -> int:
        filters = quote(policy.owner_filters(None, user, trust), safe="")
        status, data = await self.get_json(f"/containers/json?all=1&filters={filters}")
        if status != 200 or not isinstance(data, list):
            raise Denied(502, f"upstream answered {status} listing containers")
        return len(policy.filter_owned_containers(data, user, trust))


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
    admins: AdminRule = field(default_factory=AdminRule)
    settings: policy.Settings = field(default_factory=policy.Settings)
    limits_for: Callable[[Caller], policy.UserLimits | None] = lambda caller: None
    # asyncio's stream protocol forgets its task when the peer disconnects; keep them alive
    tasks: set[asyncio.Task] = field(default_factory=set)
    # exec id -> (container id, owner): immutable facts, so exec start/inspect/resize need no
    # look-ups once an exec is known (learned from exec create answers and from look-ups)
    exec_owners: dict[str, tuple[str, str]] = field(default_factory=dict)

    def remember_exec(self, exec_id: str, container_id: str, owner: str) -> None:
        if len(self.exec_owners) >= EXEC_CACHE_SIZE:
            del self.exec_owners[next(iter(self.exec_owners))]
        self.exec_owners[exec_id] = (container_id, owner)

    async def limits(self, caller: Caller) -> policy.UserLimits | None:
        """The caller's limits (the file may be re-read: off the event loop)."""
        return await asyncio.to_thread(self.limits_for, caller)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = Stream(reader, writer)
        task = asyncio.current_task()
        if task:
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        try:
            pid, uid, _ = peer_credentials(writer.get_extra_info("socket"))
            # the password/group database may be LDAP: never block the loop on it
            caller = await asyncio.to_thread(identify, pid, uid, self.admins)
            while await self.serve_one(client, caller, uid):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("proxy connection failed")
        finally:
            client.close()

    async def serve_one(self, client: Stream, caller: Caller | None, uid: int) -> bool:
        """Serve one request; True to keep the connection for the next."""
        who = caller.user if caller else f"uid {uid}"
        try:
            head = await client.read_head()
        except HttpError as error:
            await refuse(client, who, "?", "", Denied(400, str(error)))
            return False
        if head is None:
            return False
        try:
            request = parse_head(head, request=True)
            body = RequestBody(client, request_framing(request))
        except HttpError as error:
            first_line = head.split(b"\r\n", 1)[0].decode("ascii", "replace")
            await refuse(client, who, first_line, "", Denied(400, str(error)))
            return False
        method, raw_target = request.start[0], request.start[1]
        try:
            if caller is None:
                raise policy.forbid(f"Permission denied: uid {uid} has no account on this host")
            plan = await self.plan(caller, request, body)
        except (Denied, HttpError) as error:
            denial = error if isinstance(error, Denied) else Denied(400, str(error))
            await refuse(client, who, method, raw_target, denial)
            await body.drain()
            return False
        try:
            return await self.forward(client, request, body, plan)
        except Denied as denial:  # the engine unreachable: nothing was answered yet
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

        match route.kind:
            case Kind.PUBLIC | Kind.IMAGE_READ:
                return Plan(target.render(), None)
            case Kind.LIST_CONTAINERS:
                checked = policy.check_list(caller, target, self.settings)
                return Plan(checked.render(), None, caller.user)
            case Kind.EVENTS:
                return Plan(policy.check_events(caller, target, self.settings).render(), None)
            case Kind.CREATE:
                return await self.plan_create(caller, target, await body.read(policy.MAX_JSON_BODY))
            case Kind.CONTAINER:
                facts, fetched = await self.upstream.inspect(route.ref or "", target.version)
                inspected = route.action in ("exec", "start")
                data = await body.read(policy.MAX_JSON_BODY) if inspected else b""
                checked, new_body = policy.check_container_action(
                    caller, route, target, facts, data
                )
                plan = Plan(checked.render(), new_body)
                if (target.method, route.action) == ("GET", "json") and not target.query:
                    plan.answer = fetched.as_response()  # the look-up was this very request
                if route.action == "exec" and facts is not None:
                    plan.learn_exec = (facts.id, caller.user)
                return plan
            case Kind.EXEC:
                return await self.plan_exec(caller, target, route)
            case Kind.IMAGE_PULL:
                reference = policy.pull_reference(target)
                limits = await self.limits(caller)
                if limits and limits.allowed_images is not None:
                    policy.CreateCheck(
                        caller, self.settings, policy.CreateFacts(limits=limits)
                    ).image(reference)
                policy.check_pull(caller, reference, await self.upstream.image_exists(reference))
                return Plan(target.render(), None)
            case Kind.IMAGE_TAG:
                return Plan(policy.check_image_tag(caller, target).render(), None)
            case Kind.IMAGE_DELETE:
                policy.check_image_delete(caller, route)
                return Plan(target.render(), None)
            case Kind.BUILD:
                return Plan(
                    policy.check_build(caller, target, await self.limits(caller)).render(), None
                )
        raise policy.forbid("Permission denied")  # pragma: no cover - classify is exhaustive

    async def plan_create(self, caller: Caller, target: Target, raw: bytes) -> Plan:
        body = policy.parse_json_body(raw, "create")
        if not isinstance(body, dict):
            raise Denied(400, "create body must be a JSON object")
        needs = policy.create_needs(caller, body, self.settings)
        containers = {ref: await self.upstream.container(ref) for ref in needs.containers}
        paths = {path: await asyncio.to_thread(path_facts, path) for path in needs.paths}
        limits = await self.limits(caller)
        existing = 0
        if limits and limits.max_containers is not None:
            existing = await self.upstream.count_containers(caller.user, self.settings.signer())
        image = body.get("Image")
        image_labels = await self.upstream.image_labels(image) if isinstance(image, str) else {}
        facts = policy.CreateFacts(containers, paths, existing, limits, image_labels)
        checked, new_body = policy.check_create(caller, target, body, facts, self.settings)
        return Plan(checked.render(), new_body)

    async def plan_exec(self, caller: Caller, target: Target, route: policy.Route) -> Plan:
        exec_id = route.ref or ""
        known = self.exec_owners.get(exec_id)
        if known is None:
            found = await self.upstream.exec_container(exec_id)
            if found is None:
                raise Denied(404, f"No such exec instance: {exec_id}")
            exec_id, container_id = found
            facts = policy.check_owner(
                caller, container_id, await self.upstream.container(container_id)
            )
            self.remember_exec(exec_id, facts.id, caller.user)
        elif known[1] != caller.user:
            raise policy.forbid(f"Permission denied: container owned by {known[1]}")
        return Plan(target.with_segment(1, exec_id).render(), None)

    async def forward(
        self, client: Stream, request: Message, body: RequestBody, plan: Plan
    ) -> bool:
        keep_alive = not client_closes(request)
        if plan.answer is not None:
            await client.write(plan.answer)
            return keep_alive
        upstream = await self.upstream.connect()
        try:
            start = (request.start[0], plan.target, "HTTP/1.1")
            drop, add = [], []
            if plan.body is not None:
                drop += ["Content-Length", "Transfer-Encoding"]
                add.append(("Content-Length", str(len(plan.body))))
            upgrade = "upgrade" in request.tokens("Connection")
            if not upgrade:
                # the engine closes after its answer, so the answer ends at end of stream
                drop += ["Connection", "Keep-Alive"]
                add.append(("Connection", "close"))
            await upstream.write(Message(start, request.headers).render(drop, add))
            if plan.body is not None:
                await upstream.write(plan.body)
            else:
                await body.relay(upstream)
            return await self.relay_response(client, upstream, request, plan, upgrade)
        finally:
            upstream.close()

    async def relay_response(
        self, client: Stream, upstream: Stream, request: Message, plan: Plan, upgrade: bool
    ) -> bool:
        while True:
            raw = await upstream.read_head()
            if raw is None:
                raise HttpError("upstream closed without a response")
            response = parse_head(raw, request=False)
            status = int(response.start[1])
            if status == 101:
                await client.write(raw)
                await splice(client, upstream)
                return False
            if 100 <= status < 200:
                await client.write(raw)
                continue
            break
        framing = response_framing(response, request.start[0])
        if framing.kind == "eof":
            await client.write(raw)
            await splice(client, upstream)  # old-style hijack or a close-delimited body
            return False
        keep_alive = not client_closes(request)
        closing = [] if keep_alive else [("Connection", "close")]
        rewrite = (plan.filter_user and status == 200) or (plan.learn_exec and status == 201)
        if rewrite:
            body = await read_body(upstream, framing, 256 * 1024 * 1024)
            data = self.rewrite_body(plan, body)
            add = [("Content-Length", str(len(data))), *closing]
            drop = ("Content-Length", "Transfer-Encoding", "Connection")
            await client.write(response.render(drop, add) + data)
        else:
            await client.write(response.render(("Connection",), closing))
            # trusted engine: its framing as sent, to its end of stream (but for upgrades)
            relay = (
                relay_body(upstream, client, framing)
                if upgrade
                else relay_until_eof(upstream, client)
            )
            if not await unless_client_leaves(client, relay):
                return False
        return keep_alive

    def rewrite_body(self, plan: Plan, body: bytes) -> bytes:
        """The container list reduced to the caller's; an exec create remembered."""
        if plan.filter_user:
            listing = json.loads(body or b"[]")
            kept = policy.filter_owned_containers(listing, plan.filter_user, self.settings.signer())
            return body if len(kept) == len(listing) else json.dumps(kept).encode()
        if plan.learn_exec:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                self.remember_exec(json.loads(body)["Id"], *plan.learn_exec)
        return body


def client_closes(request: Message) -> bool:
    return "close" in request.tokens("Connection") or request.start[2] == "HTTP/1.0"


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
    reason = {
        400: "Bad Request",
        403: "Forbidden",
        404: "Not Found",
        413: "Payload Too Large",
        502: "Bad Gateway",
    }.get(status, "Error")
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    with contextlib.suppress(ConnectionError, OSError):
        await client.write(head.encode() + (b"" if method == "HEAD" else body))


# --------------------------------------------------------------------------------------------
# Limits and the command


def limits_loader(path: str | None) -> Callable[[Caller], policy.UserLimits | None]:
    """The caller's limits from the YAML file (re-read when it changes), or none configured."""
    if not path:
        return lambda caller: None
    from docker.types import HostConfig

    from ds01hub.limits import LimitsStore

    store = LimitsStore(path)

    def limits_for(caller: Caller) -> policy.UserLimits:
        resolved = store.resolve(caller.user, caller.groups)
        host = HostConfig("1.41", **resolved.host_config())
        return policy.UserLimits(
            host_config={k: v for k, v in host.items() if k in LIMIT_KEYS},
            allowed_images=resolved.allowed_images,
            max_containers=resolved.max_containers_per_user,
        )

    return limits_for


def prepare_socket_path(path: str) -> None:
    """Create the socket's directory (0755) and remove a stale socket left by a crash."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise SystemExit(
                f"ds01hub proxy: {path} exists and is not a socket; remove it or "
                "choose another --listen path"
            )
        os.unlink(path)


async def serve(proxy: Proxy, listen: str, ready: Callable[[], None] | None = None) -> None:
    """Listen on `listen` (mode 0666: identity comes from SO_PEERCRED) until cancelled."""
    prepare_socket_path(listen)
    server = await asyncio.start_unix_server(proxy.handle, listen, limit=MAX_HEAD)
    os.chmod(listen, 0o666)
    admins = ", ".join(
        ["root", *sorted(proxy.admins.users)]
        + ([f"members of group {proxy.admins.group}"] if proxy.admins.group else [])
    )
    log.info(
        "ds01hub proxy listening on unix://%s, upstream unix://%s; full access: %s",
        listen,
        proxy.upstream.path,
        admins,
    )
    if ready:
        ready()
    try:
        async with server:
            await server.serve_forever()
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(listen)


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
        limits = limits_loader(args.limits)
    except Exception as error:  # LimitsError names the key and the fix
        print(f"ds01hub proxy: --limits {args.limits}: {error}", file=sys.stderr)
        return 1
    if not os.path.exists(args.upstream):
        print(
            f"ds01hub proxy: --upstream {args.upstream}: no such socket; is dockerd running?",
            file=sys.stderr,
        )
        return 1
    try:
        trust = provenance.load(args.state_dir)
    except provenance.ProvenanceError as error:
        print(f"ds01hub proxy: --state-dir: {error}", file=sys.stderr)
        return 1
    settings = policy.Settings(
        bind_roots=tuple(args.bind_root or policy.Settings().bind_roots), trust=trust
    )
    proxy = Proxy(
        Upstream(args.upstream, trust),
        AdminRule(frozenset(args.admin), args.admin_group),
        settings,
        limits,
    )

    async def main() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await serve(proxy, args.listen)

    asyncio.run(main())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "proxy",
        help="run the Docker socket filter proxy (each user sees only their own containers)",
        description=(
            "Serve the Docker Engine API on a unix socket. Each client is identified by "
            "SO_PEERCRED; root, --admin users and members of --admin-group get full access, "
            "everyone else only their own containers (ds01.user=<user> in labels signed with "
            "the hub's label key) and a deny-by-default set of endpoints. Users point the docker "
            "CLI at it: DOCKER_HOST=unix:///run/ds01hub/docker.sock."
        ),
    )
    parser.add_argument(
        "--listen",
        default="/run/ds01hub/docker.sock",
        help="socket to serve (created mode 0666; default %(default)s)",
    )
    parser.add_argument(
        "--upstream",
        default="/var/run/docker.sock",
        help="the engine's socket (default %(default)s)",
    )
    parser.add_argument(
        "--admin-group", metavar="GROUP", help="members of this Unix group get full access"
    )
    parser.add_argument(
        "--admin",
        metavar="USER",
        action="append",
        default=[],
        help="a user with full access (repeatable)",
    )
    parser.add_argument(
        "--limits",
        metavar="FILE",
        help="resource-limits YAML applied to containers users create "
        "(default: none applied; the security policy still is)",
    )
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        type=Path,
        help="the hub's state directory, for its label key and deployment id (default: "
        f"${provenance.ENV_STATE_DIR}, else {provenance.DEFAULT_STATE_DIR}); it must be the "
        "hub's, or containers made through the proxy are nobody's to the hub and vice versa",
    )
    parser.add_argument(
        "--bind-root",
        metavar="TEMPLATE",
        action="append",
        help="where users may bind-mount from, with {user} and {home} "
        "(repeatable; default {home} and /workspace/{user})",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level (denied requests are logged at warning)",
    )
    parser.set_defaults(handler=run)
