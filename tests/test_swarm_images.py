"""Users' images on a Docker Swarm (tests/harness/swarm.py): `image-create` builds on the
manager and publishes to the cluster's registry (`ds01hub.actions.registry`); a server on
another node runs exactly that image, pinned by the digest ds01hub recorded; another user
cannot run it, a push past ds01hub over its tag changes nothing, `image-delete` removes it from
the registry too.

The door is the broker's (`BrokerImages`: the request's checks, the host's `BuildManager`,
the build and the publish step), called in-process with the manager's engine as the hub host's;
the image is built FROM the cluster's busybox (small and quick). The server is placed on node2
the way the swarm spawner places a server (a service of `swarm_plan.service_spec`), with the
image the swarm spawner resolves for the user (`DS01SwarmSpawner._image`).
"""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
from harness.hub import Hub
from harness.swarm import REGISTRY, running_task
from harness.wait import wait_until
from jupyterhub.spawner import SpawnException
from traitlets.config import Config

from ds01hub import provenance
from ds01hub.actions import images
from ds01hub.actions.registry import find_record
from ds01hub.gpu.swarm_state import create_service, scale_service
from ds01hub.services.broker.app import Broker, BrokerImages
from ds01hub.spawner.swarm_plan import service_spec
from ds01hub.spawner.swarm_spawner import DS01SwarmSpawner

pytestmark = pytest.mark.swarm


def base_image(cluster, client) -> str:
    """The cluster's busybox with an /etc/passwd (the builds' `USER root` needs one), on the
    manager: the lab's base image for these builds."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, text in (
            ("Dockerfile", f"FROM {cluster.image}\nCOPY passwd /etc/passwd\n"),
            ("passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            archive.addfile(info, io.BytesIO(text.encode()))
    tag = "ds01test/busybox-passwd:1"
    for line in client.api.build(
        fileobj=io.BytesIO(buffer.getvalue()), custom_context=True, tag=tag, decode=True
    ):
        assert "error" not in line, line
    return tag


def door(cluster, client, state_dir, base: str) -> BrokerImages:
    config = Config()
    config.Broker.state_dir = str(state_dir)
    config.Broker.base_image = base
    config.Broker.registry = REGISTRY
    config.Broker.registry_url = cluster.registry_url()
    return BrokerImages(Broker(config=config), client)


def spawner_of(user: str, image: str, manager, *, admin: bool = False) -> DS01SwarmSpawner:
    made = DS01SwarmSpawner(
        user=SimpleNamespace(name=user, id=1, url=f"/user/{user}/", escaped_name=user, admin=admin),
        hub=SimpleNamespace(url="http://hub/", api_url="http://hub/api", public_host=""),
        orm_spawner=None,
    )
    made.user_options = {"image": image}
    made.__class__._client = manager.api
    return made


def tags(cluster, path: str) -> list[str]:
    try:
        with urllib.request.urlopen(f"{cluster.registry_url()}/v2/{path}/tags/list") as answer:
            return json.load(answer).get("tags") or []
    except urllib.error.HTTPError as error:
        assert error.code == 404, error
        return []


def node_of(manager, task) -> str:
    return manager.api.inspect_node(task["NodeID"])["Description"]["Hostname"]


@contextlib.contextmanager
def image_door(cluster, manager, state_dir, base: str):
    """The broker's image door on the manager; the deployment's image records removed after."""
    made = door(cluster, manager, state_dir, base)
    try:
        yield made
    finally:
        made.builds.shutdown()
        trust = provenance.load(state_dir)
        for config in manager.api.configs(filters={"label": f"ds01.deployment={trust.deployment}"}):
            with contextlib.suppress(Exception):
                manager.api.remove_config(config["ID"])


@pytest.fixture
def builds(swarm_cluster, swarm_manager, tmp_path):
    base = base_image(swarm_cluster, swarm_manager)
    with image_door(swarm_cluster, swarm_manager, tmp_path / "state", base) as made:
        yield made


async def test_an_image_built_with_image_create_runs_on_another_node_and_only_for_its_owner(
    swarm_cluster, swarm_manager, builds, tmp_path
):
    cluster, manager = swarm_cluster, swarm_manager
    events = [e async for e in builds.build("ann", images.BuildRequest(name="hello"))]
    assert events[-1]["kind"] == "done", events
    assert any(
        e["text"].startswith(f"pushing ds01-ann/hello:latest to the registry {REGISTRY}")
        for e in events
    )
    trust = provenance.load(tmp_path / "state")
    record = find_record(manager, trust, "ann", "hello")
    assert record is not None and record.reference.startswith(f"{REGISTRY}/ds01-ann/hello@sha256:")
    assert tags(cluster, "ds01-ann/hello") == ["latest"]
    built_on = manager.info()["Name"]  # the manager built it (node1)

    # the owner's server runs it on another node, pulled from the registry by its digest
    pinned = spawner_of("ann", "ds01-ann/hello", manager)._image(trust)
    assert pinned == record.reference
    assert spawner_of("ann", f"{REGISTRY}/ds01-ann/hello:latest", manager)._image(trust) == pinned
    other = next(n for n in ("node2", "node3") if n != built_on)
    body = service_spec(
        name="hello--ann",
        image=pinned,
        command=["sleep", "3600"],
        env={},
        signed_labels={"ds01.test": "1"},
        slots=[],
        node=other,
    )
    service_id = create_service(manager, body)
    scale_service(manager, service_id, 1)
    task = wait_until(
        lambda: running_task(manager, service_id),
        90,
        message=lambda: f"ann's server: {manager.api.tasks(filters={'service': service_id})}",
    )
    assert node_of(manager, task) == other != built_on
    with contextlib.closing(cluster.nodes[other].client()) as node:
        pulled = [i for i in node.images.list() if pinned in (i.attrs.get("RepoDigests") or [])]
        assert pulled and pulled[0].labels.get("ds01.image.name") == "hello"

    # another user is refused, by name or by digest; an admin may run it
    for requested in ("ds01-ann/hello", pinned, f"{REGISTRY}/ds01-ann/hello"):
        with pytest.raises(SpawnException, match="you have no image 'ds01-ann/hello'"):
            spawner_of("bob", requested, manager)._image(trust)
    assert spawner_of("dave", "ds01-ann/hello", manager, admin=True)._image(trust) == pinned

    # a push past ds01hub over ann's tag (anyone on the registry's network can) changes nothing
    with contextlib.closing(cluster.nodes["node3"].client()) as rogue:
        rogue.images.pull(cluster.image)
        rogue.api.tag(cluster.image, f"{REGISTRY}/ds01-ann/hello", "latest")
        for line in rogue.api.push(
            f"{REGISTRY}/ds01-ann/hello", "latest", stream=True, decode=True
        ):
            assert "error" not in line, line
    assert spawner_of("ann", "ds01-ann/hello", manager)._image(trust) == pinned

    # image-delete: refused while a server uses it; then gone from the registry as well
    with pytest.raises(images.ImageInUseError):
        await builds.delete("ann", "hello")
    manager.api.remove_service(service_id)
    assert (await builds.delete("ann", "hello"))["deleted"] == "ds01-ann/hello:latest"
    assert tags(cluster, "ds01-ann/hello") == []
    assert find_record(manager, trust, "ann", "hello") is None
    with pytest.raises(SpawnException, match="you have no image"):
        spawner_of("ann", "ds01-ann/hello", manager)._image(trust)


async def test_a_users_image_serves_jupyter_on_a_worker_through_the_hub(
    swarm_cluster, swarm_manager, tmp_path, singleuser_image
):
    """The whole way: image-create FROM the lab's single-user image (in the cluster's
    registry), then the hub's DS01SwarmSpawner starts ann's server with it on node3 (a MIG
    request lands there), pulled by its digest, and Jupyter answers; bob asking for ann's image
    is refused by the spawn."""
    cluster, manager = swarm_cluster, swarm_manager
    lab = cluster.push_image(singleuser_image, "ds01hub/singleuser:swarm-test")
    limits_file = tmp_path / "limits.yaml"
    limits_file.write_text("defaults: {max_gpus: 1, gpu_hold_after_stop: 0s}\n")
    hub = Hub(
        directory=tmp_path / "hub",
        hub_ip=cluster.gateway(),
        image=lab,
        spawner="ds01hub.spawner.swarm_spawner.DS01SwarmSpawner",
        extra_config=(
            f"c.DS01SwarmSpawner.client_kwargs = {{'base_url': {cluster.manager.url!r}}}\n"
            f"c.DS01SwarmSpawner.limits_path = {str(limits_file)!r}\n"
        ),
    )
    with image_door(cluster, manager, hub.state_dir, lab) as builds:
        events = [e async for e in builds.build("ann", images.BuildRequest(name="lab"))]
        assert events[-1]["kind"] == "done", events
        record = find_record(manager, provenance.load(hub.state_dir), "ann", "lab")
        assert record is not None
        hub.start()
        try:
            hub.create_user("ann")
            hub.create_user("bob")
            hub.start_server("ann", options={"mig": "3g.40gb", "image": "ds01-ann/lab"})
            hub.wait_ready("ann", timeout=240)
            token = hub.token_for("ann")
            assert hub.user_request(token, "GET", "ann", "api/status").status_code == 200
            (service,) = manager.api.services(filters={"name": "default--ann"})
            assert service["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"] == record.reference
            task = running_task(manager, service["ID"])
            assert node_of(manager, task) == "node3" != manager.info()["Name"]

            hub.start_server("bob", options={"image": "ds01-ann/lab"}, check=False)
            wait_until(lambda: "you have no image 'ds01-ann/lab'" in hub.log(), 60, message=hub.log)
            wait_until(lambda: not (hub.server("bob") or {}).get("pending"), 60, message=hub.log)
            assert not manager.api.services(filters={"name": "default--bob"})
            hub.stop_server("ann")
        finally:
            hub.stop()
