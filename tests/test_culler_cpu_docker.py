"""The culler's CPU signal from real containers' cgroup counters: a busy loop reads as busy, a
`sleep` as idle, also for a container under a `cgroup_parent` (found through its process)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from harness.cli import busybox_image

from ds01hub.limits import parse_limits
from ds01hub.services.ops.culler import Culler

pytestmark = pytest.mark.docker


@pytest.fixture
def containers(docker_client):
    image = busybox_image(docker_client)
    tag = uuid.uuid4().hex[:8]
    made = []

    def run(command: str, **options):
        container = docker_client.containers.run(
            image,
            ["sh", "-c", command],
            labels={"ds01.test": "1", "ds01.test.culler-cpu": tag},
            detach=True,
            **options,
        )
        made.append(container)
        return container.id

    yield run
    for container in made:
        container.remove(force=True)


def test_busy_and_idle_containers_read_from_their_cgroups(docker_client, containers, tmp_path):
    busy = containers("while :; do :; done")
    idle = containers("sleep 600")
    parented = containers("while :; do :; done", cgroup_parent="ds01-test-researchers")
    culler = Culler(None, docker_client, None, parse_limits({}), state_dir=tmp_path)
    sampled_through_stats = []
    culler.cpu_percent = lambda cid: sampled_through_stats.append(cid)  # must not be needed

    percent = asyncio.run(culler.cpu_activity([busy, idle, parented]))

    assert percent[busy] >= culler.cpu_threshold, percent
    assert percent[parented] >= culler.cpu_threshold, percent
    assert percent[idle] < culler.cpu_threshold, percent
    assert sampled_through_stats == []
    assert culler.cgroups.hierarchy is not None
