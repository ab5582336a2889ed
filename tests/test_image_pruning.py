"""`ds01hub bootstrap images --prune` against the real engine, on a repository of the test's
own (the real ds01hub/* tags of other checkouts on this engine are left alone): old tags go,
nothing a container or another image needs is lost."""

from __future__ import annotations

import contextlib
import io
import secrets

import docker.errors
import pytest
from harness.cli import busybox_image

from ds01hub.host.bootstrap import prune_images

pytestmark = pytest.mark.docker


def build_on(client, base: str, tag: str) -> str:
    """A one-layer image on `base` that no other tag shares."""
    dockerfile = f"FROM {base}\nLABEL ds01.test.prune={secrets.token_hex(4)}\n"
    client.images.build(
        fileobj=io.BytesIO(dockerfile.encode()),
        tag=tag,
        rm=True,
        forcerm=True,
        labels={"ds01.test": "1"},
    )
    return tag


def test_old_tags_are_removed_but_nothing_in_use_is_lost(docker_client):
    client = docker_client
    repository = f"ds01hub-test/prune{secrets.token_hex(3)}"
    current = build_on(client, busybox_image(client), f"{repository}:current")
    client.images.get(current).tag(repository, "latest")
    client.images.get(current).tag(repository, "stale-same")  # another name for the current
    stale = build_on(client, busybox_image(client), f"{repository}:stale-unused")
    used = build_on(client, busybox_image(client), f"{repository}:stale-used")
    parent = build_on(client, busybox_image(client), f"{repository}:stale-parent")
    child = build_on(client, parent, f"{repository}-child:latest")
    container = client.containers.create(used, ["true"], labels={"ds01.test": "1"})
    try:
        result = prune_images([current], repositories=[repository])
        assert f"{repository}:stale-same" in result["removed"]
        assert stale in result["removed"]
        assert [k for k in result["kept"] if k.startswith(used)], result
        client.images.get(current)  # kept, with its alias
        client.images.get(f"{repository}:latest")
        client.images.get(used)  # a stopped container still runs from it
        client.images.get(child)  # a user's image built on a pruned one still works
        with pytest.raises(docker.errors.ImageNotFound):
            client.images.get(stale)

        container.remove()
        assert used in prune_images([current], repositories=[repository])["removed"]
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)
        for tag in (child, parent, used, stale, f"{repository}:latest", current):
            with contextlib.suppress(docker.errors.ImageNotFound):
                client.images.remove(tag, force=True)
