"""A user's cgroup parent is removed when their last container is gone (issue 17), on this
host's cgroup v1 with real containers: not while any container of theirs exists, never from
under a start that holds the user's lock, and the kernel refuses to remove one in use."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path

import docker.errors
import pytest

from ds01hub import labels, provenance
from ds01hub.aggregate import user_cgroup_parent
from ds01hub.gpu.allocator import Owner
from ds01hub.host.aggregate_gate import remove_unused_parent, user_lock
from ds01hub.host.cgroups import ensure_parent, remove_parent
from ds01hub.limits import AggregateLimits

pytestmark = [pytest.mark.docker, pytest.mark.root]

CGROUP_ROOT = Path("/sys/fs/cgroup")
CAP = AggregateLimits(cpus=1, memory=128 << 20, pids=100)
RUN_LABEL = "ds01.test.aggregate-parent"


@pytest.fixture
def setting(tmp_path, docker_client, base_image):
    """A user, their parent under a fresh base, a way to make their (signed) containers and
    to list them as the spawner does; everything removed afterwards."""
    if not (CGROUP_ROOT / "memory" / "memory.use_hierarchy").exists():
        pytest.skip("not a cgroup v1 host")
    run_id = uuid.uuid4().hex[:8]
    user = f"alice{run_id}"
    base = f"/ds01-test-{run_id}"
    parent = user_cgroup_parent(base, user)
    state_dir = tmp_path / "state"
    trust = provenance.load(state_dir)

    def create(project: str):
        name = labels.container_name(user, project)
        own = labels.container_labels(user=user, project=project, group=None, priority=10)
        signed = trust.sign(own | {labels.CREATOR: Owner.current().label()}, name)
        return docker_client.containers.create(
            base_image,
            ["sleep", "300"],
            name=name,
            labels={**signed, "ds01.test": "1", RUN_LABEL: run_id},
            cgroup_parent=parent,
            mem_limit="64m",
        )

    def records() -> list[labels.ContainerRecord]:
        wanted = trust.label_filters([f"{labels.USER}={user}", f"{RUN_LABEL}={run_id}"])
        entries = docker_client.api.containers(all=True, filters={"label": wanted})
        parsed = (labels.ContainerRecord.from_docker(entry, trust) for entry in entries)
        return [r for r in parsed if r is not None]

    def remove():
        return asyncio.run(remove_unused_parent(state_dir, user, records, CGROUP_ROOT, parent))

    yield dict(
        user=user, parent=parent, state_dir=state_dir, create=create, remove=remove, run=run_id
    )
    for entry in docker_client.api.containers(all=True, filters={"label": f"{RUN_LABEL}={run_id}"}):
        with contextlib.suppress(docker.errors.NotFound):
            docker_client.api.remove_container(entry["Id"], force=True)
    for controller in CGROUP_ROOT.iterdir():
        for directory in (controller / parent.strip("/"), controller / base.strip("/")):
            if directory.is_dir() and not controller.is_symlink():
                directory.rmdir()


def _present(parent: str) -> list[str]:
    """The controllers that have the parent's directory."""
    return sorted(
        c.name
        for c in CGROUP_ROOT.iterdir()
        if not c.is_symlink() and (c / parent.strip("/")).is_dir()
    )


def test_the_parent_goes_with_the_users_last_container_not_before(setting):
    parent = setting["parent"]
    ensure_parent(CGROUP_ROOT, parent, CAP)
    one, two = setting["create"]("one"), setting["create"]("two")
    one.start()
    two.start()
    # runc made the parent under every controller it uses, beside the three with caps
    assert {"cpu", "memory", "pids", "devices", "freezer"} <= set(_present(parent))
    assert setting["remove"]() == []  # two run
    one.stop(timeout=0)
    one.remove()
    assert setting["remove"]() == [] and "memory" in _present(parent)  # two runs
    two.stop(timeout=0)
    assert setting["remove"]() == [] and "memory" in _present(parent)  # two is kept, stopped
    two.remove()
    removed = setting["remove"]()
    assert CGROUP_ROOT / "memory" / parent.strip("/") in removed
    assert _present(parent) == []
    assert setting["remove"]() == []  # nothing left: nothing to do, no error


def test_the_kernel_keeps_a_parent_that_a_container_runs_in(setting):
    parent = setting["parent"]
    ensure_parent(CGROUP_ROOT, parent, CAP)
    running = setting["create"]("busy")
    running.start()
    assert remove_parent(CGROUP_ROOT, parent) == []  # EBUSY everywhere: left as it is
    running.reload()
    assert running.status == "running"
    memory = CGROUP_ROOT / "memory" / parent.strip("/")
    assert (memory / "memory.limit_in_bytes").read_text().strip() == str(128 << 20)


async def test_a_removal_waits_for_a_start_under_the_users_lock_and_keeps_its_parent(setting):
    """A start holds the user's lock while it writes the parent and starts its container
    (as `DS01Spawner.start_object` does); a removal asked meanwhile runs after it, finds the
    container and keeps the parent."""
    parent = setting["parent"]
    removal: asyncio.Task | None = None
    async with user_lock(setting["state_dir"], setting["user"]):
        removal = asyncio.ensure_future(asyncio.to_thread(setting["remove"]))
        await asyncio.sleep(0)  # the removal is under way; it cannot pass the lock
        await asyncio.to_thread(ensure_parent, CGROUP_ROOT, parent, CAP)
        container = await asyncio.to_thread(setting["create"], "late")
        await asyncio.to_thread(container.start)
        assert not removal.done()
    assert await asyncio.wait_for(removal, 60) == []
    assert "memory" in _present(parent)
    await asyncio.to_thread(container.remove, force=True)
    assert CGROUP_ROOT / "memory" / parent.strip("/") in await asyncio.to_thread(setting["remove"])
