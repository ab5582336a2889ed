"""The users' commands end to end: real Unix users on the host, the broker as the hub's
managed service, DS01Spawner with a YAML quota and a SIMULATED 2-GPU inventory, real containers
from the single-user image. Same quotas and allocator as the browser: the commands only ask
the hub."""

from __future__ import annotations

import json
import secrets
import subprocess
import tempfile

import docker
import pytest
from harness import wait_until
from harness.cli import (
    PtySession,
    broker_socket_path,
    command_line,
    run_as,
    unix_user,
    user_env,
    wait_for_socket,
)

pytestmark = [pytest.mark.docker, pytest.mark.e2e, pytest.mark.root]

LIMITS = """\
defaults:
  max_gpus: 1
  max_gpus_per_container: 1
  max_cpus: 1
  memory: 1g
  max_containers_per_user: 2
  idle_timeout: null
  gpu_hold_after_stop: 1h
  container_hold_after_stop: null
  priority: 10
gpu_allocation:
  enable_mig: false
  strategy: spread
  simulate:
    seed: ds01hub-cli-e2e
    gpus:
      - {name: NVIDIA A100-SXM4-80GB, memory: 80g, count: 2}
"""


@pytest.fixture(scope="module")
def users():
    with unix_user() as alice, unix_user() as bob:
        yield alice, bob


@pytest.fixture(scope="module")
def hub(hub_factory, tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli-e2e")
    limits = directory / "resource-limits.yaml"
    limits.write_text(LIMITS)
    broker_args = [
        f"--Broker.limits_path={limits}",
        "--Broker.activity_interval=1",
        f"--Broker.state_dir={directory / 'state'}",  # the spawner's: its label key
    ]
    test_label = f"ds01.test.cli={secrets.token_hex(3)}"
    key, value = test_label.split("=")
    with broker_socket_path() as socket_path:
        extra = f"""
from ds01hub.hub.services import configure_broker
c.DS01Spawner.limits_path = {str(limits)!r}
c.DS01Spawner.state_dir = {str(directory / "state")!r}
c.DS01Spawner.container_label_filter = [{test_label!r}]
configure_broker(c, socket_path={socket_path!r}, broker_args={broker_args!r})
"""
        with hub_factory(spawner="ds01", extra_config=extra, labels={key: value}) as hub:
            wait_for_socket(socket_path, hub)
            hub.socket_path = socket_path
            yield hub


def cli(hub, person, command, *args, **kw):
    return run_as(person, hub.socket_path, command, *args, **kw)


def listed(hub, person, *flags):
    result = cli(hub, person, "container-list", "--json", *flags)
    assert result.returncode == 0, result.stderr
    return {row["project"]: row for row in json.loads(result.stdout)}


def test_create_through_the_hub_with_a_gpu(hub, users, docker_client):
    alice, bob = users
    result = cli(hub, alice, "container-create", "thesis", "--gpus", "1")
    assert result.returncode == 0, result.stderr + hub.log()
    assert "thesis created and started" in result.stdout
    rows = listed(hub, alice)
    assert rows["thesis"]["state"] == "running" and len(rows["thesis"]["gpus"]) == 1
    container = docker_client.containers.get(rows["thesis"]["id"])
    assert container.labels["ds01.user"] == alice.name
    assert container.labels["ds01.gpus"] == rows["thesis"]["gpus"][0]
    # the hub knows it as alice's named server: the browser sees the same container
    server = hub.api("GET", f"/users/{alice.name}").json()["servers"]["thesis"]
    assert server["ready"]

    result = cli(hub, bob, "container-create", "proj", "--gpus", "1")
    assert result.returncode == 0, result.stderr + hub.log()
    assert listed(hub, bob)["proj"]["gpus"] != rows["thesis"]["gpus"]


@pytest.fixture(scope="module")
def carol():
    with unix_user() as person:
        yield person


def test_a_start_waiting_for_a_gpu_shows_progress_and_can_be_cancelled(hub, users, carol):
    """Both simulated GPUs are held (alice, bob): carol's start queues, the command says so
    while it waits, and `container-stop` cancels it."""
    with tempfile.TemporaryFile("w+") as stderr:
        waiting = subprocess.Popen(
            command_line("container-create", "waiting", "--gpus", "1"),
            user=carol.uid,
            group=carol.gid,
            extra_groups=[],
            env=user_env(carol.home, hub.socket_path),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            cwd="/tmp",
        )
        try:

            def queued() -> bool:
                assert waiting.poll() is None, read_all(stderr)
                return "in line for a whole GPU" in read_all(stderr)

            wait_until(queued, 120, 0.5, lambda: read_all(stderr) + hub.log())
            assert listed(hub, carol)["waiting"]["state"] == "starting"
            result = cli(hub, carol, "container-stop", "waiting", "-y")
            assert result.returncode == 0, result.stderr
            assert "start of waiting is cancelled" in result.stdout
            assert waiting.wait(60) == 1
        finally:
            if waiting.poll() is None:
                waiting.kill()
    assert "waiting" not in listed(hub, carol, "--all")


def read_all(stream) -> str:
    stream.seek(0)
    return stream.read()


def test_over_quota_and_bad_names_are_clear(hub, users):
    alice, _ = users
    result = cli(hub, alice, "container-create", "second", "--gpus", "1")
    assert result.returncode == 1
    assert "could not start 'second': You already hold 1 of your 1 GPU" in result.stderr
    assert "max_gpus: 1" in result.stderr and "thesis" in result.stderr  # who holds what
    result = cli(hub, alice, "container-create", "Second.Try")
    assert result.returncode == 2
    assert "lowercase letters, digits, '-' and '_'" in result.stderr
    assert "'second-try'" in result.stderr
    result = cli(hub, alice, "container-create", "thesis")
    assert result.returncode == 1 and "already have a container named 'thesis'" in result.stderr


def test_container_count_quota_is_the_hubs(hub, users):
    _, bob = users
    result = cli(hub, bob, "container-create", "extra")
    assert result.returncode == 0, result.stderr + hub.log()
    result = cli(hub, bob, "container-create", "third")
    assert result.returncode == 1
    assert "over quota" in result.stderr and "may have 2 container(s)" in result.stderr
    assert cli(hub, bob, "container-remove", "extra", "-y", "--force").returncode == 0
    assert set(listed(hub, bob, "--all")) == {"proj"}


def test_shell_runs_in_the_container_with_its_gpu(hub, users, docker_client):
    alice, _ = users
    row = listed(hub, alice)["thesis"]
    result = cli(hub, alice, "container-run", "thesis", "--", "hostname")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == row["id"]
    script = "echo $NVIDIA_VISIBLE_DEVICES; id -u"
    result = cli(hub, alice, "container-run", "thesis", "--", "sh", "-c", script)
    gpu_uuids, uid = result.stdout.split()
    container = docker_client.containers.get(row["id"])
    assert gpu_uuids == container.labels["ds01.gpu_uuids"]
    assert uid != "0"  # the notebook's user, not root


def test_users_cannot_reach_each_other(hub, users, docker_client):
    alice, bob = users
    assert set(listed(hub, bob, "--all")) == {"proj"}
    for command, extra in (
        ("container-stop", ["-y"]),
        ("container-run", ["--", "hostname"]),
        ("container-remove", ["-y", "--force"]),
        ("container-start", []),
    ):
        result = cli(hub, bob, command, "thesis", *extra)
        assert result.returncode == 1 and "no container named 'thesis'" in result.stderr
        result = cli(hub, bob, command, "--user", alice.name, "thesis", *extra)
        assert result.returncode == 1 and "only admins" in result.stderr
    assert listed(hub, alice)["thesis"]["state"] == "running"


def test_shell_use_counts_as_activity(hub, users):
    alice, _ = users
    before = hub.api("GET", f"/users/{alice.name}").json()["servers"]["thesis"]["last_activity"]
    result = cli(hub, alice, "container-run", "thesis", "--", "sh", "-c", "sleep 3; echo ok")
    assert result.returncode == 0 and "ok" in result.stdout
    after = hub.api("GET", f"/users/{alice.name}").json()["servers"]["thesis"]["last_activity"]
    assert after > before


def test_stats_show_use_against_limits(hub, users):
    alice, _ = users
    result = cli(hub, alice, "container-stats", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    (row,) = report["containers"]
    assert report["quota"]["gpus_held"] == 1 and report["quota"]["limits"]["max_gpus"] == 1
    assert row["project"] == "thesis"
    assert row["memory_limit_bytes"] == 1024**3 and row["cpu_limit_percent"] == 100
    (gpu,) = row["gpus"]
    assert gpu["simulated"] is True and gpu["memory_mb"] == 80 * 1024
    assert gpu["memory_used_mb"] == 0  # no process on the simulated GPU
    table = cli(hub, alice, "container-stats").stdout
    assert "thesis" in table and "/ 1.0G" in table
    assert f"{gpu['slot']} (SIMULATED): " in table and "0B / 80G" in table
    assert (
        f"GPUs: 1 of 1 GPU in use (slot {gpu['slot']}: NVIDIA A100-SXM4-80GB (SIMULATED))" in table
    )
    assert "CPUs per container 1; memory per container 1.0G; containers 2 (1 running" in table


def test_stop_holds_the_gpu_then_start_and_remove(hub, users, docker_client):
    alice, _ = users
    result = cli(hub, alice, "container-stop", "thesis", "-y")
    assert result.returncode == 0, result.stderr
    assert "GPUs stay reserved until" in result.stdout
    row = listed(hub, alice, "--all")["thesis"]
    assert row["state"] == "stopped" and row["held_until"] and row["gpus"]
    assert "thesis" not in listed(hub, alice)
    assert (
        not hub.api("GET", f"/users/{alice.name}").json()["servers"].get("thesis", {}).get("ready")
    )

    result = cli(hub, alice, "container-start", "thesis")
    assert result.returncode == 0, result.stderr + hub.log()
    assert listed(hub, alice)["thesis"]["state"] == "running"

    container_id = listed(hub, alice)["thesis"]["id"]
    result = cli(hub, alice, "container-remove", "thesis", "-y")
    assert result.returncode == 1 and "is running" in result.stderr
    result = cli(hub, alice, "container-remove", "thesis", "-y", "--force")
    assert result.returncode == 0, result.stderr
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(container_id)
    assert "thesis" not in hub.api("GET", f"/users/{alice.name}").json()["servers"]


def test_guided_create_in_a_terminal(hub, users):
    alice, _ = users
    with PtySession(alice, hub.socket_path, "container-create", "--guided") as term:
        term.expect("Container (project) name:")
        term.send("Not Valid\r")
        assert "lowercase letters" in term.expect("Container (project) name:")
        term.send("guided\r")
        term.expect("GPUs (0-1")
        term.send("0\r")
        shown = term.expect("created and started", timeout=180)
        assert "\x1b[1mguided\x1b[0m created and started" in shown  # colour on a terminal
        assert term.wait(30) == 0
    assert listed(hub, alice)["guided"]["gpus"] == []


def test_a_start_after_a_stop_behind_the_hubs_back_is_truthful(hub, users, docker_client):
    """A plain `docker stop` of one's own container: the hub may still think it is ready (until
    its engine watcher or poll notices: a race this test does not control, so both cases pass
    through here). The start must start it (or fail): "running" only when Docker says it runs."""
    alice, _ = users
    row = listed(hub, alice)["guided"]
    container = docker_client.containers.get(row["id"])
    container.stop(timeout=1)
    result = cli(hub, alice, "container-start", "guided")
    assert result.returncode == 0, result.stderr + hub.log()
    assert "guided running" in result.stdout
    row = listed(hub, alice, "--all")["guided"]
    assert row["state"] == "running"
    assert docker_client.containers.get(row["id"]).status == "running"


@pytest.fixture(scope="module")
def removing_hub(hub_factory, tmp_path_factory):
    """A hub configured as the demo is: the container is removed when its server stops
    (`DockerSpawner.remove = True`)."""
    directory = tmp_path_factory.mktemp("cli-e2e-remove")
    limits = directory / "resource-limits.yaml"
    limits.write_text(LIMITS)
    test_label = f"ds01.test.cli={secrets.token_hex(3)}"
    key, value = test_label.split("=")
    with broker_socket_path() as socket_path:
        extra = f"""
from ds01hub.hub.services import configure_broker
c.DockerSpawner.remove = True
c.DS01Spawner.limits_path = {str(limits)!r}
c.DS01Spawner.state_dir = {str(directory / "state")!r}
c.DS01Spawner.container_label_filter = [{test_label!r}]
configure_broker(
    c,
    socket_path={socket_path!r},
    broker_args=["--Broker.limits_path={limits}", "--Broker.state_dir={directory / "state"}"],
)
"""
        with hub_factory(spawner="ds01", extra_config=extra, labels={key: value}) as hub:
            wait_for_socket(socket_path, hub)
            hub.socket_path = socket_path
            yield hub


def created(hub, person, name, docker_client):
    result = cli(hub, person, "container-create", name)
    assert result.returncode == 0, result.stderr + hub.log()
    return docker_client.containers.get(listed(hub, person)[name]["id"])


def gone(docker_client, container) -> bool:
    try:
        docker_client.containers.get(container.id)
    except docker.errors.NotFound:
        return True
    return False


def test_stop_remove_and_cleanup_when_the_hub_removes_containers(
    removing_hub, carol, docker_client
):
    hub = removing_hub
    container = created(hub, carol, "one", docker_client)
    result = cli(hub, carol, "container-stop", "one", "-y")
    assert result.returncode == 0, result.stderr + hub.log()
    assert "one stopped and removed" in result.stdout and "internal error" not in result.stderr
    assert gone(docker_client, container) and "one" not in listed(hub, carol, "--all")

    container = created(hub, carol, "two", docker_client)
    result = cli(hub, carol, "container-remove", "two", "-y", "--force", "--json")
    assert result.returncode == 0, result.stderr + hub.log()
    reply = json.loads(result.stdout)
    assert reply["removed"] is True and reply["already_gone"] is False  # removed by this command
    assert gone(docker_client, container)
    assert "two" not in hub.api("GET", f"/users/{carol.name}").json()["servers"]

    doomed = [created(hub, carol, name, docker_client) for name in ("three", "four")]
    result = cli(hub, carol, "container-cleanup", "--all", "-y", "--json")
    assert result.returncode == 0, result.stderr + hub.log()
    results = json.loads(result.stdout)
    assert sorted(r["project"] for r in results) == ["four", "three"]
    assert all(r["removed"] for r in results)
    assert all(gone(docker_client, c) for c in doomed)
    assert listed(hub, carol, "--all") == {}
