"""Aggregate caps under a real JupyterHub running DS01Spawner: set in a group's properties over
the REST API, a second server beyond them is refused at spawn, the first runs under the
user's parent cgroup that carries the caps (cgroup v1, cgroupfs driver), and the parent goes
when the user's last container is deleted."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from harness import unique_name, wait_until
from harness.ds01_spawner import Ds01Hub

from ds01hub import labels
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


def test_two_spawns_of_one_user_at_once_start_one_within_the_caps(hub_factory, tmp_path):
    """Two servers asked for at the same moment, each within the caps alone (512m) but not
    both (900m): whichever order the hub runs them in, exactly one runs and the other is
    refused by the aggregate check, and no container of the refused one is left."""
    ds01 = Ds01Hub(hub_factory, tmp_path)
    hub = ds01.hub
    user = unique_name("agr")
    try:
        hub.create_user(user, groups=["students"])
        caps = {"ds01": {"aggregate": {"memory_max": "900m", "cpus": 3}}}
        assert hub.api("PUT", "/groups/students/properties", json=caps).status_code == 200
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda n: hub.start_server(user, n, check=False), "ab"))
        assert {a.status_code for a in answers} <= {201, 202, 409}, [a.text for a in answers]

        def settled() -> list[bool] | None:
            servers = [hub.server(user, name) or {} for name in "ab"]
            if any(s.get("pending") for s in servers):
                return None
            return [bool(s.get("ready")) for s in servers]

        ready = wait_until(settled, 240, message=lambda: f"both spawns end\n{hub.log()}")
        assert sorted(ready) == [False, True], ready
        assert f"over the aggregate limits of {user}" in (
            " ".join(a.text for a in answers) + hub.log(200_000)
        )
        containers = [c for c in hub.containers() if c.labels.get(labels.USER) == user]
        assert [c.status for c in containers] == ["running"], containers
    finally:
        hub.stop()
        hub.remove_containers()
