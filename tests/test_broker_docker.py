"""The broker's Docker side with a real hub, real containers and real Unix users.

The hub runs the broker as a managed service (ds01hub.hub.services.configure_broker); containers are
created here with the spawner's labels (ds01hub.labels), so listing, shells, stop and removal
are exercised without a spawn. Two users must not see, stop, exec into or remove each other's
containers through any command.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
from pathlib import Path

import docker
import pytest
from harness import Hub, wait_until
from harness.cli import (
    BUSYBOX_IMAGE,
    PtySession,
    broker_socket_path,
    busybox_image,
    managed_container,
    run_as,
    unix_user,
    wait_for_socket,
)

pytestmark = [pytest.mark.docker, pytest.mark.e2e, pytest.mark.root]


@pytest.fixture(scope="module")
def client():
    return docker.from_env()


@pytest.fixture(scope="module")
def test_id():
    return secrets.token_hex(3)


@pytest.fixture(scope="module")
def users():
    with unix_user() as alice, unix_user() as bob:
        yield alice, bob


@pytest.fixture(scope="module")
def hub(tmp_path_factory, client):
    busybox_image(client)  # the base of users' image builds here
    directory = tmp_path_factory.mktemp("brokerhub")
    broker_args = [
        f"--Broker.base_image={BUSYBOX_IMAGE}",
        "--Broker.max_images_per_user=1",
        f"--Broker.state_dir={directory / 'state'}",
    ]
    with broker_socket_path() as socket_path:
        # this hub's own spawns fail at once: the containers here are made by the test
        extra = f"""
from ds01hub.hub.services import configure_broker
configure_broker(c, socket_path={socket_path!r}, broker_args={broker_args!r})
c.SimpleLocalProcessSpawner.home_dir_template = "{directory}/homes/{{username}}"
c.Spawner.cmd = ["/bin/false"]
"""
        hub = Hub(directory=directory, hub_ip="127.0.0.1", spawner="simple", extra_config=extra)
        with hub.start():
            wait_for_socket(socket_path, hub)
            hub.socket_path = socket_path
            hub.state_dir = directory / "state"
            yield hub


@pytest.fixture(scope="module")
def containers(client, hub, users, test_id):
    image = busybox_image(client)
    alice, bob = users
    made = {
        person.name: managed_container(client, hub.state_dir, person.name, "work", image, test_id)
        for person in (alice, bob)
    }
    yield made
    for container in client.containers.list(
        all=True, filters={"label": f"ds01.test.cli={test_id}"}
    ):
        container.remove(force=True)


def as_user(hub, person, command, *args, **kw):
    return run_as(person, hub.socket_path, command, *args, **kw)


def test_each_user_lists_only_their_own_containers(hub, users, containers):
    alice, bob = users
    for person in (alice, bob):
        result = as_user(hub, person, "container-list", "--json")
        assert result.returncode == 0, result.stderr + hub.log()
        rows = json.loads(result.stdout)
        assert [(r["project"], r["state"]) for r in rows] == [("work", "running")]
        assert rows[0]["id"] == containers[person.name].id[:12]
        assert rows[0]["uptime_s"] >= 0
    table = as_user(hub, alice, "container-list")
    assert "work" in table.stdout and "running" in table.stdout
    assert bob.name not in table.stdout


def test_a_command_runs_inside_the_users_container(hub, users, containers):
    alice, _ = users
    result = as_user(hub, alice, "container-run", "work", "--", "hostname")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == containers[alice.name].id[:12]
    # the exit status of the command comes back
    result = as_user(hub, alice, "container-run", "work", "--", "sh", "-c", "echo oops >&2; exit 3")
    assert result.returncode == 3 and "oops" in result.stderr


def test_input_is_relayed_and_files_land_in_the_container(hub, users, containers, client):
    alice, bob = users
    script = "touch /tmp/made-by-alice\necho done\n"
    result = as_user(hub, alice, "container-run", "work", "--", "sh", input=script)
    assert result.returncode == 0 and result.stdout.strip() == "done", result.stderr
    listing = containers[alice.name].exec_run(["ls", "/tmp"]).output.decode()
    assert "made-by-alice" in listing
    assert "made-by-alice" not in containers[bob.name].exec_run(["ls", "/tmp"]).output.decode()


def test_interactive_shell_through_a_pty(hub, users, containers, client):
    """A person at a terminal: typing `hostname` shows the container's id, the window size
    follows the terminal, and leaving the shell leaves the container running."""
    alice, _ = users
    with PtySession(alice, hub.socket_path, "container-run", "work", rows=40, cols=100) as term:
        term.expect("#")  # busybox sh prompt
        term.send("hostname; echo $((6 * 7))\r")
        assert containers[alice.name].id[:12] in term.expect("42")
        term.send("stty size\r")
        assert "40 100" in term.expect("40 100")
        term.resize(30, 90)

        def sees_new_size() -> bool:  # the resize reaches the container asynchronously
            term.send("stty size\r")
            try:
                return "30 90" in term.expect("30 90", timeout=2)
            except AssertionError:
                return False

        wait_until(sees_new_size, 30, 0, "the container's terminal follows the resize")
        term.send("exit\r")
        assert "still running" in term.expect("still running")
        assert term.wait() == 0
    containers[alice.name].reload()
    assert containers[alice.name].status == "running"


def test_user_setup_walks_through_and_ends_with_how_to_connect(hub, users, containers):
    alice, bob = users
    with PtySession(alice, hub.socket_path, "user-setup") as term:
        shown = term.expect("Set up another project? [y/N] ")  # she has a container already
        assert alice.name in shown and "You are already set up:" in shown
        assert "containers: work (running)" in shown
        term.send("\r")  # the default: no
        assert "VS Code" in term.expect("Browser:")
        assert term.wait() == 0
    # yes: the guided project-init runs inside it, in the user's home
    with PtySession(bob, hub.socket_path, "user-setup") as term:
        term.expect("Set up another project? [y/N] ")
        term.send("y\r")
        for prompt, answer in (
            ("Project name:", "first-steps"),
            ("One-line description", "learning the ropes"),
            ("Use case [general]:", "nlp"),
            ("Build an image for it?", "n"),
            ("Create a container for it?", "n"),
        ):
            term.expect(prompt)
            term.send(answer + "\r")
        assert "Project ready at" in term.expect("Browser:")
        assert term.wait() == 0
    readme = Path(f"{bob.home}/first-steps/README.md").read_text()
    assert "learning the ropes" in readme and os.path.isdir(f"{bob.home}/first-steps/data/corpora")


def test_no_command_reaches_another_users_container(hub, users, containers, client):
    alice, bob = users
    bobs = containers[bob.name]
    other_names = [bobs.name, f"work._.{bob.name}", bobs.id[:12]]
    for name in other_names:
        for command, extra in (
            ("container-stop", ["-y"]),
            ("container-remove", ["-y", "--force"]),
            ("container-run", ["--", "hostname"]),
            ("container-start", []),
        ):
            result = as_user(hub, alice, command, name, *extra)
            assert result.returncode != 0, (command, name, result.stdout)
    for command, extra in (
        ("container-stop", ["work", "-y"]),
        ("container-remove", ["work", "-y"]),
        ("container-run", ["work", "--", "hostname"]),
        ("container-list", []),
        ("container-stats", []),
        ("container-cleanup", ["--all", "-y"]),
    ):
        result = as_user(hub, alice, command, "--user", bob.name, *extra)
        assert result.returncode == 1 and "only admins" in result.stderr, (command, result.stderr)
    bobs.reload()
    assert bobs.status == "running"


def test_stats_report_cpu_and_memory(hub, users, containers):
    alice, _ = users
    result = as_user(hub, alice, "container-stats", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["containers"]
    assert [r["project"] for r in rows] == ["work"]
    assert rows[0]["memory_bytes"] > 0 and rows[0]["cpu_percent"] is not None


def test_stop_asks_without_a_terminal_then_stops_with_yes(hub, users, containers):
    alice, bob = users
    result = as_user(hub, alice, "container-stop", "work")
    assert result.returncode == 2 and "pass -y" in result.stderr
    assert "processes" in result.stderr  # uptime and process count shown before asking
    result = as_user(hub, alice, "container-stop", "work", "-y", "--timeout", "1")
    assert result.returncode == 0, result.stderr
    containers[alice.name].reload()
    containers[bob.name].reload()
    assert containers[alice.name].status == "exited"
    assert containers[bob.name].status == "running"
    result = as_user(hub, alice, "container-list", "--all")
    assert "stopped" in result.stdout and "running" not in result.stdout


def test_cleanup_removes_only_own_stopped_containers(hub, users, containers, client):
    alice, bob = users
    result = as_user(hub, alice, "container-cleanup", "-y", "--json")
    assert result.returncode == 0, result.stderr
    with pytest.raises(docker.errors.NotFound):
        client.containers.get(containers[alice.name].id)
    assert client.containers.get(containers[bob.name].id).status == "running"
    result = as_user(hub, alice, "container-list", "--all", "--json")
    assert result.stdout.strip() == "[]"


def test_bad_names_and_unknown_containers_are_clear(hub, users):
    alice, _ = users
    result = as_user(hub, alice, "container-stop", "Work!", "-y")
    assert result.returncode == 2 and "lowercase letters, digits" in result.stderr
    result = as_user(hub, alice, "container-stop", "nothing-here", "-y")
    assert result.returncode == 1 and "no container named 'nothing-here'" in result.stderr


def test_images_are_built_listed_and_deleted_in_the_users_namespace(hub, users, client):
    alice, bob = users
    tag = f"ds01-{alice.name}/mini:latest"
    try:
        result = as_user(hub, alice, "image-create", "mini", "--template", "custom", "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["tag"] == tag
        assert client.images.get(tag).labels["ds01.image.user"] == alice.name
        listed = json.loads(as_user(hub, alice, "image-list", "--json").stdout)
        assert [i["tag"] for i in listed] == [tag]
        assert json.loads(as_user(hub, bob, "image-list", "--json").stdout) == []
        # bob cannot delete or update alice's image: his names live in his own namespace
        result = as_user(hub, bob, "image-delete", "mini", "-y")
        assert result.returncode == 1 and "no image called 'mini'" in result.stderr
        result = as_user(hub, bob, "image-update", "mini")
        assert result.returncode == 1 and "no image called 'mini'" in result.stderr
        client.images.get(tag)
        # the image quota (1 here) is enforced with a clear message
        result = as_user(hub, alice, "image-create", "second", "--template", "custom")
        assert result.returncode == 1 and "the limit is 1" in result.stderr
        result = as_user(hub, alice, "image-update", "mini")
        assert result.returncode == 0, result.stderr
        result = as_user(hub, alice, "image-create", "Bad Name")
        assert result.returncode == 2 and "Bad Name" in result.stderr
        result = as_user(hub, alice, "image-delete", "mini", "-y")
        assert result.returncode == 0, result.stderr
        with pytest.raises(docker.errors.ImageNotFound):
            client.images.get(tag)
    finally:
        for image in client.images.list(name=f"ds01-{alice.name}/mini"):
            client.images.remove(image.id, force=True)


def test_project_init_creates_the_layout_in_the_users_home(hub, users):
    alice, _ = users
    result = as_user(hub, alice, "project-init", "thesis", "--use-case", "cv", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)["project"]
    root = f"{alice.home}/thesis"
    assert report["path"] == root and report["git_initialized"]
    for path in ("README.md", ".gitignore", "data/images", "notebooks", ".git"):
        assert os.path.exists(f"{root}/{path}"), path
    assert os.stat(f"{root}/README.md").st_uid == alice.uid
    result = as_user(hub, alice, "project-init", "--guided")
    assert result.returncode == 2 and "needs a terminal" in result.stderr


def test_guided_image_create_in_a_terminal(hub, users, client):
    _, bob = users
    try:
        with PtySession(bob, hub.socket_path, "image-create", "--guided") as term:
            assert "cv" in term.expect("Template [general]: ")  # the templates are listed first
            term.send("custom\r")
            term.expect("Image name [custom]: ")
            term.send("tools\r")
            term.expect("Extra pip packages")
            term.send("\r")
            term.expect("Extra Debian packages")
            term.send("\r")
            assert f"ds01-{bob.name}/tools:latest" in term.expect("Built", timeout=120)
            assert term.wait() == 0
        assert client.images.get(f"ds01-{bob.name}/tools:latest")
    finally:
        for image in client.images.list(name=f"ds01-{bob.name}/tools"):
            client.images.remove(image.id, force=True)


def test_ctrl_c_in_an_image_build_offers_to_cancel_it(hub, users, client):
    """While the build waits for a slot (the test holds them all), Ctrl-C asks whether to
    cancel it; yes cancels it in the broker: the user may build again at once."""
    from ds01hub.actions.builds import MAX_CONCURRENT_BUILDS, HostBuildLocks

    alice, _ = users
    locks = HostBuildLocks(hub.state_dir, MAX_CONCURRENT_BUILDS)
    held = [locks.take_slot(threading.Event(), lambda: None) for _ in range(MAX_CONCURRENT_BUILDS)]
    try:
        with PtySession(
            alice, hub.socket_path, "image-create", "slow", "--template", "custom"
        ) as term:
            term.expect("waiting for a free build slot")
            assert locks.building(alice.name)
            term.send("\x03")
            term.expect("Cancel the build of slow? [Y/n] ")
            term.send("\r")
            shown = term.expect("cancelled")
            assert "container-stop" not in shown
            assert term.wait() == 130
        assert not locks.building(alice.name)
        result = as_user(hub, alice, "image-cancel")
        assert result.returncode == 1 and "no build of yours is running" in result.stderr
    finally:
        for fd in held:
            locks.release(fd)
    with pytest.raises(docker.errors.ImageNotFound):
        client.images.get(f"ds01-{alice.name}/slow:latest")


def test_large_output_and_input_arrive_whole(hub, users, containers):
    _, bob = users  # alice's container is gone by now (cleanup)
    result = as_user(hub, bob, "container-run", "work", "--", "seq", "1", "200000")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split()
    assert len(lines) == 200000 and lines[-1] == "200000"
    payload = "x" * (3 * 1024 * 1024 + 17)
    result = as_user(hub, bob, "container-run", "work", "--", "wc", "-c", input=payload)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(len(payload))]


def test_the_culler_warning_reaches_its_user_on_the_next_command(hub, users, containers):
    from datetime import UTC, datetime, timedelta

    from ds01hub.services.ops.warnings import CullWarning, WarningStore

    alice, bob = users
    now = datetime.now(UTC)
    warning = CullWarning(
        user=alice.name,
        server="work",
        container=containers[alice.name].name,
        code="idle",
        reason="idle for 2h (no hub, GPU or CPU activity)",
        since=now - timedelta(hours=2),
        warned_at=now,
        cull_at=now + timedelta(minutes=10),
    )
    WarningStore(hub.state_dir).save([warning])
    try:
        result = as_user(hub, alice, "container-list", "--json")
        assert result.returncode == 0, result.stderr
        assert f"warning: {warning.message()}" in result.stderr
        json.loads(result.stdout)  # the warning goes to stderr: stdout stays JSON
        other = as_user(hub, bob, "container-list")
        assert other.returncode == 0 and "warning" not in other.stderr
    finally:
        WarningStore(hub.state_dir).save([])
