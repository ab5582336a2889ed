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
tell host processes from containerised ones, and resolves bind paths as the engine would.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import grp
import json
import logging
import os
import secrets
import select
import signal
import stat
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ds01hub import peer
from ds01hub import proxy_policy as policy
from ds01hub.labels import escape_name
from ds01hub.proxy_policy import (
    Caller,
    ContainerFacts,
    Denied,
    ImageFacts,
    Invisible,
    Kind,
    PathFacts,
    Target,
    VolumeFacts,
)

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
# the images the platform itself provides (ds01hub.bootstrap's aliases)
DEFAULT_SHARED_IMAGES = ("ds01hub/base:latest", "ds01hub/singleuser:latest")
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
    """The real engine's socket: a fresh connection per request, plus JSON look-ups."""

    path: str

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
            raw = await stream.read_head()
            if raw is None:
                raise HttpError("upstream closed without a response")
            response = parse_head(raw, request=False)
            data = await read_body(stream, response_framing(response, method), 64 * 1024 * 1024)
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
        return ContainerFacts.from_inspect(data), fetched

    async def own_containers(self, user: str) -> list[dict[str, Any]]:
        """The user's containers (list entries), all states."""
        filters = quote(policy.owner_filters(None, user), safe="")
        status, data = await self.get_json(f"/containers/json?all=1&filters={filters}")
        if status != 200 or not isinstance(data, list):
            raise Denied(502, f"upstream answered {status} listing containers")
        return policy.filter_owned_containers(data, user)

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
    create_locks: dict[str, asyncio.Lock] = field(default_factory=dict)
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
            creds = peer.credentials(writer.get_extra_info("socket"))
            # the password/group database may be LDAP: never block the loop on it
            try:
                caller: Caller | peer.IdentityError = await asyncio.to_thread(
                    peer.identify, creds, self.admins
                )
            except peer.IdentityError as refused:
                caller = refused
            while await self.serve_one(client, caller, creds.uid):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("proxy connection failed")
        finally:
            client.close()

    async def serve_one(
        self, client: Stream, caller: Caller | peer.IdentityError, uid: int
    ) -> bool:
        """Serve one request; True to keep the connection for the next."""
        who = caller.user if isinstance(caller, Caller) else f"uid {uid}"
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
            if isinstance(caller, peer.IdentityError):
                raise policy.forbid(f"Permission denied: {caller.message}")
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
                return Plan(policy.check_list(caller, target).render(), None, caller.user)
            case Kind.EVENTS:
                return Plan(policy.check_events(caller, target).render(), None)
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
        if facts is not None and policy.is_owned(facts.labels, caller.user):
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
        if (target.method, route.action) == ("GET", "json") and not target.query and fetched:
            plan.answer = fetched.as_response()  # the look-up was this very request
        if route.action == "exec":
            plan.learn_exec = (facts.id, caller.user)
        if route.action == "rename":
            renamed = await self.upstream.request("POST", plan.target)
            plan.answer = redacted(renamed).as_response()
        return plan

    async def resolve_list_ref(self, caller: Caller, target: Target, key: str, ref: str) -> Target:
        """A container named in a list filter, as the caller's own full id (or as missing)."""
        facts, _ = await self.resolve_container(caller, ref, target.version)
        if facts is None or not policy.is_owned(facts.labels, caller.user):
            hidden = Invisible("container", ref, why="list filter")
            hidden.rebuild = lambda stand: policy.check_list(
                caller, policy.replace_filter(target, key, ref, stand)
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
            owned = found is not None and policy.is_owned(found.labels, caller.user)
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
            created = await self.upstream.request("POST", checked.render(), new_body)
        return Plan(checked.render(), new_body, answer=redacted(created).as_response())

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
            kept = policy.filter_owned_containers(listing, plan.filter_user)
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


async def serve(proxy: Proxy, listen: str, ready: Callable[[], None] | None = None) -> None:
    """Listen on `listen` (mode 0666: identity comes from SO_PEERCRED) until cancelled; a path
    where another listener answers is refused (ds01hub.peer.listen_unix: SocketPathError)."""
    listener = peer.listen_unix(listen, 0o666)
    server = await asyncio.start_unix_server(proxy.handle, sock=listener.sock, limit=MAX_HEAD)
    log.info(
        "ds01hub proxy listening on unix://%s, upstream unix://%s; full access: %s",
        listen,
        proxy.upstream.path,
        proxy.admins.describe(),
    )
    if ready:
        ready()
    try:
        async with server:
            await server.serve_forever()
    finally:
        listener.remove_path()


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
    settings = policy.Settings(bind_roots=tuple(args.bind_root or policy.Settings().bind_roots))
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
    state_dir = Path(args.state_dir)
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        print(f"ds01hub proxy: --state-dir {state_dir}: {error}", file=sys.stderr)
        return 1
    upstream = Upstream(args.upstream)
    proxy = Proxy(
        upstream,
        peer.AdminRule(frozenset(args.admin), frozenset(filter(None, [args.admin_group]))),
        settings,
        limits,
        shared=SharedImages(upstream, tuple(args.shared_image or DEFAULT_SHARED_IMAGES)),
        state_dir=state_dir,
    )

    async def main() -> None:
        task = asyncio.current_task()
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


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "proxy",
        help="run the Docker socket filter proxy (each user sees only their own containers)",
        description=(
            "Serve the Docker Engine API on a unix socket. Each client is identified by "
            "SO_PEERCRED; root, --admin users and members of --admin-group get full access, "
            "everyone else only their own containers (labels ds01.managed=true, "
            "ds01.user=<user>) and a deny-by-default set of endpoints. Users point the docker "
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
        "--bind-root",
        metavar="TEMPLATE",
        action="append",
        help="where users may bind-mount from, with {user} and {home} "
        "(repeatable; default {home} and /workspace/{user})",
    )
    parser.add_argument(
        "--shared-image",
        metavar="REF",
        action="append",
        help="an image every user may run and build FROM, matched by its id (resolved at "
        "start and every 30 s; repeatable; default: "
        + " and ".join(DEFAULT_SHARED_IMAGES)
        + "); images the limits file's allowed_images name are shared with those users too",
    )
    parser.add_argument(
        "--state-dir",
        default="/var/lib/ds01hub/proxy",
        help="the proxy's own directory (created 0700): per-user lock files that make "
        "count-and-create atomic, also between proxy processes (default %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level (denied requests are logged at warning)",
    )
    parser.set_defaults(handler=run)
