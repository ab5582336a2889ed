"""Aggregate caps under a real JupyterHub running DS01Spawner: set in a group's properties over
the REST API, a second server beyond them is refused at spawn, the first runs under the
user's parent cgroup that carries the caps (cgroup v1, cgroupfs driver), and the parent goes
when the user's last container is deleted."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import unique_name, wait_until
from harness.ds01_spawner import Ds01Hub

from ds01hub.aggregate import user_cgroup_parent

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.root]
CGROUP_ROOT = Path("/sys/fs/cgroup")


def test_a_spawn_beyond_the_aggregate_is_refused_and_the_parent_cgroup_caps(hub_factory, tmp_path):
    if not (CGROUP_ROOT / "memory" / "memory.use_hierarchy").exists():
        pytest.skip("not a cgroup v1 host")
    base = f"/ds01-test-{unique_name('ag')}"
    ds01 = Ds01Hub(
        hub_factory,
        tmp_path,
        extra_config=f'c.DS01Spawner.aggregate_cgroup_root = "{CGROUP_ROOT}"\n'
        f'c.DS01Spawner.cgroup_parents = {{"students": "{base}"}}\n',
    )
    hub = ds01.hub
    user = unique_name("agg")
    parent = user_cgroup_parent(base, user)
    try:
        hub.create_user(user, groups=["students"])  # 512m and 1 CPU per container
        caps = {"ds01": {"aggregate": {"memory_max": "900m", "cpus": 3, "tasks_max": 600}}}
        response = hub.api("PUT", "/groups/students/properties", json=caps)
        assert response.status_code == 200, response.text
        hub.start_server(user, "one")
        hub.wait_ready(user, "one")
        container = hub.container_of(user, "one")
        assert container.attrs["HostConfig"]["CgroupParent"] == parent
        memory = CGROUP_ROOT / "memory" / parent.strip("/")
        assert (memory / "memory.limit_in_bytes").read_text().strip() == str(900 << 20)
        assert (memory / container.id).is_dir()  # the container's cgroup, under the user's
        assert (CGROUP_ROOT / "pids" / parent.strip("/") / "pids.max").read_text() == "600\n"

        response = hub.start_server(user, "two", check=False)
        assert response.status_code == 409, response.text
        message = response.json()["message"]
        assert f"over the aggregate limits of {user} (3 CPUs, 900m memory, 600 tasks)" in message
        assert "memory: 1g together, over the aggregate 900m" in message
        assert f"Running: one._.{user} (1 CPUs, 512m memory, 256 tasks)" in message

        # deleting the server removes the user's last container, and with it their parent
        hub.delete_server(user, "one")
        wait_until(
            lambda: not memory.exists() and not (CGROUP_ROOT / "pids" / parent.strip("/")).exists(),
            60,
            message=lambda: f"the user's parent cgroup is removed\n{hub.log()}",
        )
    finally:
        hub.stop()
        hub.remove_containers()
        for controller in CGROUP_ROOT.iterdir():
            for directory in (controller / parent.strip("/"), controller / base.strip("/")):
                if directory.is_dir() and not directory.is_symlink():
                    directory.rmdir()
