"""The users' commands for a container on a worker node of a swarm: the real CLI as real Unix
users, the broker as the hub's managed service in swarm mode, DS01SwarmSpawner, the session's
three-node cluster (tests/harness/swarm.py) and the single-user image from its registry.

A MIG slice exists only on node3 (a worker), so `container-create --mig` lands there; the
broker finds the container through the manager (services and tasks) and reaches it on node3's
own engine, by the nodes file's endpoint for node3 (`ds01hub.gpu.swarm_nodes`; here the node's
unix socket, mounted on this host: the same code path a TCP + mutual-TLS endpoint takes).
Then: each node's socket proxy, the door a user has on a node, shows nobody another user's
container, neither on the node where it runs nor through the manager's swarm API.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from harness.cli import (
    BrokerProcess,
    PtySession,
    broker_socket_path,
    run_as,
    unix_user,
    wait_for_socket,
)
from harness.hub import Hub
from harness.swarm import running_task
from harness.wait import wait_until

pytestmark = [pytest.mark.swarm, pytest.mark.root]

LIMITS = """\
defaults: {max_gpus: 1, gpu_hold_after_stop: 1h, max_containers_per_user: 2, max_cpus: 1,
           memory: 1g}
"""
PROJECT = "thesis"
DOCKER = "/usr/local/bin/docker"


@pytest.fixture(scope="module")
def users():
    with unix_user() as alice, unix_user() as bob:
        yield alice, bob


@pytest.fixture(scope="module")
def manager(swarm_cluster):
    with contextlib.closing(swarm_cluster.manager.client()) as client:
        yield client


def nodes_file(cluster, path: Path) -> Path:
    """Every node's engine for the broker: here its socket mounted on this host."""
    lines = ["nodes:"] + [
        f"  {host}: {{url: {json.dumps(node.url)}}}" for host, node in cluster.nodes.items()
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def swarm_hub(swarm_cluster, manager, singleuser_image, tmp_path_factory):
    """A hub on this host whose servers are swarm services, with the broker in swarm mode."""
    directory = tmp_path_factory.mktemp("swarm-cli")
    reference = swarm_cluster.push_image(singleuser_image, "ds01hub/singleuser:swarm-test")
    limits = directory / "limits.yaml"
    limits.write_text(LIMITS)
    nodes = nodes_file(swarm_cluster, directory / "swarm-nodes.yaml")
    with broker_socket_path() as socket_path:
        hub = Hub(
            directory=directory / "hub",
            hub_ip=swarm_cluster.gateway(),
            image=reference,
            spawner="ds01hub.spawner.swarm_spawner.DS01SwarmSpawner",
        )
        broker_args = [
            f"--Broker.limits_path={limits}",
            f"--Broker.state_dir={hub.state_dir}",
            f"--Broker.docker_socket={swarm_cluster.manager.socket}",
            f"--Broker.swarm_nodes_file={nodes}",
        ]
        hub.extra_config = f"""
from ds01hub.hub.services import configure_broker
c.DS01SwarmSpawner.client_kwargs = {{'base_url': {swarm_cluster.manager.url!r}}}
c.DS01SwarmSpawner.limits_path = {str(limits)!r}
c.DS01SwarmSpawner.gpu_wait_interval = 0.5
configure_broker(c, socket_path={socket_path!r}, broker_args={broker_args!r})
"""
        hub.start()
        try:
            wait_for_socket(socket_path, hub)
            hub.socket_path = socket_path
            yield hub
        finally:
            hub.stop()
            for service in manager.api.services(filters={"label": f"ds01.test.hub={hub.hub_id}"}):
                with contextlib.suppress(Exception):
                    manager.api.remove_service(service["ID"])


def cli(hub, person, command, *args, **kw) -> subprocess.CompletedProcess:
    return run_as(person, hub.socket_path, command, *args, **kw)


def listed(hub, person, *flags) -> dict:
    result = cli(hub, person, "container-list", "--json", *flags)
    assert result.returncode == 0, result.stderr
    return {row["project"]: row for row in json.loads(result.stdout)}


def the_service(manager, user) -> dict:
    (service,) = manager.api.services(filters={"name": f"{PROJECT}--{user.name}"})
    return service


def where_it_runs(manager, user) -> tuple[str, str]:
    """(node hostname, container id) of the user's server, by the manager."""
    task = running_task(manager, the_service(manager, user)["ID"])
    assert task is not None, "no running task"
    node = manager.api.inspect_node(task["NodeID"])["Description"]["Hostname"]
    return node, task["Status"]["ContainerStatus"]["ContainerID"]


def test_create_and_list_a_container_on_a_worker(swarm_hub, users, manager):
    alice, _ = users
    result = cli(swarm_hub, alice, "container-create", PROJECT, "--mig", "3g.40gb", timeout=400)
    assert result.returncode == 0, result.stderr + swarm_hub.log()
    row = listed(swarm_hub, alice)[PROJECT]
    service = the_service(manager, alice)
    assert row["state"] == "running"
    assert row["id"] == service["ID"][:12]
    (slot,) = row["gpus"]
    assert slot.startswith("node3/0:") and slot == service["Spec"]["Labels"]["ds01.gpus"]
    node, _ = where_it_runs(manager, alice)
    assert node == "node3"


def test_container_run_in_a_terminal_reaches_the_container_on_its_node(
    swarm_hub, users, manager, swarm_cluster
):
    alice, _ = users
    node, container_id = where_it_runs(manager, alice)
    uuids = the_service(manager, alice)["Spec"]["Labels"]["ds01.gpu_uuids"]
    with PtySession(alice, swarm_hub.socket_path, "container-run", PROJECT) as session:
        session.expect("$ ", timeout=60)  # the shell reads its terminal (input before is lost)
        session.send('echo "AT-$(hostname)-$NVIDIA_VISIBLE_DEVICES-END"\n')
        seen = session.expect("-END\r\n", timeout=60)
        # Swarm names a task container's host after the container: node3's container
        assert f"AT-{container_id[:12]}-{uuids}-END" in seen
        session.send("stty size\n")
        assert "24 80" in session.expect("24 80", timeout=30)
        session.send("exit 3\n")
        assert session.wait(30) == 3
    result = cli(swarm_hub, alice, "container-run", PROJECT, "--", "sh", "-c", "cat; hostname")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [container_id[:12]]
    with contextlib.closing(swarm_cluster.nodes[node].client()) as engine:
        assert engine.api.inspect_container(container_id)["State"]["Running"]


def test_stats_come_from_the_nodes_engine(swarm_hub, users):
    alice, _ = users
    result = cli(swarm_hub, alice, "container-stats", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    (row,) = report["containers"]
    assert report["quota"]["gpus_held"] == 1
    assert row["project"] == PROJECT
    # the limits are the service's (Swarm gave its container the same), the use the node's
    assert row["memory_limit_bytes"] == 1024**3 and row["cpu_limit_percent"] == 100
    assert row["memory_bytes"] > 0 and row["pids"] >= 1
    assert row["cpu_percent"] is not None


def test_another_user_cannot_reach_it_through_the_broker(swarm_hub, users, manager):
    alice, bob = users
    assert PROJECT not in listed(swarm_hub, bob, "--all")
    assert json.loads(cli(swarm_hub, bob, "container-stats", "--json").stdout)["containers"] == []
    for command, extra in (
        ("container-run", ["--", "hostname"]),
        ("container-stop", ["-y"]),
        ("container-stop", ["-y", "--force"]),
    ):
        result = cli(swarm_hub, bob, command, PROJECT, *extra)
        assert result.returncode == 1, result.stdout
        assert f"no container named '{PROJECT}'" in result.stderr
    assert where_it_runs(manager, alice)[0] == "node3"


@contextlib.contextmanager
def node_proxy(cluster, hostname: str, hub_state: Path):
    """`ds01hub proxy` in front of one node's engine, as each node runs it."""
    directory = Path(f"/tmp/ds01swproxy-{secrets.token_hex(3)}")
    directory.mkdir(mode=0o755)
    sock = directory / "docker.sock"
    log = directory / "proxy.log"
    command = [
        sys.executable,
        "-c",
        "import sys; from ds01hub.cli.admin import main; sys.exit(main(sys.argv[1:]))",
        "proxy",
        "--listen",
        str(sock),
        "--upstream",
        str(cluster.nodes[hostname].socket),
        "--state-dir",
        str(directory / "state"),
        "--hub-state-dir",
        str(hub_state),
    ]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(sock.exists, 20, message=f"{hostname}'s proxy listens")
        yield sock
    finally:
        process.terminate()
        process.wait(10)
        subprocess.run(["rm", "-rf", str(directory)], check=False)


def docker_as(user, sock: Path, *args: str) -> subprocess.CompletedProcess:
    line = f"export DOCKER_HOST=unix://{sock}; {shlex.join([DOCKER, *args])}"
    return subprocess.run(
        ["su", "-s", "/bin/sh", user.name, "-c", line], capture_output=True, text=True, timeout=60
    )


def test_no_node_s_socket_proxy_shows_another_user_s_container(
    swarm_hub, users, manager, swarm_cluster
):
    """bob on node1 (the manager: its engine also serves the swarm API) and on node3 (where
    alice's container runs): neither proxy lists, inspects, execs into or stops it, and the
    swarm's services, tasks and nodes are not a door either."""
    alice, bob = users
    _, container_id = where_it_runs(manager, alice)
    service = the_service(manager, alice)
    for hostname in ("node1", "node3"):
        with node_proxy(swarm_cluster, hostname, swarm_hub.state_dir) as sock:
            listed_ids = docker_as(bob, sock, "ps", "-a", "-q", "--no-trunc")
            assert listed_ids.returncode == 0, listed_ids.stderr
            assert container_id not in listed_ids.stdout
            for action in (
                ["inspect", container_id],
                ["exec", container_id[:12], "true"],
                ["stop", container_id[:12]],
                ["logs", container_id[:12]],
            ):
                result = docker_as(bob, sock, *action)
                assert result.returncode != 0, (hostname, action, result.stdout)
                assert re.search("No such (container|object)", result.stderr), (
                    hostname,
                    action,
                    result.stderr,
                )
            for action in (
                ["service", "inspect", service["ID"]],
                ["service", "ls"],
                ["service", "ps", service["ID"]],
                ["node", "ls"],
                ["service", "scale", f"{service['ID']}=0"],
            ):
                result = docker_as(bob, sock, *action)
                assert result.returncode != 0, (hostname, action, result.stdout)
                assert service["Spec"]["Name"] not in result.stdout
    assert where_it_runs(manager, alice)[0] == "node3"


def test_a_node_missing_from_the_nodes_file_is_named_never_another_engine(
    swarm_hub, users, swarm_cluster, tmp_path
):
    """A broker whose nodes file lacks node3 still lists the server (the manager's word) but
    reaches into it nowhere else: the error names the node and the file."""
    alice, _ = users
    partial = tmp_path / "nodes.yaml"
    partial.write_text(f"nodes:\n  node1: {{url: {json.dumps(swarm_cluster.manager.url)}}}\n")
    broker = BrokerProcess(
        f"{swarm_hub.url}/hub/api",
        swarm_hub.admin_token,
        f"--Broker.state_dir={swarm_hub.state_dir}",
        f"--Broker.docker_socket={swarm_cluster.manager.socket}",
        f"--Broker.swarm_nodes_file={partial}",
    )
    try:
        listing = run_as(alice, broker.socket_path, "container-list", "--json")
        assert listing.returncode == 0, listing.stderr + broker.log()
        assert [row["project"] for row in json.loads(listing.stdout)] == [PROJECT]
        result = run_as(alice, broker.socket_path, "container-run", PROJECT, "--", "hostname")
        assert result.returncode == 1, result.stdout
        assert "swarm node 'node3' has no engine endpoint in the nodes file" in result.stderr
    finally:
        broker.stop()


def test_container_stop_scales_the_service_to_zero_and_keeps_the_hold(swarm_hub, users, manager):
    alice, _ = users
    result = cli(swarm_hub, alice, "container-stop", PROJECT, "-y")
    assert result.returncode == 0, result.stderr + swarm_hub.log()
    service = the_service(manager, alice)
    assert service["Spec"]["Mode"]["Replicated"]["Replicas"] == 0
    # "stopped" only once it is: Swarm's task of it no longer runs
    assert running_task(manager, service["ID"]) is None
    row = listed(swarm_hub, alice, "--all")[PROJECT]
    assert row["state"] == "stopped", row
    assert row["gpus"] and row["held_until"] and not row["gpus_released"], row
