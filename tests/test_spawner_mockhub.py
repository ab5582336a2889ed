"""DS01Spawner's orchestration on JupyterHub's in-process `MockHub` (as dockerspawner's own
tests do): start, allocate, create, and the undo of a failed start, through the hub's REST API.

The hub runs in this process (jupyterhub.tests.mocking.MockHub: its own database, the real
configurable-http-proxy), so the spawner objects, the hub context and the allocator are
inspected directly. The Docker part is the real engine, with the tiny busybox test image whose
`httpd` stands in for Jupyter (any HTTP answer is "up" for the hub); the GPUs are the limits
file's SIMULATED inventory (tests/harness/ds01_spawner.py).
"""

from __future__ import annotations

import json
import secrets

import docker
import pytest
import pytest_asyncio
from harness import wait_until_async
from harness.cli import busybox_image
from harness.ds01_spawner import LIMITS_YAML, SPAWNER_LABEL
from harness.naming import unique_name
from jupyterhub.tests.mocking import MockHub
from jupyterhub.tests.utils import add_user, api_request
from traitlets.config import Config

from ds01hub import labels
from ds01hub.spawner import DS01Spawner

pytestmark = [pytest.mark.docker, pytest.mark.asyncio(loop_scope="module")]

#: The busybox image has `busybox` but no Jupyter: httpd answers the hub's readiness check.
HTTPD = ["sh", "-c", "exec busybox httpd -f -p 8888"]


@pytest.fixture(scope="module")
def client():
    return docker.from_env()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def app(tmp_path_factory, client):
    directory = tmp_path_factory.mktemp("mockhub")
    tag = unique_name("mh")
    limits = directory / "limits.yaml"
    limits.write_text(LIMITS_YAML.format(seed=tag))
    config = Config()
    config.JupyterHub.spawner_class = DS01Spawner
    config.JupyterHub.allow_named_servers = True
    # in memory: never a cookie secret file in the working directory (whose mode a later run
    # would refuse)
    config.JupyterHub.cookie_secret = secrets.token_bytes(32)
    config.DS01Spawner.limits_path = str(limits)
    config.DS01Spawner.state_dir = str(directory / "state")
    config.DS01Spawner.container_label_filter = [f"{SPAWNER_LABEL}={tag}"]
    config.DS01Spawner.gpu_wait_timeout = 2.0
    config.DS01Spawner.gpu_recheck_interval = 0.5
    config.Spawner.start_timeout = 60
    config.Spawner.http_timeout = 30
    config.DockerSpawner.image = busybox_image(client)
    config.DockerSpawner.cmd = HTTPD
    config.DockerSpawner.extra_create_kwargs = {"labels": {SPAWNER_LABEL: tag, "ds01.test": "1"}}
    hub = MockHub.instance(config=config)
    await hub.initialize([])
    await hub.start()
    hub.ds01_tag = tag
    try:
        yield hub
    finally:
        for container in client.containers.list(
            all=True, filters={"label": f"{SPAWNER_LABEL}={tag}"}
        ):
            container.remove(force=True, v=True)
        MockHub.clear_instance()
        await hub.stop()


async def spawn(app, user: str, server: str = "", **options) -> tuple[int, dict]:
    """Start `user`'s `server` with `options`; wait while it is pending. (status, its model)."""
    path = ("users", user, "servers", server) if server else ("users", user, "server")
    r = await api_request(app, *path, method="post", data=json.dumps(options))

    async def settled() -> dict | None:
        model = (await api_request(app, "users", user)).json()["servers"].get(server) or {}
        return None if model.get("pending") else {"model": model}

    done = await wait_until_async(settled, timeout=90, message=f"{user}'s spawn to end")
    return r.status_code, done["model"]


async def spawn_error(app, user: str, server: str = "") -> str:
    """What the last spawn of `user`'s `server` failed with (its progress stream's end)."""
    spawner = app.users[user].spawners[server]
    future = spawner._spawn_future
    if future is None or not future.done() or future.exception() is None:
        return ""
    return str(future.exception())


def containers_of(client, app, user: str) -> list:
    found = client.containers.list(
        all=True, filters={"label": [f"{SPAWNER_LABEL}={app.ds01_tag}", f"{labels.USER}={user}"]}
    )
    return found


def holdings_of(spawner: DS01Spawner) -> list:
    name = spawner.object_name
    return [h for h in spawner.context.allocator.holdings() if h.container == name]


async def test_start_allocates_a_gpu_creates_and_starts_the_container(app, client):
    user = unique_name("ann")
    add_user(app.db, app, name=user)
    status, model = await spawn(app, user, gpus=1)
    assert status in (201, 202), model
    assert model.get("ready"), await spawn_error(app, user)
    spawner = app.users[user].spawners[""]
    assert isinstance(spawner, DS01Spawner)
    container = client.containers.get(spawner.object_id)
    assert container.status == "running"
    assert container.name == labels.container_name(user, None)
    assert container.labels[labels.USER] == user
    held = holdings_of(spawner)
    assert len(held) == 1 and held[0].state == "running"
    assert container.labels[labels.GPUS] == held[0].slot_id
    assert spawner.user_options["gpus"] == 1  # what the hub stores and reuses
    r = await api_request(app, "users", user, "server", method="delete")
    assert r.status_code in (202, 204)


async def test_a_named_server_is_a_project_container(app, client):
    user = unique_name("ben")
    add_user(app.db, app, name=user)
    status, model = await spawn(app, user, "work")
    assert model.get("ready"), await spawn_error(app, user, "work")
    spawner = app.users[user].spawners["work"]
    container = client.containers.get(spawner.object_id)
    assert container.name == labels.container_name(user, "work")
    assert holdings_of(spawner) == []  # no GPU asked, none held


@pytest.mark.parametrize(
    ("script", "said"),
    [
        # exits while the spawner waits for Jupyter: the reason is the log's end
        ("sleep 2; echo no jupyter here; exit 3", ("stopped while Jupyter was starting",)),
        # exits at once: before DockerSpawner read its port (its own error), or just after
        ("exit 3", ("Failed to get port info", "stopped while Jupyter was starting")),
    ],
)
async def test_a_failed_start_removes_its_container_and_gives_the_gpu_back(
    app, client, script, said
):
    user = unique_name("cid")
    add_user(app.db, app, name=user)
    spawner = app.users[user].spawners[""]
    spawner.cmd = ["sh", "-c", script]
    status, model = await spawn(app, user, gpus=1)
    assert not model.get("ready")
    error = await spawn_error(app, user)
    assert any(words in error for words in said), error
    assert containers_of(client, app, user) == []  # created by this spawn: removed
    assert holdings_of(spawner) == []  # and its slot released


async def test_a_refused_option_allocates_and_creates_nothing(app, client):
    user = unique_name("dee")
    add_user(app.db, app, name=user)
    for options, status, said in (
        ({"gpus": 1, "mig": "2g.20gb"}, 400, "not both"),
        ({"gpus": 5}, 403, "gpus"),  # over the limits file's max_gpus_per_container
        ({"cpus": 2}, 400, "unknown field"),
    ):
        r = await api_request(app, "users", user, "server", method="post", data=json.dumps(options))
        assert (r.status_code, said in r.json()["message"]) == (status, True), r.text
    assert containers_of(client, app, user) == []
    assert holdings_of(app.users[user].spawners[""]) == []
