"""The socket proxy's HTTP layer: strict framing, rebuilt requests, timeouts, the connection cap.

Fast tests drive the real `Proxy` over a socket pair with a fixed caller (no SO_PEERCRED, no
root) in front of `FakeEngine`, a unix-socket server that records every byte the proxy sends
and parses it the way the engine's Go server would (a header line ends at a bare LF too, so a
request hidden in a header value would show up there as a second request). The differential
property: the engine sees exactly the requests the policy allowed (plus the proxy's own
look-ups), each alone on its connection, rebuilt from the header allow-list -- never a
request that the proxy did not parse and judge. Hypothesis fuzzes the client side.

The tests at the end are the known attacks end to end: real Unix users, the real docker CLI
and raw sockets, a real `ds01hub proxy` and the real engine (markers docker + root).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import re
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from harness.inspect_docs import TRUST
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_proxy import (  # the end-to-end harness of the proxy's own suite
    IMAGE,
    RAW_CLIENT,
    RUN,
    admin_docker,
    busybox_image,  # noqa: F401 -- a fixture `users` needs
    docker_as,
    proxy_process,
    spawner_label_args,
    users,  # noqa: F401 -- fixture: two real Unix users
)

from ds01hub import labels, peer
from ds01hub.dockerproxy import policy
from ds01hub.dockerproxy.http import FORWARDED_HEADERS, ClientStream
from ds01hub.dockerproxy.server import Plan, Proxy, Upstream
from ds01hub.peer import Caller

ALICE = Caller(4242, 4242, "alice", "/nonexistent/alice", ("alice",))
ROOT = Caller(0, 0, "root", "/root", ("root",), admin=True)
ALLOWED_NAMES = {"host", "connection", "upgrade", "content-length", "transfer-encoding"} | {
    name.lower() for name in FORWARDED_HEADERS
}
CREATE_ROOT = json.dumps(
    {"Image": "busybox", "HostConfig": {"Privileged": True, "Binds": ["/:/host"]}}
).encode()


# --------------------------------------------------------------------------- the fake engine


@dataclass
class GoRequest:
    """One request as the engine's Go server would read it, with anything a strict reader
    would call wrong noted in `anomalies`."""

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    anomalies: list[str] = field(default_factory=list)
    complete: bool = True  # False: the head, and the connection ended inside the body

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return values[-1] if values else None


class Incomplete(Exception):
    pass


def go_read_line(data: bytes, pos: int, anomalies: list[str]) -> tuple[bytes, int]:
    """A line as Go's textproto reads it: up to LF, one CR before it dropped."""
    end = data.find(b"\n", pos)
    if end < 0:
        raise Incomplete
    line = data[pos:end]
    if not line.endswith(b"\r"):
        anomalies.append(f"bare LF after {line[:40]!r}")
    line = line.removesuffix(b"\r")
    if b"\r" in line:
        anomalies.append(f"bare CR in {line[:40]!r}")
    return line, end + 1


def go_parse(data: bytes, pos: int = 0) -> tuple[GoRequest, int]:
    """One request from `data` at `pos`, leniently (as Go does), noting what is not strict.

    `Incomplete` while the head is; a request with `complete` False when its body is.
    """
    anomalies: list[str] = []
    line, pos = go_read_line(data, pos, anomalies)
    parts = line.decode("latin-1").split(" ")
    if len(parts) != 3:
        anomalies.append(f"request line {line[:60]!r}")
        parts = (parts + ["", "", ""])[:3]
    headers: list[tuple[str, str]] = []
    while True:
        line, pos = go_read_line(data, pos, anomalies)
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            anomalies.append("obs-fold")
        if re.search(rb"[\x00-\x1f\x7f-\xff]", line):
            anomalies.append(f"control or non-ASCII byte in {line[:40]!r}")
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name, value.strip(" \t")))
    request = GoRequest(parts[0], parts[1], parts[2], headers, b"", anomalies)
    names = [k.lower() for k, _ in headers]
    for name in set(names):
        if names.count(name) > 1:
            anomalies.append(f"header {name} twice")
    try:
        return request, go_parse_body(data, pos, request)
    except Incomplete:
        request.complete = False
        return request, len(data)


def go_parse_body(data: bytes, pos: int, request: GoRequest) -> int:
    anomalies = request.anomalies
    encoding, length = request.header("Transfer-Encoding"), request.header("Content-Length")
    if encoding is not None and length is not None:
        anomalies.append("Transfer-Encoding with Content-Length")
    if encoding is not None:
        if encoding != "chunked":
            anomalies.append(f"Transfer-Encoding {encoding!r}")
        body = bytearray()
        while True:
            size_line, pos = go_read_line(data, pos, anomalies)
            if not re.fullmatch(rb"[0-9a-f]+", size_line):
                anomalies.append(f"chunk size line {size_line[:20]!r}")
                size_line = b"0"
            size = int(size_line, 16)
            if size == 0:
                trailer, pos = go_read_line(data, pos, anomalies)
                if trailer:
                    anomalies.append("trailer")
                break
            if len(data) < pos + size + 2:
                raise Incomplete
            body += data[pos : pos + size]
            if data[pos + size : pos + size + 2] != b"\r\n":
                anomalies.append("chunk not followed by CRLF")
            pos += size + 2
        request.body = bytes(body)
    elif length is not None:
        if not length.isdigit():
            anomalies.append(f"Content-Length {length!r}")
            length = "0"
        if len(data) < pos + int(length):
            raise Incomplete
        request.body, pos = data[pos : pos + int(length)], pos + int(length)
    return pos


def go_parse_all(data: bytes) -> tuple[list[GoRequest], bytes]:
    """Every request in `data` (as a kept-alive Go server would go on reading), and the rest."""
    requests, pos = [], 0
    while pos < len(data):
        try:
            request, pos = go_parse(data, pos)
        except Incomplete:
            break
        requests.append(request)
    return requests, data[pos:]


@dataclass
class Connection:
    received: bytearray = field(default_factory=bytearray)

    def requests(self) -> tuple[list[GoRequest], bytes]:
        return go_parse_all(bytes(self.received))


class FakeEngine:
    """A recording stand-in for the engine on a unix socket.

    It answers the first request of each connection (200 and a little JSON, chunked for the
    container list like Go; 404 for look-ups of containers and images; 101 and an echo for
    ``Upgrade: tcp``), then half-closes and records everything else the proxy sends until the
    proxy closes: a second request on a connection would be recorded, never lost.
    """

    def __init__(self, path: str):
        self.path = path
        self.connections: list[Connection] = []
        self.server: asyncio.AbstractServer | None = None
        self.handlers: set[asyncio.Task] = set()

    async def __aenter__(self) -> FakeEngine:
        self.server = await asyncio.start_unix_server(self.serve, self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server
        self.server.close()
        if self.handlers:  # each ends when the proxy closes its side
            await asyncio.wait(self.handlers, timeout=10)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = Connection()
        self.connections.append(connection)
        task = asyncio.current_task()
        assert task
        self.handlers.add(task)
        try:
            while True:
                try:
                    request, _ = go_parse(bytes(connection.received))
                    if request.complete:
                        break
                    raise Incomplete
                except Incomplete:
                    data = await reader.read(65536)
                    if not data:
                        return
                    connection.received += data
            if request.header("Upgrade") == "tcp":
                writer.write(UPGRADED)
                head_and_body = len(connection.received)
                writer.write(b"echo:")
                while data := await reader.read(65536):
                    connection.received += data
                    writer.write(data)
                    await writer.drain()
                del connection.received[head_and_body:]  # the stream, not a request
                writer.close()
                return
            if "/events" in request.target:  # a stream, slower than any head timeout here
                writer.write(STREAM_HEAD + b"6\r\nfirst\n\r\n")
                await writer.drain()
                await asyncio.sleep(0.5)
                writer.write(b"5\r\nlast\n\r\n0\r\n\r\n")
            else:
                writer.write(answer(request))
            await writer.drain()
            writer.write_eof()
            while data := await reader.read(65536):
                connection.received += data
        except ConnectionError:
            pass
        finally:
            writer.close()


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
)
OWN_IMAGE = "sha256:" + "a" * 64
UPGRADED = b"HTTP/1.1 101 UPGRADED\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n"
#: alice's container "web", as ds01hub labels it (signed with the unit tests' key)
ALICE_WEB = TRUST.sign(
    labels.container_labels(user="alice", project=None, group=None, priority=0), "web"
)


def answer(request: GoRequest) -> bytes:
    path = request.target.split("?")[0]
    if re.search(r"/images/ds01-alice/app(:latest)?/json$", path):  # alice's own image
        body = json.dumps({"Id": OWN_IMAGE, "RepoTags": ["ds01-alice/app:latest"]}).encode()
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    if re.search(r"/(containers|images|exec)/.+/json$", path):
        body = b'{"message":"No such object"}'
        return b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    if path.endswith("/containers/json"):
        listing = json.dumps([{"Id": "abc", "Names": ["/web"], "Labels": ALICE_WEB}]).encode()
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked"
            b"\r\nConnection: close\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(listing), listing)
        )
    body = json.dumps({"seen": request.method + " " + request.target}).encode()
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (len(body), body)
    )


# --------------------------------------------------------------------------- the proxy, recorded


class RecordingProxy(Proxy):
    """The real proxy, noting what its policy allowed and which look-ups it made."""

    def __init__(self, upstream: Upstream, **options: object):
        super().__init__(upstream, **options)  # type: ignore[arg-type]
        self.judged: list[tuple[str, str]] = []  # (method, raw target) given to the policy
        self.expected: list[tuple[str, str]] = []  # what the engine may see, in order
        request = upstream.request  # every look-up and every request the proxy answers itself

        async def recorded(method: str, path: str, body: bytes | None = None):
            self.expected.append((method, path))
            return await request(method, path, body)

        upstream.request = recorded  # type: ignore[method-assign]

    async def plan(self, caller, request, body) -> Plan:
        self.judged.append((request.start[0], request.start[1]))
        plan = await super().plan(caller, request, body)
        if plan.answer is None:
            canonical = policy.parse_target(request.start[0], plan.target).render()
            self.expected.append((request.start[0], canonical))
        return plan


@dataclass
class Outcome:
    proxy: RecordingProxy
    engine: FakeEngine
    answers: bytes

    def statuses(self) -> list[int]:
        return [int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3}) ", self.answers)]

    def engine_requests(self) -> list[GoRequest]:
        """The engine's requests; each connection must hold exactly one, cleanly framed.

        Only the last may be cut short inside its body (a streamed body whose client broke
        off or sent a malformed chunk): the engine never gets it whole.
        """
        seen = []
        for connection in self.engine.connections:
            requests, rest = connection.requests()
            assert len(requests) == 1 and not rest, (bytes(connection.received), requests)
            seen.append(requests[0])
        assert all(r.complete for r in seen[:-1]), seen
        return seen


async def exchange(
    tmp_path: Path,
    data: bytes | Callable[[socket.socket], Awaitable[None]],
    caller: Caller | peer.IdentityError = ALICE,
    **options: object,
) -> Outcome:
    """Send `data` (or run a client coroutine) on one connection; the whole exchange."""
    loop = asyncio.get_running_loop()
    async with FakeEngine(str(tmp_path / "engine.sock")) as engine:
        options.setdefault("settings", policy.Settings(trust=TRUST))
        proxy = RecordingProxy(Upstream(engine.path, TRUST), **options)
        ours, theirs = socket.socketpair(socket.AF_UNIX)
        ours.setblocking(False)
        reader, writer = await asyncio.open_unix_connection(sock=theirs)
        client = ClientStream(reader, writer)

        async def serve() -> None:
            try:
                uid = caller.uid if isinstance(caller, Caller) else 9999
                await proxy.serve_connection(client, caller, uid)
            finally:
                client.close()

        serving = asyncio.create_task(serve())
        if callable(data):
            await data(ours)
        else:
            try:
                await loop.sock_sendall(ours, data)
                ours.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused (and closed) before it had all been sent
        answers = bytearray()
        with contextlib.suppress(ConnectionResetError):  # closed with our bytes unread
            while chunk := await loop.sock_recv(ours, 65536):
                answers += chunk
        await serving
        ours.close()
        return Outcome(proxy, engine, bytes(answers))


def run(coro: Awaitable[Outcome]) -> Outcome:
    return asyncio.run(coro)  # type: ignore[arg-type]


def assert_faithful(outcome: Outcome) -> None:
    """The differential property: the engine saw exactly what the proxy judged and allowed
    (and its own look-ups), one request per connection, rebuilt from the allow-list."""
    seen = outcome.engine_requests()
    assert [(r.method, r.target) for r in seen] == outcome.proxy.expected
    for request in seen:
        assert not request.anomalies, request
        assert request.version == "HTTP/1.1"
        assert {k.lower() for k, _ in request.headers} <= ALLOWED_NAMES, request.headers
        assert request.header("Host") == "docker"


def assert_never_whole(outcome: Outcome) -> None:
    """A body cut short (or malformed) is never completed toward the engine."""
    assert not any(r.complete for r in outcome.engine_requests())


def get(path: str, *headers: str, method: str = "GET") -> bytes:
    return "\r\n".join([f"{method} {path} HTTP/1.1", "Host: docker", *headers, "", ""]).encode()


def post(path: str, body: bytes, *headers: str, chunks: list[int] | None = None) -> bytes:
    if chunks is None:
        return get(path, f"Content-Length: {len(body)}", *headers, method="POST") + body
    pieces, pos = [], 0
    for size in [*chunks, len(body)]:
        piece, pos = body[pos : pos + size], pos + size
        if piece:
            pieces.append(b"%x\r\n%s\r\n" % (len(piece), piece))
    framed = b"".join(pieces) + b"0\r\n\r\n"
    return get(path, "Transfer-Encoding: chunked", *headers, method="POST") + framed


HIDDEN = b"POST /v1.41/containers/create HTTP/1.1\r\nHost: d\r\nContent-Length: %d\r\n\r\n%s" % (
    len(CREATE_ROOT),
    CREATE_ROOT,
)


# --------------------------------------------------------------------------- framing, unit


def test_a_plain_request_is_rebuilt_from_the_allow_list(tmp_path):
    request = get(
        "/v1.41//version/.?x=1+2",
        "User-Agent: Docker-Client/28.2.2 (linux)",
        "X-Secret: must not pass",
        "Cookie: a=b",
        "Connection: keep-alive",
    )
    outcome = run(exchange(tmp_path, request))
    assert outcome.statuses() == [200]
    (seen,) = outcome.engine_requests()
    assert seen.target == "/v1.41/version?x=1%202"
    assert seen.headers == [
        ("Host", "docker"),
        ("User-Agent", "Docker-Client/28.2.2 (linux)"),
        ("Connection", "close"),
    ]
    assert_faithful(outcome)


def test_admins_targets_are_parsed_and_rendered_too(tmp_path):
    outcome = run(exchange(tmp_path, get("/v1.41/containers//x/../json?all=1&a=%41"), ROOT))
    (seen,) = outcome.engine_requests()
    assert seen.target == "/v1.41/containers/json?all=1&a=A"
    assert_faithful(outcome)


def test_pipelined_requests_are_each_parsed_and_sent_alone(tmp_path):
    pipeline = get("/_ping") + get("/v1.41/version") + get("/_ping", method="HEAD")
    outcome = run(exchange(tmp_path, pipeline))
    assert outcome.statuses() == [200, 200, 200]
    assert [r.target for r in outcome.engine_requests()] == ["/_ping", "/v1.41/version", "/_ping"]
    assert_faithful(outcome)


@pytest.mark.parametrize(
    "request_bytes",
    [
        # a bare LF ends a header line for Go: a second request hidden in a value
        get("/_ping", "X-A: a\nGET /v1.41/containers/json HTTP/1.1"),
        get("/_ping", "X-A: a\n\n" + HIDDEN.decode()),
        get("/_ping", "X-A: a\r\n\n" + HIDDEN.decode()),
        get("/_ping", "X-A: a\n\r\n" + HIDDEN.decode()),
        get("/_ping").replace(b"\r\n\r\n", b"\n\n") + HIDDEN,
        get("/_ping", "User-Agent: x\nContent-Length: 10"),
        # a CR alone, NUL, other control characters, DEL, non-ASCII
        get("/_ping", "X-A: a\rb"),
        get("/_ping", "X-A: a\r\rb"),
        get("/_ping", "X-A: a\x00b"),
        get("/_ping", "X-A: a\x0bb"),
        get("/_ping", "X-A: a\tb"),
        get("/_ping", "X-A: a\x7fb"),
        get("/_ping", "X-A: caf\u00e9"),  # UTF-8
        get("/_ping\x00x"),
        # obs-fold
        get("/_ping", "X-A: a", " folded"),
        get("/_ping", "X-A: a", "\tfolded"),
        get("/_ping", "User-Agent: a", " \n" + HIDDEN.decode()),
    ],
    ids=lambda b: repr(b[:60]),
)
def test_control_characters_and_folding_are_refused(tmp_path, request_bytes):
    outcome = run(exchange(tmp_path, request_bytes))
    assert outcome.statuses() == [400]
    assert outcome.engine.connections == []
    assert outcome.proxy.judged == []


def test_a_non_ascii_value_is_refused(tmp_path):
    outcome = run(exchange(tmp_path, get("/_ping", "X-A: caf").replace(b"caf", b"caf\xe9")))
    assert outcome.statuses() == [400]
    assert outcome.engine.connections == []


@pytest.mark.parametrize(
    "headers",
    [
        ["Content-Length: 4", "Transfer-Encoding: chunked"],
        ["Transfer-Encoding: chunked", "Content-Length: 4"],
        ["Transfer-Encoding: chunked", "Transfer-Encoding: chunked"],
        ["Transfer-Encoding: xchunked"],
        ["Transfer-Encoding: chunked, identity"],
        ["Transfer-Encoding: identity, chunked"],
        ["Transfer-Encoding: gzip, chunked"],
        ["Transfer-Encoding: chunked", "Transfer-Encoding: identity"],
        ["Transfer-Encoding : chunked"],
        ["Transfer-Encoding:\x0bchunked"],
        ["Content-Length: +4"],
        ["Content-Length: -4"],
        ["Content-Length: 4,4"],
        ["Content-Length: 4 4"],
        ["Content-Length: 0x4"],
        ["Content-Length: 4", "Content-Length: 4"],
        ["Content-Length: 4", "Content-Length: 5"],
        ["Content-Length: 99999999999999999999999"],
        ["Host: a", "Host: b"],
        ["Content-Type: application/json", "Content-Type: text/plain"],
        ["Upgrade: tcp", "Connection: Upgrade", "Upgrade: tcp"],
    ],
)
def test_ambiguous_framing_is_refused(tmp_path, headers):
    request = get("/v1.41/build", *headers, method="POST") + b"0\r\n\r\n"
    outcome = run(exchange(tmp_path, request, ROOT))
    assert outcome.statuses() == [400]
    assert outcome.engine.connections == []


def test_content_length_with_surrounding_spaces_is_one_number(tmp_path):
    request = get("/v1.41/build", "Content-Length:   4  ", method="POST") + b"tar!"
    outcome = run(exchange(tmp_path, request, ROOT))
    (seen,) = outcome.engine_requests()
    assert seen.header("Content-Length") == "4" and seen.body == b"tar!"


@pytest.mark.parametrize("chunks", [[], [1], [1, 1, 1], [5, 100, 3], [4096]])
def test_chunked_bodies_are_reframed(tmp_path, chunks):
    body = bytes(range(256)) * 20
    outcome = run(exchange(tmp_path, post("/v1.41/build", body, chunks=chunks), ROOT))
    (seen,) = outcome.engine_requests()
    assert seen.header("Transfer-Encoding") == "chunked" and seen.body == body
    assert_faithful(outcome)


def test_chunk_extensions_are_dropped_and_trailers_refused(tmp_path):
    extended = get("/v1.41/build", "Transfer-Encoding: chunked", method="POST")
    extended += b"4;name=value;x\r\ntar!\r\n0;last\r\n\r\n"
    outcome = run(exchange(tmp_path, extended, ROOT))
    (seen,) = outcome.engine_requests()
    assert seen.body == b"tar!" and b";" not in outcome.engine.connections[0].received
    trailer = get("/v1.41/build", "Transfer-Encoding: chunked", method="POST")
    trailer += b"4\r\ntar!\r\n0\r\nX-Trailer: 1\r\n\r\n"
    outcome = run(exchange(tmp_path, trailer, ROOT))
    assert outcome.statuses() == [400]


@pytest.mark.parametrize(
    "chunk",
    [
        b"fffffffffffffffffffff\r\nx",
        b"-1\r\nx\r\n0\r\n\r\n",
        b"+4\r\ntar!\r\n0\r\n\r\n",
        b"4\r\ntar!XX0\r\n\r\n",
        b"4\ntar!\r\n0\r\n\r\n",
        b"4 \r\ntar!\r\n0\r\n\r\n",
        b"0x4\r\ntar!\r\n0\r\n\r\n",
    ],
)
def test_malformed_chunks_are_refused(tmp_path, chunk):
    request = get("/v1.41/build", "Transfer-Encoding: chunked", method="POST") + chunk
    outcome = run(exchange(tmp_path, request, ROOT))
    assert outcome.statuses()[-1] == 400
    assert_never_whole(outcome)


def test_a_body_shorter_than_its_length_never_completes(tmp_path):
    request = get("/v1.41/build", "Content-Length: 100", method="POST") + b"tar"
    outcome = run(exchange(tmp_path, request, ROOT))
    assert outcome.statuses() == [400]
    assert_never_whole(outcome)


def test_a_denied_request_stops_the_pipeline(tmp_path):
    pipeline = get("/_ping") + post("/v1.41/containers/create", CREATE_ROOT) + get("/_ping")
    outcome = run(exchange(tmp_path, pipeline))
    assert outcome.statuses() == [200, 403]
    seen = [r.target for r in outcome.engine_requests()]  # the ping and the policy's look-ups
    assert seen[0] == "/_ping" and not any("create" in target for target in seen)
    assert_faithful(outcome)


def test_a_create_body_is_the_checked_one(tmp_path):
    body = json.dumps({"Image": "ds01-alice/app:latest", "Labels": {"ds01.gpus": "0"}}).encode()
    outcome = run(exchange(tmp_path, post("/v1.41/containers/create", body, chunks=[3])))
    (seen,) = [r for r in outcome.engine_requests() if r.method == "POST"]  # not the look-ups
    sent = json.loads(seen.body)
    assert seen.header("Content-Length") == str(len(seen.body))
    assert sent["Labels"]["ds01.user"] == "alice" and sent["Labels"]["ds01.gpus"] == ""
    assert TRUST.verify(sent["Labels"], seen.target.split("name=")[1])
    assert_faithful(outcome)


def test_the_container_list_is_reframed_after_filtering(tmp_path):
    outcome = run(exchange(tmp_path, get("/v1.41/containers/json?all=1")))
    head, _, body = outcome.answers.partition(b"\r\n\r\n")
    assert b"Content-Length: %d" % len(body) in head and b"chunked" not in head
    assert json.loads(body)[0]["Id"] == "abc"
    assert_faithful(outcome)


def test_an_upgrade_sends_the_body_then_splices(tmp_path):
    async def client(sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        body = b'{"Detach":false,"Tty":true}'
        request = get(
            "/v1.41/build",  # an admin: any endpoint; the fake engine upgrades anything
            "Connection: Upgrade",
            "Upgrade: tcp",
            f"Content-Length: {len(body)}",
            method="POST",
        )
        await loop.sock_sendall(sock, request + body + b"stdin bytes")
        sock.shutdown(socket.SHUT_WR)

    outcome = run(exchange(tmp_path, client, ROOT))
    assert outcome.answers.startswith(b"HTTP/1.1 101 ")
    assert outcome.answers.endswith(b"echo:stdin bytes")
    (seen,) = outcome.engine_requests()
    assert seen.header("Upgrade") == "tcp" and seen.body == b'{"Detach":false,"Tty":true}'


@pytest.mark.parametrize(
    "headers",
    [
        ["Connection: Upgrade", "Upgrade: websocket"],
        ["Connection: Upgrade", "Upgrade: h2c"],
        ["Connection: Upgrade", "Upgrade: tcp", "Transfer-Encoding: chunked"],
    ],
)
def test_other_upgrades_are_refused(tmp_path, headers):
    outcome = run(exchange(tmp_path, get("/v1.41/build", *headers, method="POST"), ROOT))
    assert outcome.statuses() == [400]
    assert outcome.engine.connections == []


def test_an_oversized_head_is_refused(tmp_path):
    outcome = run(exchange(tmp_path, get("/_ping", "X-Big: " + "a" * 100_000)))
    assert outcome.statuses() == [400]
    many = [f"X-{i}: {i}" for i in range(200)]
    assert run(exchange(tmp_path, get("/_ping", *many))).statuses() == [400]
    endless = b"GET /_ping HTTP/1.1\r\nX-Endless: " + b"a" * 2_000_000  # never completed
    outcome = run(exchange(tmp_path, endless))
    assert outcome.statuses() == [400] and b"larger than" in outcome.answers


def test_a_refused_identity_is_refused(tmp_path):
    refused = peer.IdentityError("uid 9999 has no account on this host", status=404)
    outcome = run(exchange(tmp_path, get("/_ping"), refused))
    assert outcome.statuses() == [403]
    assert outcome.engine.connections == []


# --------------------------------------------------------------------------- time and caps


def test_a_slow_head_is_answered_408_and_closed(tmp_path):
    async def slowloris(sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, b"GET /_ping HTTP/1.1\r\nHost: d\r\nX-Slow: ")
        # never finishes the head; the proxy must close the connection by itself

    outcome = run(exchange(tmp_path, slowloris, header_timeout=0.2))
    assert outcome.statuses() == [408]
    assert outcome.engine.connections == []


def test_an_idle_kept_alive_connection_is_closed_quietly(tmp_path):
    async def idle(sock: socket.socket) -> None:
        await asyncio.get_running_loop().sock_sendall(sock, get("/_ping"))

    outcome = run(exchange(tmp_path, idle, header_timeout=0.2))
    assert outcome.statuses() == [200]  # answered, then closed without a 408


def test_a_stalled_body_is_closed(tmp_path):
    async def stall(sock: socket.socket) -> None:
        request = get("/v1.41/build", "Content-Length: 100", method="POST") + b"tar"
        await asyncio.get_running_loop().sock_sendall(sock, request)

    outcome = run(exchange(tmp_path, stall, ROOT, header_timeout=0.2))
    assert outcome.statuses()[-1:] in ([408], [])  # the engine answered first, or we did
    assert_never_whole(outcome)


def test_a_stream_being_answered_is_not_timed_out(tmp_path):
    """`docker events`: the engine pauses longer than the head timeout; the stream goes on."""
    outcome = run(exchange(tmp_path, get("/v1.41/events"), header_timeout=0.2))
    assert outcome.statuses() == [200]
    assert outcome.answers.endswith(b"5\r\nlast\n\r\n0\r\n\r\n")


async def test_the_connection_cap_answers_429_and_frees_slots(tmp_path, monkeypatch):
    """Over the cap: 429 naming the limit; far over it: closed at once; slots come back."""
    monkeypatch.setattr("ds01hub.peer.identify", lambda creds, admins: ALICE)
    monkeypatch.setattr(
        "ds01hub.dockerproxy.server.OVER_CAP_HEAD_SECONDS", 60
    )  # no expiry mid-test
    async with FakeEngine(str(tmp_path / "engine.sock")) as engine:
        proxy = Proxy(Upstream(engine.path), header_timeout=30, max_connections_per_user=3)
        listen = str(tmp_path / "proxy.sock")
        server = await asyncio.start_unix_server(proxy.handle, listen)
        held = [await asyncio.open_unix_connection(listen) for _ in range(3)]
        for _, writer in held:
            writer.write(b"GET /_ping HTTP/1.1\r\n")  # half a head: held open
        await wait_for(lambda: proxy.open_connections.get(os.getuid()) == 3)

        reader, writer = await asyncio.open_unix_connection(listen)
        writer.write(get("/_ping"))
        refused = await reader.read()
        assert refused.startswith(b"HTTP/1.1 429 ")
        message = json.loads(refused.partition(b"\r\n\r\n")[2])["message"]
        assert "limit is 3 per user" in message and "--max-connections-per-user" in message

        extra = [await asyncio.open_unix_connection(listen) for _ in range(3)]
        await wait_for(lambda: proxy.open_connections.get(os.getuid()) == 6)
        reader, writer = await asyncio.open_unix_connection(listen)  # the 7th: 2x the cap
        assert await reader.read() == b""  # closed without waiting for anything
        for _, w in extra + held:
            w.close()
        await wait_for(lambda: os.getuid() not in proxy.open_connections)
        reader, writer = await asyncio.open_unix_connection(listen)
        writer.write(get("/_ping"))
        assert (await reader.readline()).startswith(b"HTTP/1.1 200 ")
        writer.close()
        server.close()


async def wait_for(condition: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    "option",
    [
        ["--header-timeout", "0"],
        ["--header-timeout", "soon"],
        ["--max-connections-per-user", "0"],
        ["--max-connections-per-user", "1.5"],
    ],
)
def test_bad_limits_are_usage_errors(tmp_path, option):
    command = [sys.executable, "-m", "ds01hub.cli.admin", "proxy", "--listen", "x.sock", *option]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert option[0] in result.stderr and option[1] in result.stderr


def test_help_documents_the_limits():
    command = [sys.executable, "-m", "ds01hub.cli.admin", "proxy", "--help"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert "--header-timeout SECONDS" in result.stdout and "(default 30)" in result.stdout
    assert "--max-connections-per-user N" in result.stdout and "(default 64)" in result.stdout


def test_open_files_limit_is_raised(monkeypatch):
    import resource

    from ds01hub.dockerproxy.server import raise_open_files_limit

    calls = []
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 524288))
    monkeypatch.setattr(resource, "setrlimit", lambda which, limits: calls.append(limits))
    raise_open_files_limit()
    assert calls == [(524288, 524288)]


# --------------------------------------------------------------------------- differential fuzz

VALUE_CHARS = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30)
# byte sequences that make a head invalid wherever they appear in a header value
POISON = [
    b"\n",
    b"\r",
    b"\x00",
    b"a\tb",  # HTAB is only optional whitespace around a value (dropped), never inside it
    b"\x7f",
    b"\xff",
    b"\x01",
    b"\n\n" + HIDDEN,
    b"\r\n\n" + HIDDEN,
    b"\n\r\n" + HIDDEN,
    b"\r\n " + b"folded",
    b"\n" + b"Transfer-Encoding: chunked",
]
BAD_FRAMING = [
    [b"Content-Length: 3", b"Transfer-Encoding: chunked"],
    [b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"],
    [b"Transfer-Encoding: xchunked"],
    [b"Transfer-Encoding: chunked, identity"],
    [b"Content-Length: +3"],
    [b"Content-Length: 3,3"],
    [b"Content-Length: 3", b"Content-Length: 3"],
    [b"Content-Length: 3", b"Content-Length: 4"],
]
ENDPOINTS = [
    ("GET", "/_ping", None),
    ("GET", "/v1.41/version", None),
    ("HEAD", "/_ping", None),
    ("GET", "/v1.41/containers/json?all=1", None),
    ("POST", "/v1.41/containers/create", CREATE_ROOT),
    ("POST", "/v1.41/build", b"a tar, say"),
]


@dataclass
class Spec:
    """One generated request and whether the proxy must accept its framing."""

    data: bytes
    valid: bool


@st.composite
def request_specs(draw: st.DrawFn) -> Spec:
    method, path, body = draw(st.sampled_from(ENDPOINTS))
    valid = True
    headers = [b"Host: docker"]
    names = [b"X-Note", b"User-Agent", b"Accept", b"Cookie"]
    for name in draw(st.lists(st.sampled_from(names), max_size=3, unique=True)):
        value = draw(VALUE_CHARS).strip().encode()
        if draw(st.integers(0, 4)) == 0:
            cut = draw(st.integers(0, len(value)))
            value = value[:cut] + draw(st.sampled_from(POISON)) + value[cut:]
            valid = False
        headers.append(name + b": " + value)
    if body is not None and method == "POST":
        headers.append(b"Content-Type: application/json")
    if body is None:
        payload = b""
    elif draw(st.booleans()):
        headers.append(b"Content-Length: %d" % len(body))
        payload = body
    else:
        headers.append(b"Transfer-Encoding: chunked")
        sizes = draw(st.lists(st.integers(1, 8), max_size=4))
        pieces, pos = [], 0
        for size in [*sizes, len(body)]:
            if piece := body[pos : pos + size]:
                ext = b";x=1" if draw(st.integers(0, 5)) == 0 else b""
                pieces.append(b"%x%s\r\n%s\r\n" % (len(piece), ext, piece))
            pos += size
        payload = b"".join(pieces) + b"0\r\n\r\n"
    if draw(st.integers(0, 6)) == 0:
        headers += draw(st.sampled_from(BAD_FRAMING))
        valid = False
    order = draw(st.permutations(range(1, len(headers))))
    head = [method.encode() + b" " + path.encode() + b" HTTP/1.1", headers[0]]
    head += [headers[i] for i in order]
    return Spec(b"\r\n".join(head) + b"\r\n\r\n" + payload, valid)


@settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    specs=st.lists(request_specs(), min_size=1, max_size=4),
    caller=st.sampled_from([ALICE, ROOT]),
    cut=st.integers(0, 3),
)
def test_fuzz_the_engine_sees_only_what_was_judged(tmp_path, specs, caller, cut):
    """Random pipelines of valid and poisoned requests: every request up to the first bad one
    is judged, and the engine sees exactly the allowed ones, rebuilt, one per connection."""
    data = b"".join(spec.data for spec in specs)
    if cut:  # the client hangs up inside the last request
        data = data[: -min(cut * 7, len(specs[-1].data) - 1)]
    outcome = run(exchange(tmp_path, data, caller))
    assert_faithful(outcome)
    first_bad = next((i for i, spec in enumerate(specs) if not spec.valid), len(specs))
    whole = len(specs) - 1 if cut else len(specs)  # heads of a cut request may be judged
    judged = outcome.proxy.judged
    assert len(judged) <= first_bad
    if caller is ROOT:  # admins are refused nothing: every well-formed request is judged
        assert min(first_bad, whole) <= len(judged)
    assert all(target != "/v1.41/containers/create" for _, target in outcome.proxy.expected) or (
        caller is ROOT
    )


@settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    base=st.lists(request_specs(), min_size=1, max_size=3),
    edits=st.lists(
        st.tuples(st.integers(0, 10_000), st.binary(min_size=0, max_size=3)), max_size=4
    ),
    caller=st.sampled_from([ALICE, ROOT]),
)
def test_fuzz_random_bytes_anywhere(tmp_path, base, edits, caller):
    """Bytes inserted or overwritten anywhere: whatever the proxy makes of them, the engine
    sees only requests the policy judged, each alone and cleanly framed."""
    data = bytearray(b"".join(spec.data for spec in base))
    for position, replacement in edits:
        at = position % (len(data) + 1)
        data[at : at + len(replacement) // 2] = replacement
    outcome = run(exchange(tmp_path, bytes(data), caller))
    assert_faithful(outcome)


# --------------------------------------------------------------------------- the real engine


def raw_all(proxy, user: str, data: bytes) -> bytes:
    """Send raw bytes as `user` over the proxy's socket; everything it answers until it closes."""
    account = pwd.getpwnam(user)
    result = subprocess.run(
        ["/usr/bin/python3", "-c", RAW_CLIENT, str(proxy.sock)],
        input=data,
        capture_output=True,
        user=account.pw_uid,
        group=account.pw_gid,
        extra_groups=[],
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def statuses(answers: bytes) -> list[int]:
    return [int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3}) ", answers)]


@pytest.fixture(scope="module")
def accounts(request) -> list[str]:
    """alice and bob: test_proxy's two real Unix users (its `users` fixture)."""
    return request.getfixturevalue("users")


@pytest.fixture(scope="module")
def attack_proxy(accounts):
    with proxy_process("--max-connections-per-user", "64", "--header-timeout", "300") as running:
        yield running


@pytest.fixture(scope="module")
def victim(accounts, attack_proxy):
    """bob's running container, made directly (root), labelled (signed) as the proxy would."""
    bob = accounts[1]
    name = f"victim-{RUN}"
    cid = admin_docker(
        "run",
        "-d",
        "--name",
        name,
        *spawner_label_args(attack_proxy, bob, name),
        "--label",
        "ds01.test=1",
        IMAGE,
        "sleep",
        "600",
    ).stdout.strip()
    yield cid
    admin_docker("rm", "-f", cid, check=False)


def hidden_requests(victim: str) -> list[bytes]:
    """What the battery hid: a root container binding `/`, and a pause of another's container."""
    create = json.dumps(
        {
            "Image": IMAGE,
            "Cmd": ["sleep", "600"],
            "HostConfig": {"Privileged": True, "Binds": ["/:/host"], "CapAdd": ["ALL"]},
        }
    ).encode()
    return [
        b"POST /v1.41/containers/create?name=smuggled-%s HTTP/1.1\r\nHost: d\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (RUN.encode(), len(create), create),
        b"POST /v1.41/containers/%s/pause HTTP/1.1\r\nHost: d\r\n\r\n" % victim.encode(),
    ]


def assert_nothing_smuggled(proxy, victim: str, attacker: str) -> None:
    found = admin_docker("ps", "-aq", "--filter", f"name=smuggled-{RUN}").stdout.split()
    assert found == [], "a smuggled create reached the engine"
    state = admin_docker("inspect", "-f", "{{.State.Paused}}", victim).stdout.strip()
    assert state == "false", "a smuggled pause reached the engine"
    forwarded = [
        line for line in proxy.log.read_text().splitlines() if f"forwarded user={attacker} " in line
    ]
    assert not any("create" in line or "pause" in line for line in forwarded), forwarded


@pytest.mark.docker
@pytest.mark.root
def test_header_splitting_cannot_reach_the_engine(attack_proxy, accounts, victim):
    """A second request hidden behind a bare LF in a header value: 400, nothing forwarded."""
    alice = accounts[0]
    ping = b"GET /v1.41/_ping HTTP/1.1\r\nHost: d\r\n"
    for hidden in hidden_requests(victim):
        for split in (b"\n\n", b"\r\n\n", b"\n\r\n", b"\n"):
            for name in (b"User-Agent", b"X-Note", b"Content-Type"):
                attack = ping + name + b": x" + split + hidden + b"\r\n\r\n"
                assert statuses(raw_all(attack_proxy, alice, attack)) == [400], attack
            # after a legitimate request on the same kept-alive connection
            attack = ping + b"\r\n" + ping + b"X-Note: x" + split + hidden + b"\r\n\r\n"
            assert statuses(raw_all(attack_proxy, alice, attack)) == [200, 400], attack
    assert_nothing_smuggled(attack_proxy, victim, alice)


@pytest.mark.docker
@pytest.mark.root
def test_transfer_encoding_desync_cannot_reach_the_engine(attack_proxy, accounts, victim):
    """TE beside CL (and other framing the engine could read differently): 400, nothing on."""
    alice = accounts[0]
    for hidden in hidden_requests(victim):
        chunked_then_hidden = b"0\r\n\r\n" + hidden
        for framing in (
            b"Content-Length: %d\r\nTransfer-Encoding: chunked" % len(chunked_then_hidden),
            b"Transfer-Encoding: chunked\r\nContent-Length: %d" % len(chunked_then_hidden),
            b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity",
            b"Transfer-Encoding: identity\r\nTransfer-Encoding: chunked",
            b"Transfer-Encoding: xchunked\r\nContent-Length: 5",
            b"Content-Length: 5\r\nContent-Length: %d" % len(chunked_then_hidden),
            b"Content-Length: 5\r\nTransfer-Encoding:\x0bchunked",
        ):
            request = b"POST /v1.41/build HTTP/1.1\r\nHost: d\r\n" + framing + b"\r\n\r\n"
            keep_alive = b"GET /v1.41/version HTTP/1.1\r\nHost: d\r\n\r\n"
            answers = raw_all(attack_proxy, alice, keep_alive + request + chunked_then_hidden)
            assert statuses(answers) == [200, 400], (framing, answers[-300:])
    assert_nothing_smuggled(attack_proxy, victim, alice)


HOLDER = r"""
import selectors, socket, sys
path, count, keep = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
selector = selectors.DefaultSelector()
for _ in range(count):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.sendall(b"GET /v1.41/containers/json HTTP/1.1\r\nHost: d\r\nX-Slow: ")
    selector.register(s, selectors.EVENT_READ)
print("connected", flush=True)
alive = count
while alive > keep:  # the proxy closes those over the cap; the rest it must keep
    for key, _ in selector.select(timeout=120):
        try:
            closed = not key.fileobj.recv(65536)
        except ConnectionResetError:  # closed with our half head unread
            closed = True
        if closed:
            selector.unregister(key.fileobj)
            alive -= 1
print("settled", alive, flush=True)
sys.stdin.read()
"""


@pytest.mark.docker
@pytest.mark.root
def test_idle_connections_of_one_user_do_not_lock_out_another(attack_proxy, accounts):
    """500 half-sent heads from alice: bob still works; alice's own CLI is told the limit."""
    alice, bob = accounts
    account = pwd.getpwnam(alice)
    holder = subprocess.Popen(
        ["/usr/bin/python3", "-c", HOLDER, str(attack_proxy.sock), "500", "64"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        user=account.pw_uid,
        group=account.pw_gid,
        extra_groups=[],
    )
    try:
        assert holder.stdout.readline().strip() == "connected"
        assert holder.stdout.readline().split() == ["settled", "64"]
        listed = docker_as(attack_proxy, bob, "ps", "-a")
        assert listed.returncode == 0, listed.stderr
        refused = docker_as(attack_proxy, alice, "ps", "-a")
        assert refused.returncode != 0
        assert "too many connections" in refused.stderr, refused.stderr
        assert "--max-connections-per-user" in refused.stderr
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert docker_as(attack_proxy, alice, "ps", "-a").returncode == 0  # slots come back


@pytest.mark.docker
@pytest.mark.root
def test_a_slow_head_is_closed_after_the_timeout(accounts):
    alice = accounts[0]
    with proxy_process("--header-timeout", "1") as running:
        slow = RAW_CLIENT.replace(
            "s.sendall(sys.stdin.buffer.read())", "s.sendall(b'GET /_ping HTTP/1.1\\r\\nX-S: ')"
        )
        account = pwd.getpwnam(alice)
        result = subprocess.run(
            ["/usr/bin/python3", "-c", slow, str(running.sock)],
            capture_output=True,
            user=account.pw_uid,
            group=account.pw_gid,
            extra_groups=[],
            timeout=60,
        )
        assert result.returncode == 0, result.stderr  # closed by the proxy, not our timeout
        assert result.stdout.startswith(b"HTTP/1.1 408 ")
        assert docker_as(running, alice, "version").returncode == 0
