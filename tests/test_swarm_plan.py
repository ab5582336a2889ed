"""Pure parts of swarm mode: a server's service body (`swarm_plan`) and the holdings' container
documents built from Swarm's services, tasks and nodes (`swarm_state`)."""

from __future__ import annotations

import pytest

from ds01hub.gpu.cluster import ClusterError
from ds01hub.gpu.inventory import Slot
from ds01hub.gpu.swarm_state import service_documents
from ds01hub.spawner.swarm_plan import service_name, service_spec

GPU = Slot("node2/1", 1, "GPU-b", "GPU", None, 0, True, "node2")
MIG = Slot("node3/0:1", 0, "MIG-c", "MIG 3g.40gb", "3g.40gb", 40960, True, "node3")


def test_a_service_reserves_its_slots_kind_on_their_node_and_starts_at_zero():
    body = service_spec(
        name="default--ann",
        image="reg:5000/img",
        command=["start"],
        env={"A": "1"},
        signed_labels={"ds01.user": "ann"},
        slots=[GPU],
        nano_cpus=2 * 10**9,
    )
    template = body["TaskTemplate"]
    assert template["Placement"]["Constraints"] == ["node.hostname==node2"]
    assert template["Resources"]["Reservations"]["GenericResources"] == [
        {"DiscreteResourceSpec": {"Kind": "DS01-GPU-1", "Value": 1}}
    ]
    assert template["Resources"]["Limits"] == {"NanoCPUs": 2 * 10**9}
    assert template["ContainerSpec"]["Env"] == ["A=1", "NVIDIA_VISIBLE_DEVICES=GPU-b"]
    assert template["ContainerSpec"]["Labels"] == body["Labels"] == {"ds01.user": "ann"}
    assert body["Mode"] == {"Replicated": {"Replicas": 0}}
    mig = service_spec(name="x", image="i", command=None, env={}, signed_labels={}, slots=[MIG])[
        "TaskTemplate"
    ]["Resources"]["Reservations"]["GenericResources"]
    assert mig == [{"DiscreteResourceSpec": {"Kind": "DS01-MIG-0:1-3g.40gb", "Value": 1}}]


def test_slots_of_two_nodes_or_of_no_node_are_refused():
    with pytest.raises(ClusterError, match="not all on one swarm node"):
        service_spec(name="x", image="i", command=None, env={}, signed_labels={}, slots=[GPU, MIG])
    local = Slot("0", 0, "GPU-a", "GPU", None, 0, True)
    with pytest.raises(ClusterError):
        service_spec(name="x", image="i", command=None, env={}, signed_labels={}, slots=[local])
    cpu_only = service_spec(name="x", image="i", command=None, env={}, signed_labels={}, slots=[])
    assert "Placement" not in cpu_only["TaskTemplate"]


def test_service_names_are_dns_labels_and_unambiguous():
    assert service_name("ann") == "default--ann"
    assert service_name("a.b", "my_proj") == "my-5Fproj--a-2Eb"
    with pytest.raises(ClusterError, match="starts with '-'"):
        service_name("ann", "_x")
    with pytest.raises(ClusterError, match="Swarm allows 63"):
        service_name("u" * 70)


def _service(replicas, sid="s1"):
    return {
        "ID": sid,
        "CreatedAt": "2026-01-01T10:00:00Z",
        "Spec": {
            "Name": "default--ann",
            "Labels": {"ds01.user": "ann"},
            "Mode": {"Replicated": {"Replicas": replicas}},
            "TaskTemplate": {"ContainerSpec": {"Image": "img"}},
        },
    }


def _task(state, when, node="n2", sid="s1"):
    return {"ServiceID": sid, "NodeID": node, "Status": {"State": state, "Timestamp": when}}


READY = [
    {
        "ID": "n2",
        "Description": {"Hostname": "node2"},
        "Status": {"State": "ready"},
        "UpdatedAt": "2026-01-01T11:00:00Z",
    }
]
DOWN = [dict(READY[0], Status={"State": "down"}, UpdatedAt="2026-01-01T12:30:00Z")]


@pytest.mark.parametrize(
    ("replicas", "tasks", "nodes", "status", "finished"),
    [
        (0, [], READY, "created", "0001-01-01T00:00:00Z"),
        # desired to run, its task pending (an image pull): Swarm keeps its slot, so do we
        (1, [_task("pending", "2026-01-01T10:01:00Z")], READY, "running", "0001-01-01T00:00:00Z"),
        (1, [], READY, "running", "0001-01-01T00:00:00Z"),
        (1, [_task("running", "2026-01-01T10:01:00Z")], READY, "running", "0001-01-01T00:00:00Z"),
        (0, [_task("shutdown", "2026-01-01T12:00:00Z")], READY, "exited", "2026-01-01T12:00:00Z"),
        # the node died under a running task: stopped when the node was last updated (down)
        (1, [_task("orphaned", "2026-01-01T12:29:00Z")], DOWN, "exited", "2026-01-01T12:29:00Z"),
        (1, [_task("running", "2026-01-01T10:01:00Z")], DOWN, "exited", "2026-01-01T12:30:00Z"),
    ],
)
def test_services_become_container_documents(replicas, tasks, nodes, status, finished):
    (document,) = service_documents([_service(replicas)], tasks, nodes)
    assert document["Name"] == "/default--ann"
    assert document["Config"]["Labels"] == {"ds01.user": "ann"}
    assert document["State"]["Status"] == status
    assert document["State"]["FinishedAt"] == finished
    assert document["State"]["Running"] is (status == "running")


def test_other_services_tasks_are_not_counted():
    (document,) = service_documents(
        [_service(0)], [_task("running", "2026-01-01T10:01:00Z", sid="other")], READY
    )
    assert document["State"]["Status"] == "created"


def test_a_server_whose_slot_node_is_down_is_stopped_whatever_its_tasks_say():
    """Swarm may drop, orphan or replace the task of a dead node; the slot's node decides."""
    service = _service(1)
    service["Spec"]["TaskTemplate"]["Placement"] = {"Constraints": ["node.hostname==node2"]}
    replacement = {
        "ServiceID": "s1",
        "NodeID": "",
        "Status": {"State": "pending", "Timestamp": "t"},
    }
    for tasks in ([], [replacement], [_task("running", "2026-01-01T10:01:00Z")]):
        (document,) = service_documents([service], tasks, DOWN)
        assert document["State"]["Status"] == "exited", tasks
        assert document["State"]["FinishedAt"] == "2026-01-01T12:30:00Z"
        assert document["Node"] == "n2"


def test_a_stopped_service_whose_tasks_swarm_reaped_still_ran():
    """Scaled up then down, its ended tasks deleted by Swarm's task reaper: stopped (held from
    its last update), never mistaken for a never-started one."""
    service = _service(0) | {
        "PreviousSpec": {"Name": "default--ann"},
        "UpdatedAt": "2026-01-01T13:00:00Z",
    }
    (document,) = service_documents([service], [], READY)
    assert document["State"]["Status"] == "exited"
    assert document["State"]["FinishedAt"] == "2026-01-01T13:00:00Z"
