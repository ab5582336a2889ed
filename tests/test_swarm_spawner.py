"""DS01SwarmSpawner's own decisions, without a swarm: what it asks the allocator for, and what
`poll` tells the hub (and so the user) when the server's node is gone. The manager's API is a
recorded stand-in (`Manager`); the real thing is tests/test_swarm.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from jupyterhub.spawner import SpawnException

from ds01hub.spawner import swarm_spawner
from ds01hub.spawner.swarm_spawner import DS01SwarmSpawner

SERVICE = {
    "ID": "s1",
    "Spec": {"Name": "default--ann", "Labels": {}, "Mode": {"Replicated": {"Replicas": 1}}},
}
TASK = {"ServiceID": "s1", "NodeID": "n2", "Status": {"State": "running", "Timestamp": "t"}}


class Manager:
    """The calls `poll` makes, answered from `nodes` (node id -> state)."""

    def __init__(self, node_state: str = "ready"):
        self.node_state = node_state
        self.removed: list[str] = []

    def remove_service(self, service_id):
        self.removed.append(service_id)

    def inspect_service(self, name):
        assert name == "default--ann"
        return SERVICE

    def tasks(self, filters):
        return [TASK]

    def nodes(self):
        return [
            {
                "ID": "n2",
                "UpdatedAt": "2026-01-01T00:00:00Z",
                "Description": {"Hostname": "node2"},
                "Status": {"State": self.node_state},
            }
        ]


def spawner(options=None, manager=None) -> DS01SwarmSpawner:
    made = DS01SwarmSpawner(
        user=SimpleNamespace(name="ann", id=1, url="/user/ann/", escaped_name="ann"),
        hub=SimpleNamespace(url="http://hub/", api_url="http://hub/api", public_host=""),
        orm_spawner=None,
    )
    made.user_options = options or {}
    if manager is not None:
        made.__class__._client = manager
    return made


@pytest.fixture(autouse=True)
def _no_shared_client():
    yield
    DS01SwarmSpawner._client = None


def test_the_server_is_a_service_named_as_a_dns_label():
    assert spawner().object_name == "default--ann"


@pytest.mark.parametrize(
    ("options", "count", "mig"),
    [({}, 0, None), ({"gpus": 2}, 2, None), ({"mig": "3g.40gb"}, 0, "3g.40gb")],
)
def test_user_options_become_the_allocators_request(options, count, mig):
    request = spawner(options)._request()
    assert (request.user, request.container, request.count) == ("ann", "default--ann", count)
    assert request.mig_profile == mig


@pytest.mark.parametrize("options", [{"gpus": -1}, {"gpus": "2"}, {"gpus": True}, {"mig": 3}])
def test_bad_user_options_are_refused_by_name(options):
    with pytest.raises(SpawnException, match="gpus must|mig must"):
        spawner(options)._request()


async def test_poll_says_the_node_is_down_and_stops_the_server_for_good(monkeypatch):
    scaled = []
    monkeypatch.setattr(
        swarm_spawner, "scale_service", lambda client, sid, n: scaled.append((sid, n))
    )
    assert await spawner(manager=Manager("ready")).poll() is None
    assert scaled == []
    assert await spawner(manager=Manager("down")).poll() == "its node node2 is down"
    assert scaled == [("s1", 0)]  # it must not come back unasked with its node


async def test_deleting_the_server_removes_its_service():
    manager = Manager()
    await spawner(manager=manager).delete_forever()
    assert manager.removed == ["s1"]


def test_a_swarm_spawn_resolves_the_users_hub_group_properties(tmp_path):
    """As DS01Spawner: the group's properties from the hub's database bind; a bad one refuses
    the spawn (409) with the file's message."""
    from ds01hub.limits import LimitsStore

    limits = tmp_path / "limits.yaml"
    limits.write_text("defaults: {memory: 4g}\n")
    made = spawner()
    group = SimpleNamespace(name="students", properties={"ds01": {"memory": "1g"}})
    made.user.groups = [group]
    resolved = made._resolve_limits(LimitsStore(limits))
    assert resolved.memory == 1 << 30 and resolved.sources["memory"] == "hub_groups.students"
    group.properties = {"ds01": {"memory": "1k"}}
    with pytest.raises(SpawnException) as refused:
        made._resolve_limits(LimitsStore(limits))
    assert refused.value.status_code == 409
    assert "JupyterHub group 'students' properties: ds01.memory" in str(refused.value)
