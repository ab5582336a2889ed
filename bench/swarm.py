"""Swarm benchmark: the allocator's decision across a cluster, and spawn time on a worker.

    .venv/bin/python bench/swarm.py [--decisions 300] [--spawns 5] [--no-spawn]

1. Decision (no Docker): a SIMULATED cluster of 10 nodes x 8 GPUs, 3 of each node's GPUs as 7
   MIG 1g.10gb instances (10 x (5 + 21) = 260 slots), read back from node objects as the hub
   does (`parse_node` -> `cluster_inventory`); 5,000 services (signed labels) with their tasks:
   200 running on a slot, 40 stopped within their hold, 1,000 stopped past it, the rest
   CPU-only. Rows: `decide` alone on built holdings; `allocate` = the full path each spawn takes:
   services/tasks/nodes -> container documents (`service_documents`) -> verify signatures ->
   holdings -> decide under the allocator's lock -> claim written.
2. Spawn (the shared engine and a 3-node dind swarm, tests/harness/swarm.py; needs root and
   the engine lock): time from "create" to "running" of the busybox stand-in, `--spawns` times
   each, as a container on this host (`docker create` + `start`) and as a DS01 service on a
   worker (create at zero replicas, scale to one, task running). The ratio of medians is the
   swarm's overhead (scheduling, the task's dispatch to the worker), one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from ds01hub import labels  # noqa: E402
from ds01hub.gpu.allocator import GpuAllocator  # noqa: E402
from ds01hub.gpu.cluster import cluster_inventory, daemon_json, parse_node  # noqa: E402
from ds01hub.gpu.decision import GpuRequest, decide  # noqa: E402
from ds01hub.gpu.inventory import discover  # noqa: E402
from ds01hub.gpu.simulated_nvml import SimulatedNvml  # noqa: E402
from ds01hub.gpu.swarm_state import service_documents  # noqa: E402
from ds01hub.limits import SimulatedGpuSpec, parse_limits  # noqa: E402
from ds01hub.provenance import Provenance  # noqa: E402

TRUST = Provenance("bench", bytes(range(32)))
LIMITS = parse_limits({"defaults": {"max_gpus": 2, "gpu_hold_after_stop": "2h"}})
NODES = [f"gpu{n:02d}" for n in range(10)]
_now = datetime.now(UTC)
NOW = _now.strftime("%Y-%m-%dT%H:%M:%SZ")
RECENT = (_now - timedelta(minutes=30)).strftime("%Y-%m-%dT%H:%M:%SZ")  # within the 2h hold
LONG_AGO = (_now - timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")


def node_objects() -> list[dict]:
    objects = []
    for number, hostname in enumerate(NODES):
        gpus = [SimulatedGpuSpec() for _ in range(5)]
        gpus += [SimulatedGpuSpec(mig=("1g.10gb",) * 7) for _ in range(3)]
        inventory = discover(SimulatedNvml(gpus, hostname), simulated=True)
        resources = []
        for line in daemon_json(inventory)["node-generic-resources"]:
            kind, value = line.split("=", 1)
            resources.append({"NamedResourceSpec": {"Kind": kind, "Value": value}})
        objects.append(
            {
                "ID": f"node{number}",
                "UpdatedAt": NOW,
                "Spec": {"Role": "worker", "Availability": "active"},
                "Description": {"Hostname": hostname, "Resources": {"GenericResources": resources}},
                "Status": {"State": "ready"},
            }
        )
    return objects


def cluster(nodes: list[dict]) -> tuple[list[dict], list[dict]]:
    """5,000 services and their tasks (see the module doc)."""
    slots = cluster_inventory(parse_node(n, True) for n in nodes).slots
    node_id = {n["Description"]["Hostname"]: n["ID"] for n in nodes}
    services, tasks = [], []
    for i in range(5000):
        user, name = f"user{i % 700}", f"p{i}--user{i % 700}"
        if i < 240:
            gpus, state, replicas = (slots[i].id,), "running" if i < 200 else "shutdown", 1
            when = NOW if i < 200 else RECENT
        elif i < 1240:
            gpus, state, replicas, when = (
                (slots[i % len(slots)].id,),
                "shutdown",
                0,
                "2026-02-01T00:00:00Z",
            )
        else:
            gpus, state, replicas, when = (), "running", 1, NOW
        values = labels.container_labels(
            user=user, project=f"p{i}", group=None, priority=10, gpus=gpus, image="img"
        )
        node = node_id[gpus[0].split("/")[0]] if gpus else "node0"
        services.append(
            {
                "ID": f"s{i}",
                "CreatedAt": "2026-01-01T00:00:00Z",
                "Spec": {
                    "Name": name,
                    "Labels": TRUST.sign(values, name),
                    "Mode": {"Replicated": {"Replicas": replicas if i < 200 or i >= 1240 else 0}},
                    "TaskTemplate": {"ContainerSpec": {"Image": "img"}},
                },
            }
        )
        tasks.append(
            {"ServiceID": f"s{i}", "NodeID": node, "Status": {"State": state, "Timestamp": when}}
        )
    return services, tasks


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def bench_decisions(count: int) -> None:
    nodes = node_objects()
    services, tasks = cluster(nodes)
    inventory = cluster_inventory(parse_node(n, True) for n in nodes)
    with tempfile.TemporaryDirectory() as directory:
        allocator = GpuAllocator(
            None,
            inventory,
            directory,
            limits=LIMITS,
            container_lister=lambda: service_documents(services, tasks, nodes),
            container_remover=lambda _id: True,
            trust=TRUST,
        )
        holdings = allocator.holdings()
        resolved = LIMITS.resolve("newcomer")
        pure, full = [], []
        for i in range(count):
            request = GpuRequest("newcomer", f"bench{i}", count=1)
            began = time.perf_counter()
            decide(request, inventory.slots, holdings, resolved)
            pure.append(time.perf_counter() - began)
        for i in range(count):
            request = GpuRequest(f"new{i}", f"bench{i}", count=1)
            began = time.perf_counter()
            decision = allocator.allocate(request, LIMITS.resolve(f"new{i}"))
            full.append(time.perf_counter() - began)
            assert decision.ok, decision.reason
            allocator.release(f"bench{i}")
    print(
        f"cluster: {len(nodes)} nodes, {len(inventory.slots)} slots, {len(services)} services, "
        f"{len(holdings)} holdings"
    )
    for label, samples in (("decide (pure)", pure), ("allocate (full path)", full)):
        median, p99 = percentiles(samples)
        print(f"{label:24} median {median * 1e3:8.2f} ms   p99 {p99 * 1e3:8.2f} ms   n={count}")


def bench_spawn(count: int) -> None:
    import docker
    from harness.cli import busybox_image
    from harness.swarm import SwarmCluster
    from harness.wait import wait_until

    from ds01hub.gpu.swarm_state import create_service, scale_service
    from ds01hub.spawner.swarm_plan import service_spec

    host = docker.from_env()
    image = busybox_image(host)
    swarm = SwarmCluster().start()
    try:
        reference = swarm.push_image(image, "ds01test/busybox:bench")
        manager = swarm.manager.client()
        local, remote = [], []
        for i in range(count):
            began = time.perf_counter()
            container = host.containers.create(
                image, ["sleep", "60"], labels={"ds01.test": "1"}, name=f"ds01bench-{i}"
            )
            container.start()
            wait_until(lambda c=container: (c.reload(), c.status)[1] == "running", 60)
            local.append(time.perf_counter() - began)
            container.remove(force=True)
            began = time.perf_counter()
            body = service_spec(
                name=f"bench{i}",
                image=reference,
                command=["sleep", "60"],
                env={},
                signed_labels={"ds01.test": "1"},
                slots=[],
                node="node2",
            )
            service_id = create_service(manager, body)
            scale_service(manager, service_id, 1)
            wait_until(
                lambda s=service_id: any(
                    t["Status"]["State"] == "running"
                    for t in manager.api.tasks(filters={"service": s})
                ),
                120,
            )
            remote.append(time.perf_counter() - began)
            manager.api.remove_service(service_id)
        manager.close()
    finally:
        swarm.close()
    single, worker = statistics.median(local), statistics.median(remote)
    print(f"spawn on this host (container)  median {single:6.2f} s   n={count}")
    print(f"spawn on a worker (service)     median {worker:6.2f} s   n={count}")
    print(f"ratio worker / single host      {worker / single:6.2f}  (one run)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--decisions", type=int, default=300)
    parser.add_argument("--spawns", type=int, default=5)
    parser.add_argument("--no-spawn", action="store_true", help="only the decision rows")
    args = parser.parse_args()
    bench_decisions(args.decisions)
    if not args.no_spawn:
        bench_spawn(args.spawns)


if __name__ == "__main__":
    main()
