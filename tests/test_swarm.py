"""A Docker Swarm of GPU servers as one system: three dind nodes (tests/harness/swarm.py), each
with its own simulated inventory (node3's as MIG instances), a local registry, ds01hub on the
host talking to the manager's and the nodes' engines.

The allocator is the real `GpuAllocator`, its holdings read from Swarm's services and tasks
(`ds01hub.gpu.swarm_state`), its servers created as the swarm spawner's services
(`ds01hub.spawner.swarm_plan`): a tiny busybox image from the cluster's registry stands in for
the single-user image (these tests are about placement and state, not Jupyter).
"""

from __future__ import annotations

import contextlib
from datetime import timedelta

import pytest
from harness.hub import Hub
from harness.swarm import (
    inventory_of,
    node_inventory,
    node_state,
    running_task,
    spawn_service,
    swarm_allocator,
)
from harness.wait import wait_until

from ds01hub import provenance
from ds01hub.gpu.allocator import utcnow
from ds01hub.gpu.cluster import cluster_inventory, parse_node, split_slot_id
from ds01hub.gpu.decision import GpuRequest
from ds01hub.gpu.swarm_state import (
    create_service,
    scale_service,
    swarm_lister,
)
from ds01hub.limits import parse_limits
from ds01hub.spawner.swarm_plan import service_name, service_spec

pytestmark = pytest.mark.swarm

LIMITS = parse_limits(
    {"defaults": {"max_gpus": 1, "max_gpus_per_container": 1, "gpu_hold_after_stop": "0s"}}
)
USERS = [f"user{n}" for n in range(8)]


@pytest.fixture
def cluster(swarm_cluster):
    return swarm_cluster


@pytest.fixture
def manager(swarm_manager):
    return swarm_manager


def allocator_for(cluster, manager, tmp_path, trust, limits=LIMITS):
    return swarm_allocator(cluster, manager, tmp_path / "state", trust, limits)


def spawn(allocator, manager, cluster, trust, user):
    return spawn_service(allocator, manager, cluster, trust, user, LIMITS)


def test_the_inventory_is_read_from_the_managers_node_objects(cluster):
    nodes = [parse_node(attrs, simulated=True) for attrs in cluster.node_objects()]
    assert sorted(node.hostname for node in nodes) == ["node1", "node2", "node3"]
    assert all(node.ready and node.active and not node.problems for node in nodes)
    inventory = cluster_inventory(nodes)
    assert sorted(slot.id for slot in inventory.slots) == [
        "node1/0",
        "node1/1",
        "node2/0",
        "node2/1",
        "node3/0:0",
        "node3/0:1",
    ]
    for slot in inventory.slots:
        assert slot.uuid == node_inventory(slot.node).slot(split_slot_id(slot.id)[1]).uuid


def test_eight_users_six_slots_three_nodes_nobody_shares(cluster, manager, tmp_path):
    trust = provenance.load(tmp_path / "state")
    allocator = allocator_for(cluster, manager, tmp_path, trust)
    granted, refused = {}, {}
    for user in USERS:
        decision, service_id = spawn(allocator, manager, cluster, trust, user)
        if decision.ok:
            granted[user] = (decision.granted[0], service_id)
        else:
            refused[user] = decision
    # spread: every node used; six slots for six users; two wait, told why
    assert sorted(slot for slot, _ in granted.values()) == sorted(
        s.id for s in allocator.inventory.slots
    )
    assert set(refused) == {"user6", "user7"}
    assert all(d.code == "busy" for d in refused.values())
    node_ids = {n["ID"]: n["Description"]["Hostname"] for n in cluster.node_objects()}
    for user, (slot_id, service_id) in granted.items():
        task = wait_until(lambda s=service_id: running_task(manager, s), 90, message=user)
        node, _local = split_slot_id(slot_id)
        assert node_ids[task["NodeID"]] == node, f"{user}'s server is not on its slot's node"
        # the node's own engine runs it with the slot's UUID, and its signed labels
        with contextlib.closing(cluster.nodes[node].client()) as engine:
            (container,) = engine.api.containers(filters={"label": f"ds01.user={user}"})
            env = engine.api.inspect_container(container["Id"])["Config"]["Env"]
        assert f"NVIDIA_VISIBLE_DEVICES={allocator.inventory.slot(slot_id).uuid}" in env
    # holdings come from Swarm's objects: six running, one per slot
    holdings = allocator.holdings()
    assert sorted(h.slot_id for h in holdings if h.state == "running") == sorted(
        slot for slot, _ in granted.values()
    )
    # quotas count across nodes: user0 holds one slot (max 1) and asks for another server
    second = allocator.allocate(
        GpuRequest("user0", service_name("user0", "other"), count=1),
        LIMITS.resolve("user0"),
    )
    assert second.code == "user_limit"
    # Swarm itself refuses a second task on a taken slot (a service made past ds01hub)
    slot = allocator.inventory.slot(granted["user0"][0])
    rogue = service_spec(
        name="rogue",
        image=cluster.image,
        command=["sleep", "3600"],
        env={},
        signed_labels={"ds01.test": "1"},
        slots=[slot],
    )
    rogue_id = create_service(manager, rogue)
    scale_service(manager, rogue_id, 1)
    task = wait_until(
        lambda: next(iter(manager.api.tasks(filters={"service": rogue_id})), None), 30
    )
    wait_until(
        lambda: (
            "insufficient resources"
            in (manager.api.inspect_task(task["ID"])["Status"].get("Err") or "")
        ),
        30,
        message="the rogue task pending for insufficient resources",
    )
    assert manager.api.inspect_task(task["ID"])["Status"]["State"] == "pending"
    manager.api.remove_service(rogue_id)
    # a waiter starts when a slot frees: user0 stops (scaled to zero, hold 0s)
    scale_service(manager, granted["user0"][1], 0)
    wait_until(lambda: running_task(manager, granted["user0"][1]) is None, 60)
    decision, service_id = spawn(allocator, manager, cluster, trust, "user6")
    assert decision.granted == (granted["user0"][0],)
    wait_until(lambda: running_task(manager, service_id), 90, message="user6's server")


def test_a_real_single_user_server_on_a_worker_through_the_hub(
    cluster, manager, tmp_path, singleuser_image
):
    """DS01SwarmSpawner: the hub on this host, the single-user image from the cluster's
    registry; a MIG request can only land on node3 (a worker): the server runs there, on its
    slot, and answers through the hub's proxy. Stop scales its service to zero (kept)."""
    reference = cluster.push_image(singleuser_image, "ds01hub/singleuser:swarm-test")
    limits_file = tmp_path / "limits.yaml"
    limits_file.write_text("defaults: {max_gpus: 1, gpu_hold_after_stop: 1h}\n")
    hub = Hub(
        directory=tmp_path / "hub",
        hub_ip=cluster.gateway(),
        image=reference,
        spawner="ds01hub.spawner.swarm_spawner.DS01SwarmSpawner",
        extra_config=(
            f"c.DS01SwarmSpawner.client_kwargs = {{'base_url': {cluster.manager.url!r}}}\n"
            f"c.DS01SwarmSpawner.limits_path = {str(limits_file)!r}\n"
            "c.DS01SwarmSpawner.gpu_wait_interval = 0.5\n"
        ),
    )
    hub.start()
    try:
        hub.create_user("mia")
        hub.start_server("mia", options={"mig": "3g.40gb"})
        hub.wait_ready("mia", timeout=240)
        token = hub.token_for("mia")
        response = hub.user_request(token, "GET", "mia", "api/status")
        assert response.status_code == 200, response.text
        (service,) = manager.api.services(filters={"name": "default--mia"})
        assert service["Spec"]["Labels"]["ds01.gpus"].startswith("node3/0:")
        task = running_task(manager, service["ID"])
        assert manager.api.inspect_node(task["NodeID"])["Description"]["Hostname"] == "node3"
        hub.stop_server("mia")
        (service,) = manager.api.services(filters={"name": "default--mia"})
        assert service["Spec"]["Mode"]["Replicated"]["Replicas"] == 0
    finally:
        hub.stop()


def _set_availability(manager, hostname, availability):
    node = next(n for n in manager.api.nodes() if n["Description"]["Hostname"] == hostname)
    spec = dict(node["Spec"], Availability=availability)
    manager.api.update_node(node["ID"], node["Version"]["Index"], spec)


def test_a_drained_node_takes_no_new_servers(cluster, manager, tmp_path):
    _set_availability(manager, "node3", "drain")
    try:
        trust = provenance.load(tmp_path / "state")
        allocator = allocator_for(cluster, manager, tmp_path, trust)
        assert {s.node for s in allocator.inventory.slots} == {"node1", "node2"}
        nodes = set()
        for user in USERS[:4]:
            decision, _ = spawn(allocator, manager, cluster, trust, user)
            nodes |= {split_slot_id(s)[0] for s in decision.granted}
        assert nodes == {"node1", "node2"}
    finally:
        _set_availability(manager, "node3", "active")


def test_a_killed_worker_s_servers_stop_their_slots_free_after_the_hold_and_it_rejoins(
    cluster, manager, tmp_path
):
    """node2's power goes: its server is reported stopped and held for its hold (the clock is
    moved past it), the others run on; node2 comes back and takes new servers again."""
    limits = parse_limits({"defaults": {"max_gpus": 1, "gpu_hold_after_stop": "1h"}})
    trust = provenance.load(tmp_path / "state")
    later = timedelta()
    allocator = allocator_for(cluster, manager, tmp_path, trust, limits)
    allocator.clock = lambda: utcnow() + later
    services = {}
    for user in USERS[:3]:
        decision, service_id = spawn(allocator, manager, cluster, trust, user)
        services[split_slot_id(decision.granted[0])[0]] = (user, service_id)
    assert set(services) == {"node1", "node2", "node3"}
    for _user, service_id in services.values():
        wait_until(lambda s=service_id: running_task(manager, s), 90)
    cluster.kill("node2")
    wait_until(lambda: node_state(manager, "node2") == "down", 90, message="node2 seen down")
    states = {h.container: h for h in allocator.holdings()}
    lost = states[service_name(services["node2"][0])]
    documents = swarm_lister(manager, trust)()
    assert lost.state == "stopped", documents
    assert lost.held_until is not None  # held for its hold
    for node in ("node1", "node3"):
        assert states[service_name(services[node][0])].state == "running"
    nodes = [parse_node(n) for n in manager.api.nodes()]
    assert "node2" not in {s.node for s in cluster_inventory(nodes).slots}
    # the hub's poll stops a server whose node is down (DS01SwarmSpawner.poll): zero replicas
    scale_service(manager, services["node2"][1], 0)
    later = timedelta(hours=2)
    assert service_name(services["node2"][0]) not in {h.container for h in allocator.holdings()}
    # node2 comes back (same data: it rejoins the swarm) and is offered again
    cluster.revive("node2")
    wait_until(lambda: node_state(manager, "node2") == "ready", 120, message="node2 back")
    wait_until(lambda: running_task(manager, services["node2"][1]) is None, 60)
    # a rejoining node is "ready" before its description (its slots) is seen again
    wait_until(
        lambda: "node2" in {s.node for s in inventory_of(cluster).slots},
        60,
        message="node2's slots offered again",
    )
    allocator = allocator_for(cluster, manager, tmp_path, trust, limits)
    allocator.clock = lambda: utcnow() + later
    decision, service_id = spawn(allocator, manager, cluster, trust, "user3")
    assert split_slot_id(decision.granted[0])[0] == "node2", decision
    task = wait_until(lambda: running_task(manager, service_id), 120, message="user3 on node2")
    assert manager.api.inspect_node(task["NodeID"])["Description"]["Hostname"] == "node2"
