"""DS01Spawner end to end: a real JupyterHub with `spawner_class = "ds01"`, real containers on
the real Docker engine, a limits YAML with a SIMULATED inventory (4 whole GPUs + 2 MIG
instances; the engine's stub nvidia hook lets device requests start on this CPU machine)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests
from harness import HubError, unique_name, wait_until
from harness.ds01_spawner import Ds01Hub
from prometheus_client.parser import text_string_to_metric_families

from ds01hub import provenance
from ds01hub.gpu.messages import EVENT_KEY

pytestmark = [pytest.mark.e2e, pytest.mark.docker]


@pytest.fixture
def ds01(hub_factory, tmp_path):
    hub = Ds01Hub(hub_factory, tmp_path)
    yield hub
    hub.hub.stop()


def env_of(container) -> dict[str, str]:
    return dict(item.split("=", 1) for item in container.attrs["Config"]["Env"])


def error_of(response) -> str:
    try:
        return response.json().get("message", response.text)
    except ValueError:
        return response.text


def first_progress_event(
    hub, user: str, containing: str, timeout: float = 30, name: str = ""
) -> dict:
    """The first progress event of a pending spawn whose message contains `containing` (the
    stream itself lasts as long as the spawn); {} when none came within `timeout`."""
    path = f"/users/{user}/servers/{name}/progress" if name else f"/users/{user}/server/progress"
    response = hub.api("GET", path, stream=True, timeout=timeout)
    deadline = time.monotonic() + timeout
    for line in response.iter_lines(decode_unicode=True):
        if line and line.startswith("data:"):
            event = json.loads(line[5:])
            if containing in event.get("message", ""):
                response.close()
                return event
        if time.monotonic() > deadline:
            break
    response.close()
    return {}


def first_progress_message(
    hub, user: str, containing: str, timeout: float = 30, name: str = ""
) -> str:
    """The text of `first_progress_event`."""
    return first_progress_event(hub, user, containing, timeout, name).get("message", "")


def hub_metric(hub, name: str, **labels: str) -> float:
    """One sample of the hub's /hub/metrics (admin token), 0 when absent."""
    response = requests.get(
        f"{hub.url}/hub/metrics", headers={"Authorization": f"token {hub.admin_token}"}, timeout=30
    )
    response.raise_for_status()
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_student_and_researcher_get_their_limits_gpus_labels_and_env(ds01):
    hub = ds01.hub
    student, researcher = unique_name("stu"), unique_name("res")
    hub.create_user(student, groups=["students"])
    hub.create_user(researcher, groups=["researchers"])
    hub.start_server(student)
    hub.start_server(researcher, "thesis", {"gpus": 2})
    hub.start_server(student, "mig", {"mig": "2g.20gb"})
    hub.wait_ready(student)
    hub.wait_ready(researcher, "thesis")
    hub.wait_ready(student, "mig")
    inventory = ds01.inventory()

    plain = hub.container_of(student)
    host = plain.attrs["HostConfig"]
    assert plain.name == f"default._.{student}"
    assert (host["NanoCpus"], host["Memory"], host["MemorySwap"]) == (10**9, 512 << 20, 512 << 20)
    assert (host["ShmSize"], host["PidsLimit"]) == (64 << 20, 256)
    assert not host.get("DeviceRequests")
    assert plain.labels["ds01.managed"] == "true"
    assert plain.labels["ds01.user"] == plain.labels["aime.mlc.USER"] == student
    assert plain.labels["ds01.project"] == plain.labels["aime.mlc.NAME"] == "default"
    assert (plain.labels["ds01.group"], plain.labels["ds01.priority"]) == ("students", "10")
    assert plain.labels["ds01.gpus"] == ""
    assert env_of(plain)["NVIDIA_VISIBLE_DEVICES"] == "void"

    gpu = hub.container_of(researcher, "thesis")
    host = gpu.attrs["HostConfig"]
    assert gpu.name == f"thesis._.{researcher}"
    assert (host["NanoCpus"], host["Memory"]) == (1_500_000_000, 768 << 20)
    assert (host["ShmSize"], host["PidsLimit"]) == (128 << 20, 512)
    assert host["CgroupParent"] == "ds01-test-researchers"
    slots = gpu.labels["ds01.gpus"].split(",")
    assert len(slots) == 2 and all(":" not in s for s in slots)
    uuids = [inventory.slot(s).uuid for s in slots]
    assert gpu.labels["ds01.gpu_uuids"] == ",".join(uuids)
    assert gpu.labels["aime.mlc.GPUS"] == gpu.labels["ds01.gpus"]
    [request] = host["DeviceRequests"]
    assert request["Driver"] == "nvidia" and request["DeviceIDs"] == uuids
    assert request["Capabilities"] == [["gpu"]]
    env = env_of(gpu)
    assert env["NVIDIA_VISIBLE_DEVICES"] == env["CUDA_VISIBLE_DEVICES"] == ",".join(uuids)
    assert env["DS01_GPUS_SIMULATED"] == "1"
    assert env["CPU_LIMIT"] == "1.5"
    # The stub hook received the device request: inside, the container sees its UUIDs.
    seen = gpu.exec_run(["sh", "-c", "echo $NVIDIA_VISIBLE_DEVICES"]).output.decode().strip()
    assert seen == ",".join(uuids)

    mig = hub.container_of(student, "mig")
    [slot] = mig.labels["ds01.gpus"].split(",")
    assert inventory.slot(slot).profile == "2g.20gb"
    assert mig.attrs["HostConfig"]["DeviceRequests"][0]["DeviceIDs"] == [inventory.slot(slot).uuid]
    assert env_of(mig)["CUDA_VISIBLE_DEVICES"].startswith("MIG-")
    assert hub.server(researcher, "thesis")["user_options"] == {
        "image": hub.image,
        "gpus": 2,
    }


def test_refusals_over_rest_are_exact(ds01):
    hub = ds01.hub
    user = unique_name("stu")
    hub.create_user(user, groups=["students"])

    response = hub.start_server(user, "x", {"image": "busybox:latest"}, check=False)
    assert response.status_code == 403, response.text
    message = error_of(response)
    assert "spawn option 'image'='busybox:latest': not an image you may use" in message
    assert hub.image in message and "image-create" in message

    response = hub.start_server(user, "x", {"gpus": 2}, check=False)
    assert response.status_code == 403, response.text
    assert "spawn option 'gpus'=2: over your limit of 1 GPU(s) per container (group students)" in (
        error_of(response)
    )
    response = hub.start_server(user, "x", {"gpu": 1}, check=False)
    assert response.status_code == 400, response.text
    assert "unknown option(s) gpu; allowed: profile, image, gpus, mig, queue" in error_of(response)
    response = hub.start_server(user, "x", {"mig": "3g.40gb"}, check=False)
    assert response.status_code == 400, response.text
    assert "no MIG instances of this profile on this machine; allowed: 2g.20gb" in error_of(
        response
    )

    hub.start_server(user, "one")
    hub.start_server(user, "two")
    hub.wait_ready(user, "one")
    hub.wait_ready(user, "two")
    hub.stop_server(user, "two")  # a stopped server's container still counts
    response = hub.start_server(user, "three", check=False)
    assert response.status_code == 409, response.text
    message = error_of(response)
    assert f"over quota: {user} may have 2 container(s)" in message
    assert "has 2: one (running), two (exited)" in message
    assert "delete one" in message
    # Deleting one frees the quota.
    hub.delete_server(user, "two")
    hub.start_server(user, "three")
    hub.wait_ready(user, "three")
    # Each refusal is counted by its reason on the hub's metrics.
    failures = "ds01_spawn_failures_total"
    assert hub_metric(hub, failures, reason="options") == 4
    assert hub_metric(hub, failures, reason="quota") == 1


def test_stop_holds_the_gpu_restart_reuses_it_delete_releases(ds01, docker_client):
    hub = ds01.hub
    user = unique_name("res")
    hub.create_user(user, groups=["researchers"])
    hub.start_server(user, "p", {"gpus": 1})
    hub.wait_ready(user, "p")
    container = hub.container_of(user, "p")
    slot = container.labels["ds01.gpus"]
    allocator = ds01.allocator(docker_client)

    hub.stop_server(user, "p")
    held = [h for h in allocator.holdings() if h.container == container.name]
    assert [(h.slot_id, h.state) for h in held] == [(slot, "stopped")]

    hub.start_server(user, "p", {"gpus": 1})
    hub.wait_ready(user, "p")
    again = hub.container_of(user, "p")
    assert again.id == container.id  # same container, same slot: restarted, not re-created
    assert again.labels["ds01.gpus"] == slot

    hub.stop_server(user, "p")
    hub.start_server(user, "p", {"gpus": 2})  # different GPUs: re-created
    hub.wait_ready(user, "p")
    bigger = hub.container_of(user, "p")
    assert bigger.id != container.id
    assert len(bigger.labels["ds01.gpus"].split(",")) == 2

    hub.delete_server(user, "p")  # the hub may finish deleting after it answered
    wait_until(
        lambda: not docker_client.api.containers(all=True, filters={"id": bigger.id}),
        60,
        0.2,
        "the deleted server's container is removed",
    )
    assert not [h for h in allocator.holdings() if h.user == user]


def test_ten_users_four_slots_queue_in_order_and_never_share(ds01, docker_client):
    hub = ds01.hub
    users = [unique_name("q") for _ in range(10)]
    for user in users:
        hub.create_user(user, groups=["students"])
    threads = [
        threading.Thread(target=hub.start_server, args=(user, "", {"gpus": 1})) for user in users
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    allocator = ds01.allocator(docker_client)

    def holders() -> dict[str, list[str]]:
        by_slot: dict[str, list[str]] = {}
        for holding in allocator.holdings():
            by_slot.setdefault(holding.slot_id, []).append(holding.user)
        return by_slot

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        ready = [u for u in users if (hub.server(u) or {}).get("ready")]
        if len(ready) == 4:
            break
        time.sleep(1)
    time.sleep(3)  # let the queue run a few more rounds: still only 4
    ready = [u for u in users if (hub.server(u) or {}).get("ready")]
    waiting = [u for u in users if u not in ready]
    assert len(ready) == 4, (ready, hub.log())
    assert all((hub.server(u) or {}).get("pending") == "spawn" for u in waiting)
    slots = holders()
    assert sorted(slots) == ["0", "1", "2", "3"]
    assert all(len(holders_) == 1 for holders_ in slots.values()), slots
    message = first_progress_message(hub, waiting[0], "in line for")
    assert "in line for a whole GPU (SIMULATED); 2 MIG 2g.20gb slices are free now" in message

    def queued() -> float:
        return hub_metric(hub, "ds01_spawn_queue_length", group="students")

    assert queued() == len(waiting)

    # A waiting user gives up (stop while pending): the spawn leaves the queue, holds nothing.
    quitter = waiting.pop()
    hub.stop_server(quitter)
    assert hub.server(quitter) is None
    assert not [h for h in allocator.holdings() if h.user == quitter]
    assert queued() == len(waiting)
    waits = hub_metric(hub, "ds01_spawn_queue_wait_seconds_count", group="students")
    assert waits == 5  # the four granted and the one who gave up

    # Releasing one (delete the default server's container: stop + delete) lets one more in.
    first = ready[0]
    hub.stop_server(first)
    hub.api("DELETE", f"/users/{first}/server")
    container = docker_client.containers.get(f"default._.{first}")
    container.remove(force=True)  # the stopped container's hold is 1h: remove it as an admin
    deadline = time.monotonic() + 120
    newly: list[str] = []
    while time.monotonic() < deadline and not newly:
        newly = [u for u in waiting if (hub.server(u) or {}).get("ready")]
        time.sleep(1)
    assert len(newly) == 1, hub.log()
    slots = holders()
    assert all(len(holders_) == 1 for holders_ in slots.values()), slots
    assert sum(1 for u in waiting if (hub.server(u) or {}).get("ready")) == 1
    assert not [h for h in allocator.holdings() if h.user in (first, quitter)]


def test_hub_killed_during_a_spawn_leaks_nothing(ds01, docker_client):
    hub = ds01.hub
    user = unique_name("kil")
    hub.create_user(user, groups=["researchers"])
    hub.start_server(user, "k", {"gpus": 1})
    name = f"k._.{user}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if docker_client.containers.list(all=True, filters={"name": name}):
            break
        time.sleep(0.1)
    hub.process.send_signal(signal.SIGKILL)  # mid-spawn: container made, Jupyter not up yet
    hub.process.wait(30)
    allocator = ds01.allocator(docker_client)
    reservations = json.loads((ds01.state_dir / "reservations.json").read_text() or "{}")
    assert all(entry["pid"] == hub.process.pid for entry in reservations.values())
    [container] = docker_client.containers.list(all=True, filters={"name": name})
    held = sorted((h.slot_id, h.container) for h in allocator.holdings())
    assert held == [(container.labels["ds01.gpus"], name)]  # the labels hold; no reservation
    assert not os.path.exists(f"/proc/{hub.process.pid}")

    hub.start()
    # The restarted hub either adopts the container (it kept starting) or has forgotten the
    # spawn; either way the same container, with the same slot, serves the project.
    if not (hub.server(user, "k") or {}).get("ready"):
        hub.start_server(user, "k", {"gpus": 1})
    hub.wait_ready(user, "k")
    again = hub.container_of(user, "k")
    assert again.id == container.id
    assert again.labels["ds01.gpus"] == container.labels["ds01.gpus"]
    held = sorted((h.slot_id, h.container) for h in allocator.holdings())
    assert held == [(again.labels["ds01.gpus"], name)]


def test_workspace_uid_and_edited_limits_apply_on_the_next_spawn(
    hub_factory, tmp_path, docker_client
):
    user = unique_name("ws")
    workspaces = tmp_path / "workspaces"
    ds01 = Ds01Hub(
        hub_factory,
        tmp_path,
        extra_config=(
            f"c.DS01Spawner.workspace_root = {str(workspaces)!r}\n"
            f"c.DS01Spawner.user_ids = {{{user!r}: [4321, 4321]}}\n"
        ),
    )
    hub = ds01.hub
    try:
        hub.create_user(user, groups=["students"])
        hub.start_server(user)
        hub.wait_ready(user)
        container = hub.container_of(user)
        assert container.attrs["Config"]["User"] == "4321:4321"
        assert f"{workspaces / user}:/workspace:rw" in container.attrs["HostConfig"]["Binds"]
        result = container.exec_run(["sh", "-c", "id -u && echo hi > /workspace/hello"])
        assert result.exit_code == 0 and result.output.decode().split() == ["4321"]
        assert (workspaces / user / "hello").stat().st_uid == 4321

        hub.stop_server(user)
        text = ds01.limits_path.read_text().replace("memory: 512m", "memory: 640m")
        ds01.limits_path.write_text(text)  # the hub re-reads it on the next spawn
        hub.start_server(user)
        hub.wait_ready(user)
        again = hub.container_of(user)
        assert again.id != container.id
        assert again.attrs["HostConfig"]["Memory"] == 640 << 20
        assert "re-creating container" in hub.log(200_000)
        assert "the limits changed (Memory" in hub.log(200_000)
        assert (workspaces / user / "hello").read_text() == "hi\n"  # the workspace stays
    finally:
        hub.stop()


def test_a_gpu_reclaimed_while_stopped_is_replaced_on_restart(ds01, docker_client):
    """Two MIG instances. A student's stopped container holds one; another student runs on the
    other; a researcher (priority 50 > 10) takes the stopped one's. The student's restart
    waits in the queue, and when the researcher's server is deleted it gets a slot in a
    re-created container (new device request), never the researcher's while it runs."""
    hub = ds01.hub
    alice, bob, rita = unique_name("sa"), unique_name("sb"), unique_name("rr")
    for user, group in ((alice, "students"), (bob, "students"), (rita, "researchers")):
        hub.create_user(user, groups=[group])
    mig = {"mig": "2g.20gb"}
    hub.start_server(alice, "m", mig)
    hub.wait_ready(alice, "m")
    stopped = hub.container_of(alice, "m")
    hub.stop_server(alice, "m")
    hub.start_server(bob, "m", mig)
    hub.wait_ready(bob, "m")
    hub.start_server(rita, "m", mig)
    hub.wait_ready(rita, "m")
    taken = hub.container_of(rita, "m").labels["ds01.gpus"]
    assert taken == stopped.labels["ds01.gpus"]
    allocator = ds01.allocator(docker_client)
    assert allocator.revoked(stopped.id) == [taken]

    hub.start_server(alice, "m", mig)
    event = first_progress_event(hub, alice, "in line for", name="m")
    details = " ".join(event[EVENT_KEY]["details"])  # the queue and the holders, in detail
    assert "position 1 of 1" in details and rita in details, event
    hub.delete_server(rita, "m")
    hub.wait_ready(alice, "m", timeout=120)
    again = hub.container_of(alice, "m")
    assert again.id != stopped.id  # re-created: the old container's slot was revoked
    assert again.labels["ds01.gpus"] == taken
    uuid = ds01.inventory().slot(taken).uuid
    assert again.attrs["HostConfig"]["DeviceRequests"][0]["DeviceIDs"] == [uuid]
    assert "were reclaimed by a higher priority" in hub.log(500_000)
    by_slot: dict[str, set[str]] = {}
    for holding in allocator.holdings():
        by_slot.setdefault(holding.slot_id, set()).add(holding.user)
    assert all(len(users) == 1 for users in by_slot.values()), by_slot


def test_users_may_run_their_own_built_images_not_others(ds01, docker_client):
    """An image in the user's namespace with their owner label (as `image-create` builds it)
    is accepted as `image`; the same image is refused to another user. Whatever reserved labels
    the image carries, the container's ds01 labels are the spawner's, signed; an image with a
    reverse-proxy routing label is refused."""
    hub = ds01.hub
    owner, other = unique_name("own"), unique_name("oth")
    for user in (owner, other):
        hub.create_user(user, groups=["students"])
    tag, routed = f"ds01-{owner}/mine:latest", f"ds01-{owner}/routed:latest"
    claims = (
        f"ds01.user={other} ds01.gpus=0 ds01.priority=100 ds01.group=staff "
        "ds01.signature=v1:forged ds01.extra=x aime.mlc.USER=x"
    )
    dockerfile = f"FROM {hub.image}\nLABEL ds01.image.user={owner} ds01.image.test=1 {claims}\n"
    image, _ = docker_client.images.build(
        fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True, forcerm=True
    )
    docker_client.images.build(
        fileobj=io.BytesIO(f"FROM {tag}\nLABEL traefik.enable=true\n".encode()),
        tag=routed,
        rm=True,
        forcerm=True,
    )
    try:
        hub.start_server(owner, options={"image": tag})
        hub.wait_ready(owner)
        container = hub.container_of(owner)
        assert container.attrs["Config"]["Image"] == tag
        found = container.labels
        assert found["ds01.user"] == found["aime.mlc.USER"] == owner
        assert (found["ds01.gpus"], found["ds01.priority"], found["ds01.group"]) == (
            "",
            "10",
            "students",
        )
        assert found["ds01.extra"] == found["ds01.image.user"] == ""  # set, so none inherited
        assert provenance.load(ds01.state_dir).verify(found, container.name)
        assert ds01.allocator(docker_client).holdings() == []  # slot 0 is nobody's
        response = hub.start_server(other, options={"image": tag}, check=False)
        assert response.status_code == 403, response.text
        assert f"spawn option 'image'='{tag}': not an image you may use" in error_of(response)

        response = hub.start_server(owner, "routed", {"image": routed}, check=False)
        if response.status_code < 400:  # refused after the hub's slow_spawn_timeout
            with pytest.raises(HubError) as failed:
                hub.wait_ready(owner, "routed")
            message = str(failed.value)
        else:
            message = error_of(response)
        assert "routing label 'traefik.enable'" in message
        hub.stop_server(owner)
    finally:
        hub.remove_containers()
        for name in (routed, tag):
            docker_client.images.remove(name, force=True)


def test_two_hubs_on_one_engine_never_count_each_others_containers(
    hub_factory, docker_client, tmp_path
):
    """Two deployments (own state directory: key and id) with no label filter, one user name on
    both: quotas (2 containers, 1 GPU), GPU holdings, `ds01hub status` and the culler each see
    only their own hub's containers. (Container names are engine-wide: the servers differ.)"""
    from ds01hub.hub.client import HubClient
    from ds01hub.services.ops.app import build_components

    user = unique_name("two")
    unfiltered = "c.DS01Spawner.container_label_filter = []\n"
    hubs = []
    for side in ("a", "b"):
        (tmp_path / side).mkdir()
        hubs.append(Ds01Hub(hub_factory, tmp_path / side, unfiltered))
    try:
        for ds01, servers in zip(hubs, (("a1", "a2"), ("b1", "b2")), strict=True):
            ds01.hub.create_user(user, groups=["students"])
            ds01.hub.start_server(user, servers[0], {"gpus": 1})
            ds01.hub.start_server(user, servers[1])
            for server in servers:
                ds01.hub.wait_ready(user, server)
        deployments = {provenance.load(ds01.state_dir).deployment for ds01 in hubs}
        assert len(deployments) == 2
        for ds01, servers in zip(hubs, (("a1", "a2"), ("b1", "b2")), strict=True):
            own = {c.id for c in ds01.hub.containers()}
            assert len(own) == 2
            status = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    "import sys; from ds01hub.cli.admin import main; sys.exit(main(sys.argv[1:]))",
                    "status",
                    "--json",
                    f"--limits={ds01.limits_path}",
                    f"--state-dir={ds01.state_dir}",
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert status.returncode == 0, status.stderr
            held = [s for s in json.loads(status.stdout)["slots"] if s["user"]]
            assert [(s["user"], s["container"]) for s in held] == [(user, f"{servers[0]}._.{user}")]
            parts = build_components(
                HubClient(f"{ds01.hub.url}/hub/api", ds01.hub.admin_token),
                docker_client,
                ds01.limits_path,
                ds01.state_dir,
                inventory=ds01.inventory(),
            )
            assert {r.id for r in parts.allocator.records()} == own
            assert set(parts.culler.running_records()) == {(user, s) for s in servers}
    finally:
        for ds01 in hubs:
            ds01.hub.stop()
