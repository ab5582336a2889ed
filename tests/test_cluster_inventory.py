"""The swarm's inventory: each node's daemon.json snippet, read back from Swarm's node objects as
node-qualified slots; the same allocator decides across nodes (ds01hub/gpu/cluster.py).

The property test drives the real `GpuAllocator` (lock, state files) over a 3-node cluster of
6 slots (one node with MIG instances) for 8 users: whatever the order of spawns, stops, removals
and node losses, no two running containers ever share a slot, and a lost node's slots are never
handed out while it is gone.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from harness.allocation_fakes import Clock, FakeEngine, Processes, allocator_for
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from ds01hub.gpu.cluster import (
    ClusterError,
    cluster_inventory,
    daemon_json,
    generic_resources,
    lost_nodes,
    parse_node,
    split_slot_id,
)
from ds01hub.gpu.decision import GpuRequest, decide
from ds01hub.gpu.inventory import discover
from ds01hub.gpu.simulated_nvml import SimulatedNvml
from ds01hub.limits import SimulateConfig, SimulatedGpuSpec, parse_limits

#: three nodes, six slots: two whole GPUs, two whole GPUs, one GPU as two 3g.40gb instances
NODE_GPUS = {
    "node1": (SimulatedGpuSpec(), SimulatedGpuSpec()),
    "node2": (SimulatedGpuSpec(), SimulatedGpuSpec()),
    "node3": (SimulatedGpuSpec(mig=("3g.40gb", "3g.40gb")),),
}


def node_inventory(hostname: str):
    """What `ds01hub gpus` sees on that node (its own simulated NVML, its own seed)."""
    config = SimulateConfig(gpus=NODE_GPUS[hostname], seed=hostname)
    return discover(SimulatedNvml.from_config(config), simulated=True)


def node_object(hostname: str, state: str = "ready", availability: str = "active") -> dict:
    """A node object as `GET /nodes` returns it, with the node's daemon.json resources."""
    resources = []
    for line in daemon_json(node_inventory(hostname))["node-generic-resources"]:
        kind, value = line.split("=", 1)
        resources.append({"NamedResourceSpec": {"Kind": kind, "Value": value}})
    resources.append({"DiscreteResourceSpec": {"Kind": "SSD", "Value": 2}})  # not ours
    return {
        "ID": f"id-{hostname}",
        "Spec": {
            "Role": "manager" if hostname == "node1" else "worker",
            "Availability": availability,
        },
        "Description": {"Hostname": hostname, "Resources": {"GenericResources": resources}},
        "Status": {"State": state},
    }


def test_daemon_json_names_every_slot_by_kind_and_uuid():
    inventory = node_inventory("node3")
    lines = generic_resources(inventory)
    assert [line.split("=")[0] for line in lines] == [
        "DS01-MIG-0:0-3g.40gb",
        "DS01-MIG-0:1-3g.40gb",
    ]
    assert [line.split("=")[1] for line in lines] == [slot.uuid for slot in inventory.slots]
    assert daemon_json(node_inventory("node1"))["node-generic-resources"][0].startswith(
        "DS01-GPU-0=GPU-"
    )


def test_node_objects_become_one_inventory_of_qualified_slots():
    nodes = [parse_node(node_object(name), simulated=True) for name in NODE_GPUS]
    inventory = cluster_inventory(nodes)
    assert [s.id for s in inventory.slots] == [
        "node1/0",
        "node1/1",
        "node2/0",
        "node2/1",
        "node3/0:0",
        "node3/0:1",
    ]
    mig = inventory.slot("node3/0:1")
    assert (mig.node, mig.profile, mig.memory_mb) == ("node3", "3g.40gb", 40 * 1024)
    assert mig.uuid == node_inventory("node3").slot("0:1").uuid
    assert nodes[0].manager and not nodes[1].manager


def test_drained_and_down_nodes_offer_nothing_and_down_ones_are_lost():
    nodes = [
        parse_node(node_object("node1")),
        parse_node(node_object("node2", availability="drain")),
        parse_node(node_object("node3", state="down")),
    ]
    assert {s.node for s in cluster_inventory(nodes).slots} == {"node1"}
    assert lost_nodes(nodes) == {"node3"}
    assert cluster_inventory([nodes[2]]).reason.startswith("no node of the swarm offers")


@pytest.mark.parametrize(
    ("kind", "value", "problem"),
    [
        ("DS01-GPU-x", "GPU-a", "not a ds01hub slot"),
        ("DS01-MIG-0:1-9g.1gb", "MIG-a", "is no MIG profile"),
        ("DS01-GPU-0", "rm -rf /", "not a GPU/MIG UUID"),
    ],
)
def test_malformed_resources_of_ours_are_named_and_offered_to_nobody(kind, value, problem):
    attrs = node_object("node1")
    attrs["Description"]["Resources"]["GenericResources"].append(
        {"NamedResourceSpec": {"Kind": kind, "Value": value}}
    )
    node = parse_node(attrs)
    assert len(node.slots) == 2
    assert len(node.problems) == 1 and problem in node.problems[0]


@pytest.mark.parametrize(
    "attrs",
    [{}, {"ID": "x"}, {"ID": "x", "Description": {"Hostname": "a/b"}}, {"ID": "x", "Spec": []}],
)
def test_unusable_node_objects_are_named_errors(attrs):
    with pytest.raises(ClusterError):
        parse_node(attrs)


def test_slot_ids_split_into_node_and_local_id():
    assert split_slot_id("node2/1:3") == ("node2", "1:3")
    assert split_slot_id("1:3") == ("", "1:3")
    with pytest.raises(ClusterError, match="not a node hostname"):
        split_slot_id("../x/0")


def test_spread_fills_the_emptiest_node_first_and_pack_the_fullest():
    inventory = cluster_inventory([parse_node(node_object(name)) for name in NODE_GPUS])
    limits = parse_limits({"defaults": {"max_gpus": 8}}).resolve("u")
    holdings = []
    spread = []
    for number in range(3):
        decision = decide(GpuRequest("u", f"c{number}", count=1), inventory.slots, holdings, limits)
        spread.append(decision.granted[0])
        holdings += _held(decision.granted, f"c{number}")
    assert {split_slot_id(s)[0] for s in spread} == {"node1", "node2", "node3"}
    packed = decide(
        GpuRequest("v", "p", count=1), inventory.slots, _held(("node2/0",), "x"), limits, "pack"
    )
    assert packed.granted == ("node2/1",)


def _held(slots, container):
    from ds01hub.gpu.decision import Holding

    return [Holding(slot, "x", container, "running", 10) for slot in slots]


# ------------------------------------------------------------------------------------------
# property: 8 users, 6 slots, 3 nodes, nobody shares a slot

USERS = [f"user{n}" for n in range(8)]
LIMITS = parse_limits(
    {"defaults": {"max_gpus": 1, "max_gpus_per_container": 1, "gpu_hold_after_stop": "30s"}}
)


class ClusterAllocation(RuleBasedStateMachine):
    """The spawner's protocol (allocate -> create -> begin_start -> start -> commit) for 8
    users over the cluster inventory, with stops, removals, time and nodes that die and come
    back (a dead node's containers stop with it; its slots are not offered until it is back)."""

    @initialize()
    def setup(self):
        self.directory = Path(tempfile.mkdtemp(prefix="ds01-cluster-"))
        self.engine = FakeEngine(Clock())
        self.processes = Processes()
        self.down: set[str] = set()
        self.pids = itertools.count(100)
        self.by_user: dict[str, str] = {}  # user -> container id

    def teardown(self):
        shutil.rmtree(self.directory, ignore_errors=True)

    def allocator(self, pid: int):
        nodes = [
            parse_node(node_object(n, state="down" if n in self.down else "ready"), True)
            for n in NODE_GPUS
        ]
        return allocator_for(
            pid,
            self.engine,
            self.processes,
            cluster_inventory(nodes),
            self.directory,
            None,
            LIMITS,
        )

    @rule(user=st.sampled_from(USERS), mig=st.booleans())
    def spawn(self, user, mig):
        existing = self.engine.containers.get(self.by_user.get(user, ""))
        if existing is not None and existing.running:
            return
        pid = next(self.pids)
        allocator = self.allocator(pid)
        name = f"default._.{user}"
        request = GpuRequest(user, name, count=1, mig_profile="3g.40gb" if mig else None)
        decision = allocator.allocate(request, LIMITS.resolve(user))
        if not decision.ok:
            assert decision.code in ("busy", "not_available", "user_limit"), decision.reason
            return
        assert not {split_slot_id(s)[0] for s in decision.granted} & self.down
        if existing is not None and existing.slots != decision.granted:
            self.engine.remove(existing.id)  # the spawner recreates on other slots
            existing = None
        container = (
            existing.id
            if existing
            else self.engine.create(name, user, decision.granted, owner=Processes.owner(pid))
        )
        self.by_user[user] = container
        check = allocator.begin_start(name, container)
        if check.ok:
            self.engine.start(container)
            allocator.commit(name)
        else:
            allocator.release(name, "start refused")

    @rule(mig=st.booleans())
    def everyone_spawns(self, mig):
        """All 8 users at once against 6 slots: 2 (or more) must wait."""
        for user in USERS:
            self.spawn(user, mig and user in ("user6", "user7"))

    @rule(user=st.sampled_from(USERS))
    def stop(self, user):
        if user in self.by_user:
            self.engine.stop(self.by_user[user])

    @rule(user=st.sampled_from(USERS))
    def remove(self, user):
        container = self.by_user.pop(user, None)
        if container:
            self.engine.stop(container)
            self.engine.remove(container)

    @rule(node=st.sampled_from(sorted(NODE_GPUS)))
    def node_dies(self, node):
        self.down.add(node)
        for container in self.engine.containers.values():
            if container.running and any(split_slot_id(s)[0] == node for s in container.slots):
                self.engine.stop(container.id)

    @rule(node=st.sampled_from(sorted(NODE_GPUS)))
    def node_returns(self, node):
        self.down.discard(node)

    @rule(seconds=st.sampled_from([5.0, 40.0]))
    def time_passes(self, seconds):
        self.engine.clock.advance(seconds)

    @invariant()
    def nobody_shares_a_slot(self):
        if not hasattr(self, "engine"):
            return
        for slot, holders in self.engine.running_holders().items():
            assert len(holders) == 1, f"{slot} shared by {holders}"
            assert split_slot_id(slot)[0] not in self.down, f"{slot} runs on a dead node"
        assert self.engine.overlaps() == []


ClusterAllocation.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_cluster_allocation = ClusterAllocation.TestCase


def test_ds01hub_prints_the_nodes_daemon_json_snippet():
    """`ds01hub gpus --swarm-daemon-json` on a node: what its daemon.json needs, from its
    (here simulated) NVML; without GPUs it says why and exits 1."""
    command = str(Path(sys.executable).with_name("ds01hub"))
    config = Path(__file__).parent.parent / "config" / "resource-limits.yaml"
    result = subprocess.run(
        [command, "gpus", "--swarm-daemon-json", "--limits", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = json.loads(result.stdout)["node-generic-resources"]
    assert [line.split("=")[0] for line in lines] == [
        "DS01-GPU-0",
        "DS01-GPU-1",
        "DS01-MIG-2:0-2g.20gb",
        "DS01-MIG-2:1-2g.20gb",
        "DS01-MIG-2:2-2g.20gb",
    ]
    # no limits file, no NVIDIA library or GPU here: nothing to offer, and why
    environment = {**os.environ, "DS01HUB_LIMITS": ""}
    result = subprocess.run(
        [command, "gpus", "--swarm-daemon-json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
    )
    if result.returncode != 0:  # (a machine with a real GPU prints its snippet)
        assert result.returncode == 1 and "no GPU slots to offer: " in result.stderr
