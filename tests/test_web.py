"""The one JSON handler base of every HTTP door (ds01hub.services.web), on a real tornado
server over loopback: bodies, error answers and NDJSON streams."""

import json

import pytest
from harness import free_port
from tornado import web
from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer

from ds01hub.errors import Ds01hubError
from ds01hub.gpu.allocator import AllocationStateError
from ds01hub.services.web import NDJSON, JsonHandler


class Echo(JsonHandler):
    def post(self) -> None:
        self.write_json({"got": self.json_body()}, 201)


class Fails(JsonHandler):
    def get(self, kind: str) -> None:
        if kind == "refusal":
            raise Ds01hubError("over quota", hint="stop a container", status=409)
        if kind == "forbidden":
            raise web.HTTPError(403, "a token is required")
        if kind == "host":
            raise AllocationStateError("/var/lib/ds01hub/allocations.json: read-only file system")
        raise ValueError("a bug with a secret path /srv/x")


class Stream(JsonHandler):
    async def get(self) -> None:
        async def events():
            yield {"kind": "log", "text": "one"}
            raise Ds01hubError("build failed", status=422)

        await self.stream_json(events())


@pytest.fixture
async def base_url():
    port = free_port()
    app = web.Application([("/echo", Echo), ("/fail/(.*)", Fails), ("/stream", Stream)])
    server = HTTPServer(app)
    server.listen(port, "127.0.0.1")
    yield f"http://127.0.0.1:{port}"
    server.stop()


async def fetch(url: str, **kwargs):
    response = await AsyncHTTPClient().fetch(url, raise_error=False, **kwargs)
    return response.code, response.headers.get("Content-Type"), response.body.decode()


async def test_a_json_object_is_read_and_anything_else_is_a_named_400(base_url):
    code, _, body = await fetch(f"{base_url}/echo", method="POST", body='{"a": 1}')
    assert (code, json.loads(body)) == (201, {"got": {"a": 1}})
    code, kind, body = await fetch(f"{base_url}/echo", method="POST", body="[1]")
    assert code == 400 and kind == "application/json"
    assert json.loads(body)["error"] == "the request body must be a JSON object"
    code, _, body = await fetch(f"{base_url}/echo", method="POST", body="{nope")
    assert code == 400 and json.loads(body)["error"].startswith("the request body is not JSON")


@pytest.mark.parametrize(
    ("kind", "status", "error", "hint"),
    [
        ("refusal", 409, "over quota", "stop a container"),
        ("forbidden", 403, "a token is required", None),
        ("host", 500, "internal error", None),  # a host's failure: its paths are not shown
        ("bug", 500, "internal error", None),
    ],
)
async def test_every_error_is_one_json_shape(base_url, kind, status, error, hint):
    code, content_type, body = await fetch(f"{base_url}/fail/{kind}")
    assert (code, content_type) == (status, "application/json")
    assert json.loads(body) == {"error": error, "hint": hint, "status": status}


async def test_a_stream_ends_with_its_error_as_the_last_line(base_url):
    code, content_type, body = await fetch(f"{base_url}/stream")
    lines = [json.loads(line) for line in body.splitlines()]
    assert (code, content_type) == (200, NDJSON)
    assert lines == [
        {"kind": "log", "text": "one"},
        {"event": "error", "error": "build failed", "hint": None, "status": 422},
    ]
