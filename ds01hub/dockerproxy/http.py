"""HTTP/1.1 framing for the socket proxy, strict: llhttp (`httptools`, Node.js's parser) parses
every head, nothing a client wrote in a head is forwarded as bytes, and bodies are re-framed by
the proxy itself (`ds01hub.dockerproxy.server` says why).

Heads with control characters, bare CR or LF, obs-fold, duplicate or conflicting framing
headers or transfer codings other than ``chunked`` are refused (`HttpError`, 400) and the
connection closed. Upstream requests carry only the `FORWARDED_HEADERS`, with checked values.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import select
from collections import deque
from collections.abc import AsyncIterator, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

import httptools

from ds01hub.dockerproxy.policy import (
    Denied,
)
from ds01hub.errors import Ds01hubError

MAX_HEAD = 64 * 1024  # bytes of one request head (target, names, values)


MAX_HEADERS = 100


READ_SIZE = 256 * 1024


COALESCE_BYTES = 16 * 1024


COALESCE_SECONDS = 0.0005  # delay added to a streamed line at most (docker logs -f)


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


class HttpError(Ds01hubError):
    """A malformed message: answered with `status` (400 unless said) and the connection closed."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message, status=status)


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
