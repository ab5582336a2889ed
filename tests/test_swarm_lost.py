"""`lost_services`: which swarm servers are desired to run but run nothing any more (their node
left the cluster, or their task ended), from Swarm's own objects. The task and node shapes are
those a real swarm showed (a node killed under a running service with restart policy none: the
task is rejected "assigned node no longer meets constraints", no new task is made, the service
stays at one replica, also after the node is back)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ds01hub.gpu.swarm_state import ENDED_TASK_STATES, lost_services

SCALED = "2026-12-07T16:03:46.92966644Z"  # the service's last update (scaled to one)
BEFORE, AFTER = "2026-12-07T16:00:00.1Z", "2026-12-07T16:04:02.951796345Z"
REJECTED = "assigned node no longer meets constraints"


def service(replicas=1, updated=SCALED, sid="s1"):
    return {
        "ID": sid,
        "UpdatedAt": updated,
        "Spec": {"Name": "default--ann", "Mode": {"Replicated": {"Replicas": replicas}}},
    }


def task(state, when=AFTER, node="n2", err="", tid="t1", sid="s1"):
    return {
        "ID": tid,
        "ServiceID": sid,
        "NodeID": node,
        "CreatedAt": when,
        "Status": {"State": state, "Timestamp": when, "Err": err},
    }


def node(state="ready", nid="n2", host="node2", updated=AFTER):
    return {
        "ID": nid,
        "UpdatedAt": updated,
        "Description": {"Hostname": host},
        "Status": {"State": state},
    }


def test_a_task_rejected_with_its_node_is_a_lost_server_also_once_the_node_is_back():
    for node_state in ("down", "ready"):
        (lost,) = lost_services([service()], [task("rejected", err=REJECTED)], [node(node_state)])
        assert (lost.id, lost.name, lost.node) == ("s1", "default--ann", "node2")
        assert REJECTED in lost.ended


def test_a_running_task_on_a_node_seen_down_is_lost_with_its_node():
    (lost,) = lost_services([service()], [task("running")], [node("down")])
    assert lost.node == "node2" and lost.ended == ""


def test_a_task_that_exited_by_itself_is_lost_without_a_node():
    (lost,) = lost_services([service()], [task("failed", err="exit 1")], [node()])
    assert lost.node == "" and lost.ended == "failed: exit 1"


def test_a_start_in_flight_is_never_lost():
    """Scaled to one after the old run ended: its new task is not made yet."""
    assert lost_services([service()], [task("shutdown", when=BEFORE)], [node()]) == []
    assert lost_services([service()], [], [node()]) == []  # never ran yet


def test_a_stopped_or_running_server_is_not_lost():
    assert lost_services([service(replicas=0)], [task("rejected", err=REJECTED)], [node()]) == []
    old = task("rejected", err=REJECTED, tid="t0")
    assert lost_services([service()], [old, task("running", tid="t1")], [node()]) == []


STATES = sorted(ENDED_TASK_STATES | {"new", "pending", "assigned", "preparing", "running"})


@given(
    st.lists(st.tuples(st.sampled_from(STATES), st.booleans(), st.booleans()), max_size=5),
    st.booleans(),
    st.integers(0, 2),
)
def test_lost_exactly_when_desired_nothing_live_and_it_ended_after_the_last_scale(
    tasks, node_down, replicas
):
    made = [
        task(state, when=AFTER if late else BEFORE, tid=f"t{i}")
        for i, (state, late, _) in enumerate(tasks)
    ]
    live = any(state not in ENDED_TASK_STATES for state, _, _ in tasks) and not node_down
    ended_late = any(late if state in ENDED_TASK_STATES else node_down for state, late, _ in tasks)
    lost = lost_services([service(replicas)], made, [node("down" if node_down else "ready")])
    assert bool(lost) == bool(replicas and made and not live and ended_late)
