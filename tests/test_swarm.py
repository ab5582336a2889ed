"""A Docker Swarm of GPU servers as one system: three dind nodes (tests/harness/swarm.py), each
with its own simulated inventory (node3's as MIG instances), a local registry, ds01hub on the
host talking to the manager's and the nodes' engines.
"""

from __future__ import annotations

import pytest
from harness.swarm import SwarmCluster, node_inventory

from ds01hub.gpu.cluster import cluster_inventory, parse_node

pytestmark = pytest.mark.swarm


@pytest.fixture(scope="module")
def cluster(docker_client):
    swarm = SwarmCluster().start()
    yield swarm
    swarm.close()


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
        assert slot.uuid == node_inventory(slot.node).slot(slot.id.split("/")[1]).uuid
