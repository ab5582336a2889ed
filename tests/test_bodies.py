"""Request bodies (ds01hub.bodies): every door answers any body with a 2xx or a named 4xx.

Two levels. The models of every door (broker, notebook service, server extension, spawner
`user_options`) are fed random bytes and random JSON of any shape: each is a model or a
BodyError that names the field and shows the value bounded. Then the broker's and the notebook
service's real tornado handlers are served in-process (the broker on a real Unix socket, so the
caller is identified by SO_PEERCRED) and sent random bodies: never a 500, always a JSON error
with a message. Behind the handlers, only the edges are simulated: `SimulatedOperations`
stands for the hub and the Docker engine, `SimulatedHubAuth` for the hub's token check.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jupyterhub.services.auth import HubOAuth
from pydantic import BaseModel
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.netutil import bind_sockets, bind_unix_socket

from ds01hub.actions.images import BuildRequest
from ds01hub.actions.operations import OperationError
from ds01hub.bodies import MAX_SHOWN, BodyError, BuildCancel, parse_body
from ds01hub.cli.user.backends import UnixHTTPConnection
from ds01hub.peer import Caller
from ds01hub.server_extension.handlers import ProjectRequest
from ds01hub.services.broker import app as broker_app
from ds01hub.services.broker import handlers as broker_handlers
from ds01hub.services.broker.handlers import CleanupBody, ExecBody, StartBody, StopBody
from ds01hub.services.notebook import app as notebook_app
from ds01hub.spawner.options import OptionsError, SpawnOptions, normalize_user_options

FIXTURE = HealthCheck.function_scoped_fixture

MODELS: list[type[BaseModel]] = [
    StartBody,
    StopBody,
    CleanupBody,
    ExecBody,
    BuildRequest,
    ProjectRequest,
    SpawnOptions,
    notebook_app.ProjectServerBody,
    BuildCancel,
]

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=12,
)


def near(model: type[BaseModel]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with the model's own keys (and a stranger) holding values of any shape."""
    keys = st.sampled_from([*model.model_fields, "user", "x" * 300])
    return st.dictionaries(keys, JSON | st.text(max_size=5) | st.booleans(), max_size=5)


def bodies(model: type[BaseModel]) -> st.SearchStrategy[bytes]:
    encoded = (JSON | near(model)).map(lambda value: json.dumps(value).encode())
    odd = st.sampled_from(
        [b"", b"null", b"[" * 5000 + b"]" * 5000, b'{"a": NaN}', b"\xff\xfe", b'{"x": 1e999}']
    )
    return encoded | st.binary(max_size=64) | odd | st.text(max_size=30).map(str.encode)


def check_named(error: BodyError) -> None:
    assert error.status == 400
    assert error.message and error.hint
    assert len(error.message) < 200 + 2 * MAX_SHOWN  # the value is shown bounded
    if error.field is not None:
        assert repr(error.field) in error.message


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_body_is_a_model_or_a_named_error(model, data):
    raw = data.draw(bodies(model))
    try:
        parsed = parse_body(model, raw)
    except BodyError as error:
        check_named(error)
    else:
        assert isinstance(parsed, model)


@settings(max_examples=200, deadline=None)
@given(raw=JSON | near(SpawnOptions))
def test_user_options_are_valid_or_refused_by_key(raw):
    """The spawner's one model for the form and REST: a dict of known keys, or OptionsError
    naming the key (or `user_options` for a body that is not an object)."""
    try:
        options = normalize_user_options(raw)
    except OptionsError as error:
        known = (*SpawnOptions.model_fields, "user_options")
        given = raw if isinstance(raw, dict) else {}
        stem = error.key.removesuffix("...")
        assert len(error.key) <= MAX_SHOWN
        assert error.key in known or any(key.startswith(stem) for key in given)
        assert error.status == 400
    else:
        assert set(options) <= set(SpawnOptions.model_fields)
        assert not (options.get("gpus") and options.get("mig"))


def test_errors_name_the_field_the_value_and_the_fix():
    with pytest.raises(BodyError) as caught:
        parse_body(StopBody, b'{"timeout": -3}')
    assert caught.value.message == (
        "the request body: field 'timeout' = -3: Input should be greater than or equal to 0"
    )
    assert caught.value.hint == "timeout: seconds to wait before the container is killed (>= 0)"
    with pytest.raises(BodyError) as caught:
        parse_body(StartBody, b'{"options": {"gpus": 1, "mig": "1g.10gb"}}')
    assert caught.value.field == "options.mig" and "not both" in caught.value.message
    with pytest.raises(BodyError) as caught:
        parse_body(CleanupBody, json.dumps({"all": "x" * 100_000}).encode())
    assert len(caught.value.message) < 200 and "..." in caught.value.message
    with pytest.raises(BodyError, match="is not JSON"):
        parse_body(CleanupBody, b"{")
    with pytest.raises(BodyError, match="must be a JSON object, not \\[1\\]"):
        parse_body(CleanupBody, b"[1]")
    assert parse_body(StartBody, b"").options == SpawnOptions()


# -- the real handlers, served in-process ----------------------------------------------------


class SimulatedOperations:
    """Stands for ds01hub.actions.operations.UserOperations (the hub and the Docker engine):
    every action succeeds at once, an exec finds no running container."""

    def __init__(self, context: object, user: str):
        self.user = user

    async def start(self, project: str, options: Any, create: bool = False) -> AsyncIterator:
        yield {"event": "ready", "container": {"name": project, "options": options}}

    async def stop(self, project: str, timeout: float | None, force: bool) -> dict:
        return {"stopped": project}

    async def cleanup(self, include_running: bool) -> list:
        return []

    async def exec_create(self, project: str, *args: Any) -> dict:
        raise OperationError(f"{project!r} is not running", status=409)


class SimulatedImages:
    """Stands for the broker's image builds (Docker)."""

    async def build(self, user: str, request: BuildRequest) -> AsyncIterator:
        yield {"kind": "done", "name": request.name}


class SimulatedBroker:
    """The parts of ds01hub.services.broker.app.Broker the handlers read; the caller is real."""

    docker_url = "unix:///simulated/docker.sock"
    context = None
    images = SimulatedImages()

    def resolve(self, creds: Any, requested: str | None) -> tuple[Caller, str]:
        return Caller(creds.uid, creds.gid, "ann", "/nonexistent"), "ann"


class SimulatedHubAuth(HubOAuth):
    """The hub's token check (HubOAuth) with the hub's answer simulated: every token is ann's."""

    async def user_for_token(self, token: str, *args: Any, **kw: Any) -> dict:
        return {"name": "ann", "kind": "user", "scopes": []}


class SimulatedDockerImages:
    def list(self, **kw: Any) -> list:
        return []


class SimulatedDocker:
    images = SimulatedDockerImages()


class SimulatedBuild:
    finished = False

    def to_dict(self, since: int = 0) -> dict:
        return {"since": since}


class SimulatedBuilds:
    """Stands for ds01hub.actions.builds.BuildManager (Docker builds)."""

    def start(self, spec: Any) -> SimulatedBuild:
        return SimulatedBuild()

    def get(self, user: str, build_id: str) -> SimulatedBuild:
        return SimulatedBuild()

    async def cancel(self, user: str, wait: float) -> dict:
        return {"image": "x", "stopped": True, "wait": wait}


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[tuple[str, int]]:
    """The broker's app on a Unix socket and the notebook service's app on loopback, served
    by one IOLoop in a thread."""
    socket_path = str(tmp_path_factory.mktemp("bodies") / "broker.sock")
    patches = pytest.MonkeyPatch()
    patches.setattr(broker_handlers, "UserOperations", SimulatedOperations)
    patches.setattr(notebook_app, "UserOperations", SimulatedOperations)
    # HubAuthenticated handlers ask the HubOAuth singleton unless one is set on them
    hub_auth = SimulatedHubAuth(api_token="simulated", api_url="http://127.0.0.1:9/hub/api")
    patches.setattr(notebook_app.ServiceHandler, "_hub_auth", hub_auth)
    service = notebook_app.DS01Service(allow_project_servers=True)
    service.docker, service.builds = SimulatedDocker(), SimulatedBuilds()
    patches.setattr(service, "operations_context", lambda: None, raising=False)
    ready, loop_box = threading.Event(), {}

    def serve() -> None:
        asyncio.set_event_loop(asyncio.new_event_loop())
        loop_box["loop"] = IOLoop.current()
        broker = broker_app.Broker.make_app(SimulatedBroker())  # type: ignore[arg-type]
        HTTPServer(broker).add_socket(bind_unix_socket(socket_path, mode=0o600))
        notebook = service.make_app()
        sockets = bind_sockets(0, "127.0.0.1")
        loop_box["port"] = sockets[0].getsockname()[1]
        HTTPServer(notebook).add_sockets(sockets)
        ready.set()
        loop_box["loop"].start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(30)
    yield socket_path, loop_box["port"]
    loop_box["loop"].add_callback(loop_box["loop"].stop)
    thread.join(10)
    patches.undo()
    os.unlink(socket_path)


BROKER_POSTS = [
    "/containers/work/start",
    "/containers/work/stop",
    "/containers/work/exec",
    "/cleanup",
    "/images",
]
SERVICE_POSTS = ["builds", "projects/work/server", "builds/" + "0" * 32 + "/cancel"]


def answer(connection: http.client.HTTPConnection, path: str, body: bytes, **headers: str):
    connection.request("POST", path, body=body, headers=headers)
    response = connection.getresponse()
    return response.status, response.read()


def check_answer(status: int, data: bytes) -> None:
    assert status < 500, data[:500]
    if status >= 400:
        error = json.loads(data)
        assert error["error"] and error["status"] == status


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_the_broker_answers_any_body_with_2xx_or_a_named_4xx(servers, data):
    path = data.draw(st.sampled_from(BROKER_POSTS))
    raw = data.draw(bodies(StartBody) | bodies(ExecBody) | bodies(BuildRequest))
    connection = UnixHTTPConnection(servers[0], timeout=30)
    try:
        prefix = broker_app.API_PREFIX
        status, reply = answer(connection, prefix + path, raw, Upgrade="ds01-exec")
    finally:
        connection.close()
    check_answer(status, reply.splitlines()[-1] if status < 300 and reply else reply)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_the_notebook_service_answers_any_body_with_2xx_or_a_named_4xx(servers, data):
    path = data.draw(st.sampled_from(SERVICE_POSTS))
    raw = data.draw(
        bodies(BuildRequest) | bodies(notebook_app.ProjectServerBody) | bodies(BuildCancel)
    )
    connection = http.client.HTTPConnection("127.0.0.1", servers[1], timeout=30)
    try:
        status, reply = answer(
            connection, f"/services/ds01/api/{path}", raw, Authorization="token simulated"
        )
    finally:
        connection.close()
    check_answer(status, reply)


def test_a_broken_since_is_a_named_400_not_a_500(servers):
    connection = http.client.HTTPConnection("127.0.0.1", servers[1], timeout=30)
    connection.request(
        "GET",
        "/services/ds01/api/builds/" + "0" * 32 + "?since=abc",
        headers={"Authorization": "token simulated"},
    )
    response = connection.getresponse()
    assert response.status == 400
    assert json.loads(response.read())["error"] == "since='abc' is not an event number"


def test_valid_bodies_reach_the_simulated_edge(servers):
    """The properties above see 2xx answers too: a valid body is passed on, parsed."""
    connection = UnixHTTPConnection(servers[0], timeout=30)
    prefix = broker_app.API_PREFIX
    status, reply = answer(connection, prefix + BROKER_POSTS[0], b'{"options": {"gpus": "1"}}')
    assert status == 200
    assert json.loads(reply)["container"]["options"] == {"gpus": 1}
    status, reply = answer(connection, prefix + BROKER_POSTS[1], b'{"timeout": 2.5}')
    assert (status, json.loads(reply)) == (200, {"stopped": "work"})
    status, reply = answer(connection, prefix + BROKER_POSTS[2], b"{}", Upgrade="ds01-exec")
    assert (status, json.loads(reply)["error"]) == (409, "'work' is not running")
    connection.close()
    connection = http.client.HTTPConnection("127.0.0.1", servers[1], timeout=30)
    token = {"Authorization": "token simulated"}
    path = "/services/ds01/api/builds"
    status, reply = answer(connection, path, b'{"name": "nlp", "pip_packages": "six"}', **token)
    assert status == 202
    connection.close()
