"""Holds expire on time, and old stopped containers are removed with their workspace kept:
real containers on the real engine, the SIMULATED NVML, a clock the test moves."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from harness import TEST_LABEL

from ds01hub import labels, provenance
from ds01hub.gpu.allocator import GpuAllocator, docker_lister
from ds01hub.gpu.eventlog import EventLog
from ds01hub.gpu.inventory import discover
from ds01hub.gpu.simulated_nvml import SimulatedNvml
from ds01hub.limits import SimulatedGpuSpec, parse_limits
from ds01hub.services.ops.lifecycle import Lifecycle

pytestmark = pytest.mark.docker

LIMITS = parse_limits(
    {"defaults": {"gpu_hold_after_stop": "1h", "container_hold_after_stop": "2h", "max_gpus": 2}}
)


@pytest.fixture
def run_label(docker_client):
    """A label unique to this test; its containers and volumes are removed afterwards."""
    run = f"ds01.test.lifecycle={uuid.uuid4().hex[:8]}"
    yield run
    for container in docker_client.containers.list(all=True, filters={"label": run}):
        container.remove(force=True)
    for volume in docker_client.volumes.list(filters={"label": run}):
        volume.remove(force=True)


def stopped_container(docker_client, image, run_label, user, slots, workspace, state_dir):
    """A managed container (signed with `state_dir`'s key) that ran and exited, holding
    `slots`, with a workspace volume."""
    key, _, value = run_label.partition("=")
    managed = labels.container_labels(
        user=user, project="thesis", group="students", priority=10, gpus=slots
    )
    managed = provenance.load(state_dir).sign(managed, f"thesis._.{user}")
    container = docker_client.containers.run(
        image,
        ["true"],
        name=f"thesis._.{user}",
        labels={**managed, TEST_LABEL: "1", key: value},
        volumes={workspace.name: {"bind": "/workspace", "mode": "rw"}},
        detach=True,
    )
    container.wait(timeout=60)
    container.reload()
    return container


def test_gpu_hold_expires_then_the_container_is_removed_and_its_workspace_kept(
    docker_client, base_image, run_label, tmp_path
):
    key, _, value = run_label.partition("=")
    user = f"lc{uuid.uuid4().hex[:6]}"
    workspace = docker_client.volumes.create(f"ds01-test-ws-{user}", labels={key: value})
    container = stopped_container(
        docker_client, base_image, run_label, user, ["0"], workspace, tmp_path / "state"
    )
    finished = labels.parse_docker_time(container.attrs["State"]["FinishedAt"])
    now = {"t": finished + timedelta(minutes=59)}
    log = EventLog(tmp_path / "events.sqlite")
    # as the spawner does when it grants the slot
    log.record("allocate", user, "0", container.name, "students", at=finished - timedelta(hours=1))
    allocator = GpuAllocator(
        docker_client,
        discover(SimulatedNvml([SimulatedGpuSpec(), SimulatedGpuSpec()]), simulated=True),
        tmp_path / "state",
        log,
        clock=lambda: now["t"],
        limits=LIMITS,
        container_lister=docker_lister(docker_client, [run_label]),
    )
    lifecycle = Lifecycle(docker_client, allocator, LIMITS, log, extra_labels=[run_label])

    def holder(slot):
        return {s.slot_id: s.holding for s in allocator.status()}[slot]

    # 59 minutes after it stopped: still held, nothing to do
    assert holder("0").state == "stopped"
    assert holder("0").held_until == finished + timedelta(hours=1)
    assert lifecycle.run_once() == []
    assert [e.kind for e in log.events(user=user)] == ["allocate", "hold"]

    # one hour and a second: the slot is free, the expiry is recorded once
    now["t"] = finished + timedelta(hours=1, seconds=1)
    assert holder("0") is None
    assert lifecycle.run_once(dry_run=True)[0].kind == "expire"
    assert [e.kind for e in log.events(user=user)] == ["allocate", "hold"]  # dry run: no write
    (expired,) = lifecycle.run_once()
    assert (expired.kind, expired.container, expired.slots) == ("expire", container.name, ("0",))
    assert [e.kind for e in log.events(user=user)] == ["allocate", "hold", "expire"]
    assert lifecycle.run_once() == []  # recorded once
    docker_client.containers.get(container.id)  # the container itself is still there

    # two hours: the container is removed, its workspace volume kept
    now["t"] = finished + timedelta(hours=2, seconds=1)
    (removed,) = lifecycle.run_once()
    assert removed.kind == "remove" and "workspace kept" in removed.reason
    assert docker_client.containers.list(all=True, filters={"label": run_label}) == []
    assert docker_client.volumes.get(workspace.name).name == workspace.name
    last = log.events(user=user)[-1]
    assert (last.kind, last.container, last.slot) == ("release", container.name, None)
    assert last.reason.startswith("removed:")
    assert log.open_allocations() == []
    hours = log.gpu_hours(by="user", until=finished + timedelta(hours=3))[user]
    assert hours == pytest.approx(2.0, abs=0.01)  # 1 h running + 1 h held, then expired


def test_a_null_container_hold_keeps_the_stopped_container(
    docker_client, base_image, run_label, tmp_path
):
    key, _, value = run_label.partition("=")
    user = f"lk{uuid.uuid4().hex[:6]}"
    keep = parse_limits({"defaults": {"gpu_hold_after_stop": "1h"}})  # container hold: never
    workspace = docker_client.volumes.create(f"ds01-test-ws-{user}", labels={key: value})
    container = stopped_container(
        docker_client, base_image, run_label, user, [], workspace, tmp_path / "state"
    )
    finished = labels.parse_docker_time(container.attrs["State"]["FinishedAt"])
    allocator = GpuAllocator(
        docker_client,
        discover(SimulatedNvml([SimulatedGpuSpec()]), simulated=True),
        tmp_path / "state",
        None,
        clock=lambda: finished + timedelta(days=365),
        limits=keep,
        container_lister=docker_lister(docker_client, [run_label]),
    )
    assert (
        Lifecycle(docker_client, allocator, keep, None, extra_labels=[run_label]).run_once() == []
    )
    docker_client.containers.get(container.id)
