"""Idle culling across a swarm: a GPU server on a worker, its use read from its node's metrics
endpoint in dcgm-exporter's names.

On the session's three-node cluster (tests/harness/swarm.py): the node exporter
(`ds01hub.services.node_exporter`, the single-user image of this checkout from the cluster's
registry) runs as a *global* service, each task serving its node's simulated inventory and its
containers' CPU (the node's cgroups, mounted read-only); the simulated utilisation is the
file `/run/ds01-sim/gpu-util.json` on the node, written here through `docker exec` on the node's
container. The hub on this host runs DS01SwarmSpawner; the culler is ds01-ops' own
(`build_components` in swarm mode, a `NodeMetricsSource` discovering the endpoints from the
global service's tasks), run a pass at a time with its clock two hours on.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from datetime import timedelta

import pytest
from harness.hub import Hub
from harness.swarm import NODE_GPUS
from harness.wait import wait_until

from ds01hub import provenance
from ds01hub.gpu.cluster import split_slot_id
from ds01hub.gpu.dcgm import MetricsError, fetch_metrics
from ds01hub.gpu.swarm_state import create_service
from ds01hub.hub.client import HubClient
from ds01hub.services.ops.app import build_components
from ds01hub.services.ops.node_metrics import NodeMetricsSource
from ds01hub.units import utcnow

pytestmark = pytest.mark.swarm

EXPORTER = "ds01-node-metrics-test"
SIM_DIR = "/run/ds01-sim"
PORT = 9400


def _node_exec(cluster, hostname: str, script: str) -> None:
    """Run `script` (sh) on the node itself (its dind container)."""
    container = cluster.nodes[hostname].container
    subprocess.run(["docker", "exec", container, "sh", "-c", script], check=True)


def _write_on_node(cluster, hostname: str, name: str, text: str) -> None:
    quoted = text.replace("'", "'\\''")
    _node_exec(
        cluster,
        hostname,
        f"mkdir -p {SIM_DIR} && printf '%s' '{quoted}' > {SIM_DIR}/{name}.tmp "
        f"&& chmod 644 {SIM_DIR}/{name}.tmp && mv {SIM_DIR}/{name}.tmp {SIM_DIR}/{name}",
    )


def _limits_yaml(hostname: str) -> str:
    """The node's simulated inventory as a limits file (the same UUIDs as its generic
    resources: same seed, same GPUs)."""
    gpus = [{"mig": list(spec.mig)} if spec.mig else {} for spec in NODE_GPUS[hostname]]
    return json.dumps({"gpu_allocation": {"simulate": {"seed": hostname, "gpus": gpus}}})


def _exporter_spec(image: str) -> dict:
    command = [
        "python3", "-m", "ds01hub.services.node_exporter",
        "--limits", f"{SIM_DIR}/limits.yaml",
        "--listen", f"0.0.0.0:{PORT}",
        "--cgroup-root", "/host/cgroup",
        "--simulated-utilization", f"{SIM_DIR}/gpu-util.json",
    ]  # fmt: skip
    return {
        "Name": EXPORTER,
        "Labels": {"ds01.test": "1"},
        "TaskTemplate": {
            "ContainerSpec": {
                "Image": image,
                "Command": command,
                "Hostname": "{{.Node.Hostname}}",  # the exporter names its node by it
                "Mounts": [
                    {"Type": "bind", "Source": SIM_DIR, "Target": SIM_DIR, "ReadOnly": True},
                    {
                        "Type": "bind",
                        "Source": "/sys/fs/cgroup",
                        "Target": "/host/cgroup",
                        "ReadOnly": True,
                    },
                ],
            },
        },
        "Mode": {"Global": {}},
        "EndpointSpec": {
            "Ports": [
                {
                    "Protocol": "tcp",
                    "TargetPort": PORT,
                    "PublishedPort": PORT,
                    "PublishMode": "host",
                }
            ]
        },
    }


def _set_availability(manager, hostname: str, availability: str) -> None:
    node = next(n for n in manager.api.nodes() if n["Description"]["Hostname"] == hostname)
    spec = dict(node["Spec"], Availability=availability)
    manager.api.update_node(node["ID"], node["Version"]["Index"], spec)


def _cpu_diagnosis(cluster, source, trust) -> str:
    """What node2's exporter and cgroups show, for a failed CPU assertion."""
    placement = next(iter(source.running(trust).values()), None)
    metrics = fetch_metrics(source.endpoints()["node2"][0])
    listing = subprocess.run(
        ["docker", "exec", cluster.nodes["node2"].container, "sh", "-c",
         "ls /sys/fs/cgroup/cpu,cpuacct/ /sys/fs/cgroup/cpu,cpuacct/docker | head -40"],
        capture_output=True, text=True,
    )  # fmt: skip
    return f"task: {placement}; exporter: {sorted(metrics.cpu_seconds)[:8]}; {listing.stdout}"


def verdict(report, user: str) -> tuple[str, str, str]:
    (line,) = [s for s in report.servers if s.user == user]
    return line.verdict.action, line.verdict.code, line.verdict.reason


async def test_a_gpu_server_on_a_worker_is_kept_while_busy_and_culled_when_idle(
    swarm_cluster, swarm_manager, tmp_path, singleuser_image
):
    cluster, manager = swarm_cluster, swarm_manager
    reference = cluster.push_image(singleuser_image, "ds01hub/singleuser:swarm-test")
    for hostname in NODE_GPUS:
        _write_on_node(cluster, hostname, "limits.yaml", _limits_yaml(hostname))
        _write_on_node(cluster, hostname, "gpu-util.json", "{}")
    limits_file = tmp_path / "limits.yaml"
    limits_file.write_text("defaults: {max_gpus: 1, gpu_hold_after_stop: 1h, idle_timeout: 1h}\n")
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
    # only node2 (a worker) takes the server and runs an exporter: the others are drained
    drained = ["node1", "node3"]
    exporter_id = None
    for hostname in drained:
        _set_availability(manager, hostname, "drain")
    hub.start()
    try:
        hub.create_user("mia")
        hub.start_server("mia", options={"gpus": 1})
        hub.wait_ready("mia", timeout=300)
        (service,) = manager.api.services(filters={"name": "default--mia"})
        (slot,) = service["Spec"]["Labels"]["ds01.gpus"].split(",")
        node, local = split_slot_id(slot)
        assert node == "node2"

        source = NodeMetricsSource(manager, service=EXPORTER, timeout=5)
        parts = build_components(
            HubClient(f"{hub.url}/hub/api", hub.admin_token),
            manager,
            limits_file,
            hub.state_dir,
            cluster=source,
            clock=lambda: utcnow() + timedelta(hours=2),
            warn_before=0,
            gpu_samples=2,
            gpu_sample_interval=1.0,
            cpu_sample_interval=1.0,
        )

        # no endpoint on node2 yet: its use is unknown, so the server is kept, and why is named
        action, code, reason = verdict(await parts.culler.run_once(), "mia")
        assert (action, code) == ("keep", "busy"), reason
        assert f"no metrics endpoint for node node2 (no running task of service {EXPORTER})" in (
            reason
        )
        model = parts.overview()
        assert any(a.startswith("node node2: no metrics endpoint") for a in model["alerts"])

        exporter_id = create_service(manager, _exporter_spec(reference))

        def answers():
            urls = source.endpoints().get("node2")
            if not urls:
                return None
            with contextlib.suppress(MetricsError):
                return fetch_metrics(urls[0], timeout=5)
            return None

        wait_until(answers, timeout=120, message="node2's exporter answers")

        # busy: its GPU at 90% on node2's endpoint -> kept, and the admin page shows it
        _write_on_node(cluster, "node2", "gpu-util.json", json.dumps({local: 90}))
        action, code, reason = verdict(await parts.culler.run_once(), "mia")
        assert (action, code) == ("keep", "busy"), reason
        assert f"GPU {slot} at 90%" in reason
        model = parts.overview()
        (row,) = [r for r in model["nodes"] if r["node"] == "node2"]
        assert {s["slot"]: s["percent"] for s in row["slots"]}[slot] == 90
        assert row["endpoints"] and row["problem"] is None
        (drained_row,) = [r for r in model["nodes"] if r["node"] == "node1"]
        assert "no metrics endpoint for node node1" in drained_row["problem"]
        assert "CPU use unknown" not in reason, _cpu_diagnosis(
            cluster, source, provenance.load(hub.state_dir)
        )

        # idle: 0% and no hub activity for two hours -> culled: the hub stops it (scaled to 0)
        _write_on_node(cluster, "node2", "gpu-util.json", "{}")
        action, code, reason = verdict(await parts.culler.run_once(), "mia")
        assert (action, code) == ("cull", "idle"), reason
        assert f"GPU {slot} under 5%" in reason
        wait_until(
            lambda: not (hub.server("mia") or {}).get("ready"),
            timeout=120,
            message="the hub stopped mia's server",
        )
        (service,) = manager.api.services(filters={"name": "default--mia"})
        assert service["Spec"]["Mode"]["Replicated"]["Replicas"] == 0  # kept, holding its slot
    finally:
        hub.stop()
        if exporter_id is not None:  # gone before the drained nodes would start (pull) it
            with contextlib.suppress(Exception):
                manager.api.remove_service(exporter_id)
        for hostname in drained:
            _set_availability(manager, hostname, "active")
        for hostname in NODE_GPUS:
            with contextlib.suppress(subprocess.CalledProcessError):
                _node_exec(cluster, hostname, f"rm -rf {SIM_DIR}")
