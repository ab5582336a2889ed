"""A Docker Swarm of three Docker-in-Docker nodes on the shared engine, for the `swarm` tests.

`SwarmCluster` starts, on a user-defined network of its own (never the host's interfaces):
- a local registry (`docker-registry`, Debian's package) reachable as `ds01-registry:5000`;
- node1 (manager) and node2, node3 (workers): each a dind container (the flags of
  ../shared/ENVIRONMENT.md: `--privileged` is refused here) whose dockerd offers the node's
  simulated inventory as `node-generic-resources` (written by ds01hub's own `daemon_json`) and
  listens on a unix socket bind-mounted to the host, so the tests (and the hub) talk to each
  node's engine directly.
The node image is a Debian rootfs with docker.io and docker-registry (mmdebstrap + docker
import, cached by the hash of its recipe like the project's base image). Each node's data root
is a directory on the host's disk (overlay2 works there; tmpfs would need vfs, far slower).
Everything is labelled `ds01.test=1` and removed by `close()`, also after a failed start.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import docker

from ds01hub.gpu.cluster import daemon_json
from ds01hub.gpu.inventory import Inventory, discover
from ds01hub.gpu.simulated_nvml import SimulatedNvml
from ds01hub.host import bootstrap
from ds01hub.limits import SimulateConfig, SimulatedGpuSpec
from harness.wait import wait_until

NODE_RECIPE = {
    **bootstrap.base_image_recipe(
        packages=("docker.io", "docker-registry", "ca-certificates", "iptables", "procps")
    ),
    "changes": ["ENV LANG=C.UTF-8", 'CMD ["dockerd"]'],
}
NODE_REPOSITORY = "ds01hub-test/swarm-node"
REGISTRY = "ds01-registry:5000"
#: the flags that run dockerd in a container on this kind of host (ENVIRONMENT.md)
DIND_FLAGS = (
    "--cap-add=ALL",
    "--cap-drop=SYS_RESOURCE",
    "--security-opt=seccomp=unconfined",
    "--security-opt=apparmor=unconfined",
    "--security-opt=systempaths=unconfined",
    "--cgroupns=host",
    "--volume=/sys/fs/cgroup:/sys/fs/cgroup",
    "--tmpfs=/run",
)
#: three nodes, six slots; node3's GPU is split into two MIG instances
NODE_GPUS: dict[str, tuple[SimulatedGpuSpec, ...]] = {
    "node1": (SimulatedGpuSpec(), SimulatedGpuSpec()),
    "node2": (SimulatedGpuSpec(), SimulatedGpuSpec()),
    "node3": (SimulatedGpuSpec(mig=("3g.40gb", "3g.40gb")),),
}
REGISTRY_CONFIG = """\
version: 0.1
log: {level: warn}
storage:
  filesystem: {rootdirectory: /var/lib/docker-registry}
  delete: {enabled: true}
http: {addr: ":5000"}
"""


def node_inventory(hostname: str) -> Inventory:
    """The node's own (simulated) NVML inventory, as `ds01hub gpus` there would see it."""
    config = SimulateConfig(gpus=NODE_GPUS[hostname], seed=hostname)
    return discover(SimulatedNvml.from_config(config), simulated=True)


def ensure_node_image() -> str:
    return bootstrap.ensure_rootfs_image(NODE_RECIPE, NODE_REPOSITORY).tag


def _docker(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check)


@dataclass
class Node:
    hostname: str
    container: str
    directory: Path

    @property
    def socket(self) -> Path:
        return self.directory / "sock" / "docker.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.url, timeout=60)


class SwarmCluster:
    """See the module docstring. `start()`, then `manager`, `nodes`, `client(hostname)`;
    `kill(hostname)` kills a node (its dind container) as a power cut would; `close()`."""

    def __init__(self) -> None:
        self.token = secrets.token_hex(3)
        self.prefix = f"ds01sw{self.token}"
        self.network = self.prefix
        self.directory = Path()  # a temporary directory of its own, made by start()
        self.nodes: dict[str, Node] = {}
        self.containers: list[str] = []
        self._network_made = False

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> SwarmCluster:
        self.directory = Path(tempfile.mkdtemp(prefix="ds01sw-", dir="/tmp"))
        try:
            image = ensure_node_image()
            _docker("network", "create", "--label", "ds01.test=1", self.network)
            self._network_made = True
            self._start_registry(image)
            for hostname in NODE_GPUS:
                self.nodes[hostname] = self._start_node(image, hostname)
            for node in self.nodes.values():
                wait_until(
                    lambda n=node: self._answers(n),
                    timeout=90,
                    message=f"{node.hostname}'s engine answers",
                )
            self._form_swarm()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for container in reversed(self.containers):
            _docker("rm", "--force", "--volumes", container, check=False)
        if self._network_made:
            _docker("network", "rm", self.network, check=False)
        if self.directory.name.startswith("ds01sw-"):
            shutil.rmtree(self.directory, ignore_errors=True)

    def _start_registry(self, image: str) -> None:
        config = self.directory / "registry.yml"
        config.write_text(REGISTRY_CONFIG)
        name = f"{self.prefix}-registry"
        self.containers.append(name)
        _docker(
            "run",
            "--detach",
            "--name",
            name,
            "--label",
            "ds01.test=1",
            "--network",
            self.network,
            "--network-alias",
            REGISTRY.split(":")[0],
            "--volume",
            f"{config}:/etc/ds01-registry.yml:ro",
            image,
            "docker-registry",
            "serve",
            "/etc/ds01-registry.yml",
        )

    def _start_node(self, image: str, hostname: str) -> Node:
        directory = self.directory / hostname
        (directory / "sock").mkdir(parents=True)
        (directory / "data").mkdir()
        config = {
            **daemon_json(node_inventory(hostname)),
            "insecure-registries": [REGISTRY],
            "labels": ["ds01.test=1"],
        }
        (directory / "daemon.json").write_text(json.dumps(config))
        name = f"{self.prefix}-{hostname}"
        self.containers.append(name)
        _docker(
            "run",
            "--detach",
            "--name",
            name,
            "--hostname",
            hostname,
            "--label",
            "ds01.test=1",
            "--network",
            self.network,
            *DIND_FLAGS,
            "--volume",
            f"{directory / 'data'}:/var/lib/docker",
            "--volume",
            f"{directory / 'sock'}:/run/ds01-node",
            "--volume",
            f"{directory / 'daemon.json'}:/etc/docker/daemon.json:ro",
            image,
            "dockerd",
            "--storage-driver=overlay2",
            "-H",
            "unix:///var/run/docker.sock",
            "-H",
            "unix:///run/ds01-node/docker.sock",
        )
        return Node(hostname, name, directory)

    @staticmethod
    def _answers(node: Node) -> bool:
        if not node.socket.exists():
            return False
        client = node.client()
        try:
            return bool(client.ping())
        except docker.errors.DockerException:
            return False
        finally:
            client.close()

    def _address(self, node: Node) -> str:
        inspect = json.loads(_docker("inspect", node.container).stdout)[0]
        return inspect["NetworkSettings"]["Networks"][self.network]["IPAddress"]

    def _form_swarm(self) -> None:
        manager = self.manager
        address = self._address(manager)
        with contextlib.closing(manager.client()) as client:
            client.swarm.init(advertise_addr=address, listen_addr=f"{address}:2377")
            token = client.swarm.attrs["JoinTokens"]["Worker"]
        for node in self.workers:
            with contextlib.closing(node.client()) as client:
                client.swarm.join(
                    remote_addrs=[f"{address}:2377"],
                    join_token=token,
                    advertise_addr=self._address(node),
                )
        wait_until(
            lambda: len([n for n in self.node_objects() if n["Status"]["State"] == "ready"]) == 3,
            timeout=60,
            message="three ready swarm nodes",
        )

    # -- access --------------------------------------------------------------------------

    @property
    def manager(self) -> Node:
        return self.nodes["node1"]

    @property
    def workers(self) -> list[Node]:
        return [node for name, node in self.nodes.items() if name != "node1"]

    def node_objects(self) -> list[Mapping]:
        with contextlib.closing(self.manager.client()) as client:
            return client.api.nodes()

    def gateway(self) -> str:
        """This host's address on the cluster's network (where nodes reach the hub)."""
        inspect = json.loads(_docker("network", "inspect", self.network).stdout)[0]
        return inspect["IPAM"]["Config"][0]["Gateway"]

    def registry_url(self) -> str:
        """Where this host reaches the registry's HTTP API (its address on the network)."""
        inspect = json.loads(_docker("inspect", f"{self.prefix}-registry").stdout)[0]
        address = inspect["NetworkSettings"]["Networks"][self.network]["IPAddress"]
        return f"http://{address}:5000"

    def kill(self, hostname: str) -> None:
        """The node's power goes: its dind container is killed (its engine with it)."""
        _docker("kill", self.nodes[hostname].container)

    def revive(self, hostname: str) -> None:
        """Power back: the node's container starts again on its data (it rejoins the swarm)."""
        _docker("start", self.nodes[hostname].container)

    def push_image(self, source_tag: str, name: str) -> str:
        """`source_tag` (on the shared engine) into the cluster's registry as `name`, the way
        a deployment's `image-create` does: saved here, loaded into the manager, pushed from
        there; the other nodes pull it on first use. Returns the registry reference."""
        reference = f"{REGISTRY}/{name}"
        saved = subprocess.run(["docker", "save", source_tag], capture_output=True, check=True)
        with contextlib.closing(self.manager.client()) as client:
            (image,) = client.images.load(saved.stdout)
            image.tag(reference)
            for line in client.images.push(reference, stream=True, decode=True):
                if "error" in line:
                    raise RuntimeError(f"push {reference}: {line['error']}")
        return reference


# -- what the swarm tests do with a cluster (shared by every `swarm` test file) ----------------


def inventory_of(cluster: SwarmCluster) -> Inventory:
    """The cluster's inventory as the hub reads it: the manager's node objects."""
    from ds01hub.gpu.cluster import cluster_inventory, parse_node

    return cluster_inventory(parse_node(n, simulated=True) for n in cluster.node_objects())


def swarm_allocator(cluster, manager, state_dir: Path, trust, limits):
    """The real `GpuAllocator` with its holdings read from Swarm's services and tasks."""
    from ds01hub.gpu.allocator import GpuAllocator
    from ds01hub.gpu.swarm_state import swarm_lister, swarm_remover

    return GpuAllocator(
        None,
        inventory_of(cluster),
        state_dir,
        limits=limits,
        container_lister=swarm_lister(manager, trust),
        container_remover=swarm_remover(manager),
        trust=trust,
    )


def spawn_service(
    allocator, manager, cluster, trust, user: str, limits, *, project: str | None = None
):
    """The swarm spawner's steps: allocate, create the service (zero replicas) with signed
    labels, confirm the slots under the lock, scale to one. Returns (decision, service id)."""
    from ds01hub import labels
    from ds01hub.gpu.decision import GpuRequest
    from ds01hub.gpu.swarm_state import create_service, scale_service
    from ds01hub.spawner.swarm_plan import service_name, service_spec

    name = service_name(user, project)
    decision = allocator.allocate(GpuRequest(user, name, count=1), limits.resolve(user))
    if not decision.ok:
        return decision, None
    slots = [allocator.inventory.slot(s) for s in decision.granted]
    values = labels.container_labels(
        user=user,
        project=None,
        group=None,
        priority=10,
        gpus=decision.granted,
        gpu_uuids=[s.uuid for s in slots],
        image=cluster.image,
    )
    values[labels.CREATOR] = allocator.creator_label()
    signed = trust.sign(values, name) | {"ds01.test": "1"}
    body = service_spec(
        name=name,
        image=cluster.image,
        command=["sleep", "3600"],
        env={},
        signed_labels=signed,
        slots=slots,
    )
    service_id = create_service(manager, body)
    check = allocator.begin_start(name, service_id)
    assert check.ok, check
    scale_service(manager, service_id, 1)
    allocator.commit(name)
    return decision, service_id


def running_task(manager, service_id: str):
    """The service's running task, or None."""
    tasks = manager.api.tasks(filters={"service": service_id})
    return next((t for t in tasks if t["Status"]["State"] == "running"), None)


def node_state(manager, hostname: str) -> str:
    """Swarm's state of a node ("ready", "down", ...)."""
    node = next(n for n in manager.api.nodes() if n["Description"]["Hostname"] == hostname)
    return node["Status"]["State"]
