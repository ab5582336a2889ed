"""The Docker socket filter proxy: a unix socket in front of the engine that lets each user see
and act on their own containers only.

This is the socket edge. It identifies every client by SO_PEERCRED (uid -> user), parses each
HTTP/1.1 request with llhttp (`httptools`: Node.js's strict parser), asks
`ds01hub.proxy_policy` what it must look up, looks it up on the upstream engine and the file
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
import grp
import json
import logging
import os
import re
import resource
import secrets
import select
import signal
import stat
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httptools

from ds01hub import peer, provenance
from ds01hub import proxy_policy as policy
from ds01hub.labels import escape_name
from ds01hub.provenance import Provenance
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

MAX_HEAD = 64 * 1024  # bytes of one request head (target, names, values)
MAX_HEADERS = 100
READ_SIZE = 256 * 1024
EXEC_CACHE_SIZE = 4096
COALESCE_BYTES = 16 * 1024
COALESCE_SECONDS = 0.0005  # delay added to a streamed line at most (docker logs -f)
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
# the images the platform itself provides (ds01hub.bootstrap's aliases)
DEFAULT_SHARED_IMAGES = ("ds01hub/base:latest", "ds01hub/singleuser:latest")
LIMIT_KEYS = ("Memory", "MemorySwap", "NanoCpus", "PidsLimit", "ShmSize", "IpcMode", "CgroupParent")
# The request headers the engine reads, and the only ones forwarded (spelled as sent). Host is
# always `docker`; framing, Connection and Upgrade are written by the proxy itself.
FORWARDED_HEADERS = ("Content-Type", "User-Agent", "X-Registry-Auth", "X-Registry-Config")
# Headers a request may carry at most once: a second copy is ambiguous (which one counts?).
SINGLE_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "upgrade"}
    | {name.lower() for name in FORWARDED_HEADERS}
)
# Visible ASCII and spaces: no control character (HTAB, CR, LF, NUL, DEL) and no obs-text.
HEADER_VALUE = re.compile(rb"[\x20-\x7e]*")
REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    408: "Request Timeout",
    413: "Payload Too Large",
    429: "Too Many Requests",
    502: "Bad Gateway",
}


class HttpError(Exception):
    """A malformed message: answered with `status` (400 unless said) and the connection closed."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


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

    async def read_some(self, deadline: float | None = None) -> bytes:
        """What is buffered, else the next read (empty at end of stream).

        With a `deadline` (loop time) a read still waiting then raises `HttpError` 408.
        """
        if self.buffer:
            return self.take()
        if deadline is None:
            data = await self.reader.read(READ_SIZE)
        else:
            try:
                async with asyncio.timeout_at(deadline):
                    data = await self.reader.read(READ_SIZE)
            except TimeoutError:
                raise HttpError("the request did not arrive in time", 408) from None
        self.eof = not data
        return data

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


@dataclass
class Request(Message):
    """A client's request head as llhttp parsed and the proxy checked it.

    `length` is the body's Content-Length, None for a chunked body (`chunked`) or no body.
    `upgrade`: a hijack (``Connection: Upgrade``, ``Upgrade: tcp``), never kept alive.
    """

    length: int | None = None
    chunked: bool = False
    upgrade: bool = False
    keep_alive: bool = True

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.length)


class End:
    """The end of a request body in a `RequestParser`'s event queue."""


END = End()


class RequestParser:
    """llhttp over one client connection: the requests and body pieces it found, in order.

    llhttp parses whatever it is fed, pipelined requests included; each becomes a checked
    `Request` followed by its body pieces and `END`, or by the error that stopped parsing.
    Nothing after a parse error is ever looked at. The callbacks are llhttp's (httptools).
    """

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.events: deque[Request | bytes | End | HttpError] = deque()
        self.failed = False
        self.in_message = False  # between the first byte of a request and its end
        self.upgraded: bytes | None = None  # after an upgrade request: the bytes that followed
        self.url = bytearray()
        self.fields: list[tuple[bytes, bytes]] = []
        self.size = 0
        self.in_head = False
        self.head_bytes = 0  # fed while a head was incomplete (httptools buffers a field)

    def feed(self, data: bytes) -> None:
        if self.in_head or not self.in_message:
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD + READ_SIZE:
                self.fail(HttpError(f"request head larger than {MAX_HEAD} bytes"))
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.upgraded = data[upgrade.args[0] :]
        except httptools.HttpParserCallbackError as error:
            cause = error.__context__
            self.fail(cause if isinstance(cause, HttpError) else HttpError(str(error)))
        except httptools.HttpParserError as error:
            self.fail(HttpError(f"malformed request: {error}"))

    def fail(self, error: HttpError) -> None:
        self.failed = True
        self.events.append(error)

    def grow(self, *parts: bytes) -> None:
        self.size += sum(len(p) for p in parts) + 4
        if self.size > MAX_HEAD:
            raise HttpError(f"request head larger than {MAX_HEAD} bytes")

    # llhttp callbacks

    def on_message_begin(self) -> None:
        self.in_message, self.in_head = True, True
        self.url, self.fields, self.size = bytearray(), [], 0

    def on_url(self, url: bytes) -> None:
        self.grow(url)
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:
            raise HttpError("chunked trailer fields are not accepted")
        self.grow(name, value)
        if len(self.fields) >= MAX_HEADERS:
            raise HttpError(f"more than {MAX_HEADERS} header fields")
        self.fields.append((name, value.strip(b" \t")))

    def on_headers_complete(self) -> None:
        self.in_head, self.head_bytes = False, 0
        self.events.append(self.checked_request())

    def on_body(self, data: bytes) -> None:
        self.events.append(data)

    def on_message_complete(self) -> None:
        self.in_message = False
        self.events.append(END)

    def checked_request(self) -> Request:
        """The head llhttp accepted, held to the stricter rules the engine needs.

        llhttp already refused bare CR/LF, NUL, obs-fold, TE with CL, duplicate or signed
        Content-Length and non-final chunked; refused here: any other control character or
        non-ASCII byte, a repeated single header, transfer codings other than `chunked`.
        """
        version = self.parser.get_http_version()
        if version not in ("1.0", "1.1"):
            raise HttpError(f"unsupported protocol version HTTP/{version}")
        if not HEADER_VALUE.fullmatch(self.url):
            raise HttpError("control character or non-ASCII byte in the request target")
        seen: set[str] = set()
        headers = []
        for raw_name, raw_value in self.fields:
            name = raw_name.decode("ascii")  # llhttp allows token characters only
            if not HEADER_VALUE.fullmatch(raw_value):
                raise HttpError(f"control character or non-ASCII byte in header {name}")
            lower = name.lower()
            if lower in SINGLE_HEADERS and lower in seen:
                raise HttpError(f"header {name} given more than once")
            seen.add(lower)
            headers.append((name, raw_value.decode("ascii")))
        request = Request(
            (self.parser.get_method().decode("ascii"), self.url.decode("ascii"), f"HTTP/{version}"),
            headers,
            keep_alive=self.parser.should_keep_alive(),
            upgrade=self.parser.should_upgrade(),
        )
        encoding = request.get("Transfer-Encoding")
        if encoding is not None and encoding.lower() != "chunked":
            raise HttpError(f"Transfer-Encoding {encoding!r} is not accepted (only chunked)")
        request.chunked = encoding is not None
        if (length := request.get("Content-Length")) is not None:
            request.length = int(length)  # llhttp accepted digits only
        if request.upgrade:
            check_upgrade(request)
        return request


def check_upgrade(request: Request) -> None:
    """A hijack is `POST` with `Upgrade: tcp` and a body framed by its length, if any.

    llhttp ends an upgrade request at its head; the proxy then reads the body by the
    Content-Length that llhttp validated, and only that.
    """
    if request.start[0] != "POST" or (request.get("Upgrade") or "").lower() != "tcp":
        raise HttpError("only POST with Upgrade: tcp may switch protocols (docker attach/exec)")
    if request.chunked:
        raise HttpError("an upgrade request's body needs a Content-Length")


class ClientStream(Stream):
    """The client's side: a stream whose bytes reach us only as requests parsed by llhttp."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        super().__init__(reader, writer)
        self.requests = RequestParser()
        self.raw_left: int | None = None  # body bytes of an upgrade request still to read

    async def event(self, deadline: float) -> Request | bytes | End | None:
        """The next parse event, reading more as needed; None at a clean end of stream."""
        events = self.requests.events
        while not events:
            if self.requests.upgraded is not None:
                return None  # the connection is someone else's protocol now
            data = await self.read_some(deadline)
            if not data:
                if self.requests.in_message:
                    raise HttpError("connection closed inside a request")
                return None
            self.requests.feed(data)
        event = events.popleft()
        if isinstance(event, HttpError):
            raise event
        return event

    async def next_request(self, deadline: float) -> Request | None:
        event = await self.event(deadline)
        if event is None:
            return None
        if not isinstance(event, Request):  # pragma: no cover - bodies are read to their END
            raise HttpError("request body where a request head was due")
        if event.upgrade:
            if await self.event(deadline) is not END:  # llhttp ended it at its head
                raise HttpError("malformed upgrade request")
            self.buffer[:0] = self.requests.upgraded or b""
            self.raw_left = event.length or 0
        return event

    async def body_piece(self, deadline: float) -> bytes | None:
        """The next piece of the current request's body; None at its end."""
        if self.raw_left is None:
            event = await self.event(deadline)
            if event is None:
                raise HttpError("connection closed inside a request body")
            if isinstance(event, Request):  # pragma: no cover - llhttp ends a body first
                raise HttpError("request head inside a body")
            return None if event is END else event
        if not self.raw_left:
            return None
        data = await self.read_some(deadline)
        if not data:
            raise HttpError("connection closed inside a request body")
        piece = data[: self.raw_left]
        self.buffer[:0] = data[self.raw_left :]
        self.raw_left -= len(piece)
        return piece


class RequestBody:
    """The client's request body, read at most once: parsed, streamed on, or drained.

    It never reaches the engine in the client's framing: `read` returns it whole (de-chunked),
    `relay` writes it with `framing_headers` of our own. Receiving it is bounded in time: a
    whole body within `timeout` seconds, a streamed one with no pause longer than that.
    """

    def __init__(self, client: ClientStream, request: Request, timeout: float):
        self.client = client
        self.request = request
        self.timeout = timeout
        self.consumed = False  # even without a body: its end is still to be taken
        self.data: bytes | None = None  # what `read` returned, forwarded if nothing replaces it

    def deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.timeout

    async def pieces(self, whole: bool) -> AsyncIterator[bytes]:
        """Body pieces as they come (async iterator); `whole`: one deadline for all of them."""
        self.consumed = True
        deadline = self.deadline()
        while (piece := await self.client.body_piece(deadline)) is not None:
            yield piece
            if not whole:
                deadline = self.deadline()

    async def read(self, limit: int) -> bytes:
        if self.data is not None:
            return self.data
        if self.consumed:
            return b""
        collected = bytearray()
        async for piece in self.pieces(whole=True):
            collected += piece
            if len(collected) > limit:
                raise Denied(413, f"request body larger than {limit} bytes")
        self.data = bytes(collected)
        return self.data

    def framing_headers(self) -> list[tuple[str, str]]:
        """How the body will be framed toward the engine (after `read`, its exact length)."""
        if self.data is not None:
            return [("Content-Length", str(len(self.data)))]
        if self.consumed:
            return []  # drained: nothing left to send
        if self.request.chunked:
            return [("Transfer-Encoding", "chunked")]
        return [("Content-Length", str(self.request.length))] if self.request.length else []

    async def relay(self, upstream: Stream) -> None:
        """Send the body in the framing `framing_headers` announced."""
        if self.data is not None:
            await upstream.write(self.data)
            return
        if self.consumed:
            return
        chunked = self.request.chunked
        async for piece in self.pieces(whole=False):
            if chunked:
                upstream.writer.writelines((b"%x\r\n" % len(piece), piece, b"\r\n"))
                await upstream.writer.drain()
            else:
                await upstream.write(piece)
        if chunked:
            await upstream.write(b"0\r\n\r\n")

    async def drain(self) -> None:
        """Swallow an unread body so the client can read our refusal (not a broken pipe)."""
        if not self.consumed:
            with contextlib.suppress(HttpError, ConnectionError, OSError):
                async for _ in self.pieces(whole=True):
                    pass


@dataclass(frozen=True)
class Framing:
    """How an engine response body is delimited: 'none', 'length', 'chunked', 'eof'."""

    kind: str
    length: int = 0


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


class ResponseParser:
    """llhttp over one engine response: its head, then (when asked for) its de-chunked body."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.reason = b""
        self.fields: list[tuple[str, str]] = []
        self.body = bytearray()
        self.head_done = False
        self.complete = False

    def feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # 101: what follows is the hijacked stream, never parsed
        except httptools.HttpParserError as error:
            raise HttpError(f"malformed response from the engine: {error}", 502) from None

    def message(self) -> Message:
        version = f"HTTP/{self.parser.get_http_version()}"
        status = str(self.parser.get_status_code())
        return Message((version, status, self.reason.decode("latin-1")), self.fields)

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name.decode("latin-1"), value.strip().decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_body(self, data: bytes) -> None:
        self.body += data

    def on_message_complete(self) -> None:
        self.complete = True


async def read_response_head(upstream: Stream) -> tuple[Message, ResponseParser]:
    """The engine's response head (llhttp-parsed); the body stays in `upstream.buffer`.

    The engine is trusted and writes its head in one piece ending in CRLF CRLF; finding that
    end is what lets the body be relayed as it comes rather than parsed piece by piece.
    """
    start = 0
    while (end := upstream.buffer.find(b"\r\n\r\n", start)) < 0:
        if len(upstream.buffer) > MAX_HEAD:
            raise HttpError("response head from the engine too large", 502)
        start = max(0, len(upstream.buffer) - 3)
        if not await upstream.fill():
            raise HttpError("the engine closed without a response", 502)
    parser = ResponseParser()
    parser.feed(upstream.take(end + 4))
    if not parser.head_done:
        raise HttpError("malformed response head from the engine", 502)
    return parser.message(), parser


async def read_response_body(upstream: Stream, parser: ResponseParser, limit: int) -> bytes:
    """The rest of a response, de-chunked: to its framed end, or to the engine's close."""
    while not parser.complete:
        if upstream.buffer:
            parser.feed(upstream.take())
        elif not await upstream.fill():
            break  # a body delimited by the end of the stream (or a truncated one: as is)
        if len(parser.body) > limit:
            raise HttpError(f"response from the engine larger than {limit} bytes", 502)
    return bytes(parser.body)


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

    Bytes the client sends meanwhile (a pipelined request) stay in its buffer, to be parsed
    after this answer. False when the client left before the relay finished.
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


def upstream_headers(request: Request, body: RequestBody) -> list[tuple[str, str]]:
    """The header fields the engine gets: rebuilt from the allow-list, framing of our own.

    Values were checked visible ASCII when the request was parsed
    (`RequestParser.checked_request`); Host is fixed; Connection says close but for a hijack.
    """
    headers = [("Host", "docker")]
    headers += [(name, value) for name in FORWARDED_HEADERS if (value := request.get(name))]
    headers += body.framing_headers()
    if request.upgrade:
        return [*headers, ("Connection", "Upgrade"), ("Upgrade", "tcp")]
    return [*headers, ("Connection", "close")]


def render_head(start: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [start, *(f"{name}: {value}" for name, value in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def describe_headers(headers: list[tuple[str, str]]) -> str:
    """Header names for the log, with the values that frame or type the body (no secrets)."""
    shown = ("content-type", "content-length", "transfer-encoding", "connection", "upgrade")
    return ",".join(f"{k}={v}" if k.lower() in shown else k for k, v in headers)


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
    create_locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    # asyncio's stream protocol forgets its task when the peer disconnects; keep them alive
    tasks: set[asyncio.Task] = field(default_factory=set)
    # exec id -> (container id, owner): immutable facts, so exec start/inspect/resize need no
    # look-ups once an exec is known (learned from exec create answers and from look-ups)
    exec_owners: dict[str, tuple[str, str]] = field(default_factory=dict)
    header_timeout: float = HEADER_TIMEOUT  # seconds for a request head (and a body's pauses)
    max_connections_per_user: int = MAX_CONNECTIONS_PER_USER
    open_connections: dict[int, int] = field(default_factory=dict)  # uid -> connections now

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
    try:
        trust = provenance.load(args.hub_state_dir)
    except provenance.ProvenanceError as error:
        print(f"ds01hub proxy: --hub-state-dir: {error}", file=sys.stderr)
        return 1
    settings = policy.Settings(
        bind_roots=tuple(args.bind_root or policy.Settings().bind_roots), trust=trust
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


def positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    """An argparse type: a number of `kind` above zero (else a usage error naming it)."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} is not above zero")
        return value

    return parse


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
        "--hub-state-dir",
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
        "--header-timeout",
        metavar="SECONDS",
        type=positive(float),
        default=HEADER_TIMEOUT,
        help="close a connection whose request head (also the next one on a kept-alive "
        "connection) has not arrived within this time, or whose request body pauses for "
        "longer; answers being streamed (logs -f, events, attach) are never timed out "
        "(default %(default)g)",
    )
    parser.add_argument(
        "--max-connections-per-user",
        metavar="N",
        type=positive(int),
        default=MAX_CONNECTIONS_PER_USER,
        help="open connections one user (uid) may hold, streams included; the next ones are "
        "answered 429 with a message naming this limit (default %(default)d)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level (every forwarded request is logged at info, as sent to the engine; "
        "denied requests at warning)",
    )
    parser.set_defaults(handler=run)
