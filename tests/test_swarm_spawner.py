"""DS01SwarmSpawner's own decisions, without a swarm: what it asks the allocator for, and what
`poll` tells the hub (and so the user) when the server's node is gone. The manager's API is a
recorded stand-in (`Manager`); the real thing is tests/test_swarm.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from jupyterhub.spawner import SpawnException

from ds01hub.gpu.cluster import cluster_inventory, parse_node
from ds01hub.limits import parse_limits
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
        user=SimpleNamespace(name="ann", id=1, url="/user/ann/", escaped_name="ann", groups=[]),
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


#: a node of whole GPUs and a MIG slice, as the manager's node object has it
NODE3 = {
    "ID": "n3",
    "Description": {
        "Hostname": "node3",
        "Resources": {
            "GenericResources": [
                {"NamedResourceSpec": {"Kind": kind, "Value": uuid}}
                for kind, uuid in (
                    ("DS01-GPU-0", "GPU-aaaa"),
                    ("DS01-GPU-1", "GPU-bbbb"),
                    ("DS01-MIG-2:0-3g.40gb", "MIG-cccc"),
                )
            ]
        },
    },
    "Spec": {"Availability": "active"},
    "Status": {"State": "ready"},
}
CLUSTER = SimpleNamespace(inventory=cluster_inventory([parse_node(NODE3)]))
LIMITS = parse_limits({"defaults": {"max_gpus": 2, "max_gpus_per_container": 2}}).resolve("ann")


@pytest.mark.parametrize(
    ("options", "count", "mig"),
    [({}, 0, None), ({"gpus": 2}, 2, None), ({"mig": "3g.40gb"}, 1, "3g.40gb")],
)
def test_user_options_become_the_allocators_request(options, count, mig):
    choice = spawner(options)._choose(CLUSTER, LIMITS)
    request = choice.gpu_request("ann", "default--ann")
    assert (request.user, request.container, request.count) == ("ann", "default--ann", count)
    assert request.mig_profile == mig


@pytest.mark.parametrize(
    "options",
    [{"gpus": -1}, {"gpus": "many"}, {"mig": 3}, {"gpus": 3}, {"mig": "1g.10gb"}, {"queue": True}],
)
def test_bad_or_impossible_user_options_are_refused_by_name(options):
    """Checked against the user's limits and the cluster's slots, as on one host."""
    with pytest.raises(SpawnException) as refused:
        spawner(options)._choose(CLUSTER, LIMITS)
    assert refused.value.reason == "options"
    assert refused.value.status_code in (400, 403, 409)


def test_profiles_choose_the_request():
    made = spawner({"profile": "slice"})
    made.profile_list = [
        {"display_name": "A slice", "slug": "slice", "ds01_override": {"mig": "3g.40gb"}}
    ]
    assert made._choose(CLUSTER, LIMITS).mig == "3g.40gb"


async def test_poll_says_the_node_is_down_and_stops_the_server_for_good(monkeypatch):
    scaled = []
    monkeypatch.setattr(
        swarm_spawner, "scale_service", lambda client, sid, n: scaled.append((sid, n))
    )
    assert await spawner(manager=Manager("ready")).poll() is None
    assert scaled == []
    lost = spawner(manager=Manager("down"))
    assert await lost.poll() == "Your server stopped: the machine left the cluster (node2)."
    assert scaled == [("s1", 0)]  # it must not come back unasked with its node
    # its user is told why at the next start, also after a hub restart (the spawner's state)
    again = spawner(manager=Manager("down"))
    again.load_state(lost.get_state())
    assert again._stopped_because == lost._stopped_because
    again._start = _started
    assert await again.start() == ("10.0.0.2", 8888)
    events = [event async for event in again.progress()]
    assert events[0]["message"] == "Your server stopped: the machine left the cluster (node2)."
    assert events[0]["ds01_message"]["code"] == "node_lost"
    assert again._stopped_because is None and "ds01_stopped" not in again.get_state()


async def _started():
    return ("10.0.0.2", 8888)


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
