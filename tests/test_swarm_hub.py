"""The hub's side of swarm mode on a real three-node swarm (the session's `swarm_cluster`), the
hub on this host (`DS01SwarmSpawner`): a hub killed (SIGKILL) and restarted leaks nothing, and a
node that dies and comes back is reconciled.

The servers are a busybox stand-in from the cluster's registry (`busybox httpd` answering at the
server's prefix with its user's name): these tests are about the hub's record, Swarm's services
and the allocator's slots, not Jupyter (tests/test_swarm.py runs the real single-user image on a
worker). The hub kills itself at one point of a spawn through a subclass in its own config (the
only test hook; the production code has none), once per marker file, as in
tests/test_spawner_reliability_e2e.py.
"""

from __future__ import annotations

import json
import re
import threading

import pytest
from harness.hub import Hub
from harness.swarm import inventory_of, node_state, running_task, swarm_allocator
from harness.wait import wait_until

from ds01hub import provenance
from ds01hub.gpu.cluster import split_slot_id
from ds01hub.gpu.swarm_state import create_service, scale_service
from ds01hub.limits import parse_limits
from ds01hub.spawner.swarm_plan import service_name, service_spec

pytestmark = pytest.mark.swarm

HOLD = "1h"
LIMITS = parse_limits({"defaults": {"max_gpus": 1, "gpu_hold_after_stop": HOLD}})
#: the stand-in server: answers GET {prefix} with its user's name
STAND_IN = (
    'd="/tmp/www$JUPYTERHUB_SERVICE_PREFIX"; /bin/busybox mkdir -p "$d"; '
    'echo "$JUPYTERHUB_USER" > "${d}index.html"; '
    "exec /bin/busybox httpd -f -p 8888 -h /tmp/www"
)
DIES_AT = """
import os
import signal
from pathlib import Path

from ds01hub.spawner.swarm_spawner import DS01SwarmSpawner

MARKERS = Path({markers!r})


def die_if(point, user):
    marker = MARKERS / f"{{point}}-{{user}}"
    if marker.exists():
        marker.unlink()
        os.kill(os.getpid(), signal.SIGKILL)


class DyingSwarmSpawner(DS01SwarmSpawner):
    async def _service_for(self, *args):
        service_id = await super()._service_for(*args)
        die_if("created", self.user.name)  # the service exists at zero replicas
        return service_id

    async def _running_address(self, *args):
        die_if("scaled", self.user.name)  # scaled to one, the address not recorded
        return await super()._running_address(*args)


c.JupyterHub.spawner_class = DyingSwarmSpawner
"""


@pytest.fixture
def cluster_hub_parts(swarm_cluster, swarm_manager, tmp_path):
    """The session's cluster, its manager (the test's services removed after it), a directory."""
    return swarm_cluster, swarm_manager, tmp_path


def swarm_hub(cluster, tmp_path, extra: str = "", hold: str = HOLD) -> Hub:
    """A hub on this host whose spawner is the manager's, with the stand-in server."""
    limits_file = tmp_path / "limits.yaml"
    limits_file.write_text(f"defaults: {{max_gpus: 1, gpu_hold_after_stop: {hold}}}\n")
    return Hub(
        directory=tmp_path / "hub",
        hub_ip=cluster.gateway(),
        image=cluster.image,
        spawner="ds01hub.spawner.swarm_spawner.DS01SwarmSpawner",
        extra_config=(
            f"c.DS01SwarmSpawner.client_kwargs = {{'base_url': {cluster.manager.url!r}}}\n"
            f"c.DS01SwarmSpawner.limits_path = {str(limits_file)!r}\n"
            "c.DS01SwarmSpawner.gpu_wait_interval = 0.5\n"
            f"c.DS01SwarmSpawner.cmd = ['/bin/busybox', 'sh', '-c', {STAND_IN!r}, 'stand-in']\n"
            + extra
        ),
    )


def answers(hub: Hub, user: str) -> bool:
    """The user's server answers through the hub's proxy, as that user's."""
    response = hub.user_request(hub.token_for(user), "GET", user, "")
    return response.status_code == 200 and response.text.strip() == user


def stopped(hub: Hub, user: str) -> bool:
    server = hub.server(user)
    return not server or not (server.get("ready") or server.get("pending"))


def service_of(manager, user: str):
    found = manager.api.services(filters={"name": service_name(user)})
    return next((s for s in found if s["Spec"]["Name"] == service_name(user)), None)


def replicas(service) -> int:
    return service["Spec"]["Mode"]["Replicated"]["Replicas"]


def no_leaks(hub: Hub, manager, users) -> None:
    """Every server the hub runs has a service desired to run, and every service desired to
    run is a server the hub runs (`ready`); nothing else of these users runs."""
    for user in users:
        server = hub.server(user)
        service = service_of(manager, user)
        running = bool(server and server.get("ready"))
        desired = bool(service and replicas(service) > 0)
        assert running == desired, (user, server, service and service["Spec"]["Mode"])
        if running:
            assert running_task(manager, service["ID"]), f"{user}: no running task"


def test_a_hub_killed_and_restarted_leaks_nothing(cluster_hub_parts):
    """ria runs on a worker (a MIG slot: node3 only). The hub dies (SIGKILL) right after
    creating ben's service: at its restart ria is still running and reachable, ben's service
    (never started) is removed and holds nothing. ria stops (her slot held); the hub dies right
    after scaling cai's service to one: at its restart cai's server is adopted (same service,
    same task), ria's hold is kept and her restart gets her slot back."""
    cluster, manager, tmp_path = cluster_hub_parts
    markers = tmp_path / "markers"
    markers.mkdir()
    hub = swarm_hub(cluster, tmp_path, DIES_AT.format(markers=str(markers)))
    users = ("ria", "ben", "cai")
    hub.start()
    try:
        for user in users:
            hub.create_user(user)
        hub.start_server("ria", options={"mig": "3g.40gb"})
        hub.wait_ready("ria", timeout=180)
        assert answers(hub, "ria")
        ria = service_of(manager, "ria")
        ria_slot = ria["Spec"]["Labels"]["ds01.gpus"]
        assert split_slot_id(ria_slot)[0] == "node3"
        ria_task = running_task(manager, ria["ID"])["ID"]

        # -- killed between creating ben's service and scaling it
        (markers / "created-ben").write_text("")
        hub.start_server("ben", options={"gpus": 1}, check=False)
        assert hub.process.wait(120) == -9
        ben = service_of(manager, "ben")
        assert ben is not None and replicas(ben) == 0  # created, never started
        trust = provenance.load(hub.state_dir)
        allocator = swarm_allocator(cluster, manager, hub.state_dir, trust, LIMITS)
        assert [(h.container, h.state) for h in allocator.holdings()] == [
            (service_name("ria"), "running")
        ]

        hub.start()  # JupyterHub stops the server it knew was starting: the ghost goes
        wait_until(lambda: service_of(manager, "ben") is None, 60, message="ben's ghost removed")
        assert hub.server("ria")["ready"] and answers(hub, "ria")
        assert running_task(manager, ria["ID"])["ID"] == ria_task  # the same server, untouched
        assert not (hub.server("ben") or {}).get("ready")
        no_leaks(hub, manager, users)

        # -- ria stops (held); killed after scaling cai's service to one
        hub.stop_server("ria")
        (markers / "scaled-cai").write_text("")
        hub.start_server("cai", options={"gpus": 1}, check=False)
        assert hub.process.wait(120) == -9
        cai = service_of(manager, "cai")
        assert replicas(cai) == 1
        cai_task = wait_until(lambda: running_task(manager, cai["ID"]), 120, message="cai runs")

        hub.start()
        hub.wait_ready("cai", timeout=180)
        assert answers(hub, "cai")
        assert service_of(manager, "cai")["ID"] == cai["ID"]  # adopted, not re-created
        assert running_task(manager, cai["ID"])["ID"] == cai_task["ID"]
        assert "adopting the running service" in hub.log(500_000)
        held = {h.container: h for h in allocator.holdings()}
        assert held[service_name("ria")].state == "stopped"
        assert held[service_name("ria")].held_until is not None  # the hold survived
        assert held[service_name("cai")].state == "running"
        no_leaks(hub, manager, users)

        hub.start_server("ria", options={"mig": "3g.40gb"})  # back on her held slot
        hub.wait_ready("ria", timeout=180)
        assert service_of(manager, "ria")["Spec"]["Labels"]["ds01.gpus"] == ria_slot
        assert answers(hub, "ria")
        no_leaks(hub, manager, users)
    finally:
        hub.stop()
        if node_state(manager, "node2") != "ready":  # leave the cluster as it was
            cluster.revive("node2")
            wait_until(lambda: node_state(manager, "node2") == "ready", 120)


def progress_messages(hub: Hub, user: str, timeout: float = 180) -> list[str]:
    """Every event's message of the server's spawn, read while it spawns, until it ends."""
    path = f"/users/{user}/server/progress"
    response = hub.api("GET", path, stream=True, timeout=timeout)
    return [
        json.loads(line[5:]).get("message", "")
        for line in response.iter_lines(decode_unicode=True)
        if line and line.startswith("data:")
    ]


def node_of_task(manager, task) -> str:
    return manager.api.inspect_node(task["NodeID"])["Description"]["Hostname"]


def test_a_node_that_leaves_and_comes_back_is_reconciled(cluster_hub_parts):
    """Two servers on whole GPUs (spread: node1 and node2). node2's power goes: the hub reports
    its server stopped and scales its service to zero; the other runs on. node2 comes back:
    its old server does not run again (Swarm starts nothing for it, and it is stopped for good)
    and its slot is held for its hold; its user, starting again, is told why it stopped and
    gets the held slot back; node2's other slot is offered again (two new servers fill the
    cluster's last two whole GPUs, one on each node)."""
    cluster, manager, tmp_path = cluster_hub_parts
    hub = swarm_hub(
        cluster,
        tmp_path,
        "c.Spawner.poll_interval = 2\nc.JupyterHub.tornado_settings = {'slow_spawn_timeout': 0}\n",
    )
    users = ("ned", "oda", "pia", "quy")
    hub.start()
    try:
        for user in users:
            hub.create_user(user)
        placed = {}
        for user in ("ned", "oda"):
            hub.start_server(user, options={"gpus": 1})
            hub.wait_ready(user, timeout=180)
            service = service_of(manager, user)
            placed[node_of_task(manager, running_task(manager, service["ID"]))] = user
        assert set(placed) == {"node1", "node2"}, placed
        lost_user, kept_user = placed["node2"], placed["node1"]
        lost = service_of(manager, lost_user)
        lost_slot = lost["Spec"]["Labels"]["ds01.gpus"]
        # what Swarm itself does: a service past ds01hub (not signed for this hub, so the hub
        # leaves it alone) on node2's other slot, restart policy none, left at one replica
        other = next(
            s for s in inventory_of(cluster).slots if s.node == "node2" and s.id != lost_slot
        )
        bare = create_service(
            manager,
            service_spec(
                name="bare-on-node2",
                image=cluster.image,
                command=["sleep", "3600"],
                env={},
                signed_labels={"ds01.test": "1"},
                slots=[other],
            ),
        )
        scale_service(manager, bare, 1)
        wait_until(lambda: running_task(manager, bare), 60, message="the bare service runs")

        cluster.kill("node2")
        wait_until(lambda: stopped(hub, lost_user), 120, message="the hub sees it stopped")
        assert replicas(service_of(manager, lost_user)) == 0  # stopped for good
        assert "the machine left the cluster (node2)" in hub.log(500_000)
        assert hub.server(kept_user)["ready"] and answers(hub, kept_user)

        cluster.revive("node2")
        wait_until(lambda: node_state(manager, "node2") == "ready", 120, message="node2 back")
        wait_until(
            lambda: "node2" in {s.node for s in inventory_of(cluster).slots},
            60,
            message="node2's slots offered again",
        )
        # nothing of the lost server is desired to run; what the returned node still reports
        # of its old task ends
        tasks = manager.api.tasks(filters={"service": lost["ID"]})
        assert {t["DesiredState"] for t in tasks} <= {"shutdown", "remove"}, tasks
        wait_until(lambda: running_task(manager, lost["ID"]) is None, 60, message="old task ends")
        # Swarm alone (the bare service, still at one replica) makes no new task, neither while
        # node2 was down nor now that it is back: its one task ended with its node
        wait_until(lambda: running_task(manager, bare) is None, 60, message="bare task ends")
        assert len(manager.api.tasks(filters={"service": bare})) == 1
        assert replicas(manager.api.inspect_service(bare)) == 1
        manager.api.remove_service(bare)
        trust = provenance.load(hub.state_dir)
        allocator = swarm_allocator(cluster, manager, hub.state_dir, trust, LIMITS)
        held = {h.container: h for h in allocator.holdings()}
        assert held[service_name(lost_user)].state == "stopped"
        assert held[service_name(lost_user)].slot_id == lost_slot  # held for its user

        hub.start_server(lost_user, options={"gpus": 1})
        events = progress_messages(hub, lost_user)
        # the first thing its spawn says, after JupyterHub's own "Server requested"
        assert events[1] == "Your server stopped: the machine left the cluster (node2).", events
        hub.wait_ready(lost_user, timeout=180)
        again = service_of(manager, lost_user)
        assert again["Spec"]["Labels"]["ds01.gpus"] == lost_slot  # its held slot
        assert node_of_task(manager, running_task(manager, again["ID"])) == "node2"
        assert answers(hub, lost_user)

        # the two whole GPUs left, one on each node: node2's is offered again like node1's
        new_nodes = set()
        for user in ("pia", "quy"):
            hub.start_server(user, options={"gpus": 1})
            hub.wait_ready(user, timeout=180)
            task = running_task(manager, service_of(manager, user)["ID"])
            new_nodes.add(node_of_task(manager, task))
        assert new_nodes == {"node1", "node2"}
        # nobody shares a slot: the allocator's running holders and Swarm's running tasks agree
        running = [h for h in allocator.holdings() if h.state == "running"]
        assert sorted(h.slot_id for h in running) == sorted({h.slot_id for h in running})
        assert {h.container for h in running} == {service_name(u) for u in users}
        no_leaks(hub, manager, users)
    finally:
        hub.stop()
        if node_state(manager, "node2") != "ready":  # leave the cluster as it was
            cluster.revive("node2")
            wait_until(lambda: node_state(manager, "node2") == "ready", 120)


PROFILES = """
c.DS01SwarmSpawner.profile_list = [
    {"display_name": "A MIG slice", "slug": "slice", "ds01_override": {"mig": "3g.40gb"}},
    {"display_name": "A whole GPU", "slug": "gpu", "ds01_override": {"gpus": 1}},
]
c.DS01SwarmSpawner.gpu_wait_timeout = 150
c.JupyterHub.tornado_settings = {"slow_spawn_timeout": 0}
"""


def test_the_form_profiles_and_the_gpu_queue_are_the_clusters(cluster_hub_parts):
    """The form counts the cluster's slots per profile (node3's two slices, four whole GPUs on
    node1 and node2). amy and bob take both slices (profile "slice"); cal asks for one too and
    waits in the hub's GPU queue, told his place in line in the progress; amy stops (no hold)
    and cal's server starts on her slot, on node3."""
    cluster, manager, tmp_path = cluster_hub_parts
    hub = swarm_hub(cluster, tmp_path, PROFILES, hold="0s")
    users = ("amy", "bob", "cal")
    hub.start()
    try:
        for user in users:
            hub.create_user(user)
        session = hub.login("cal")
        form = session.get(f"{hub.hub_url}spawn/cal", timeout=60).text
        assert free_counts(form) == [("2", "2"), ("4", "4")], form
        for user in ("amy", "bob"):
            hub.start_server(user, options={"profile": "slice"})
            hub.wait_ready(user, timeout=180)
        slots = {u: service_of(manager, u)["Spec"]["Labels"]["ds01.gpus"] for u in ("amy", "bob")}
        assert sorted(slots.values()) == ["node3/0:0", "node3/0:1"]
        form = session.get(f"{hub.hub_url}spawn/cal", timeout=60).text
        assert free_counts(form) == [("0", "2"), ("4", "4")], form

        hub.start_server("cal", options={"profile": "slice"})
        events: list[str] = []
        reader = threading.Thread(
            target=lambda: events.extend(progress_messages(hub, "cal")), daemon=True
        )
        reader.start()
        wait_until(
            lambda: (
                service_of(manager, "cal") is None
                and hub.log(500_000).count("You are next in line for a MIG 3g.40gb slice")
            ),
            60,
            message="cal waits in line",
        )
        hub.stop_server("amy")
        hub.wait_ready("cal", timeout=120)
        reader.join(60)
        assert any(e.startswith("You are next in line for a MIG 3g.40gb slice") for e in events)
        cal = service_of(manager, "cal")
        assert cal["Spec"]["Labels"]["ds01.gpus"] == slots["amy"]
        assert node_of_task(manager, running_task(manager, cal["ID"])) == "node3"
        assert answers(hub, "cal")
        no_leaks(hub, manager, users)
    finally:
        hub.stop()


def free_counts(form: str) -> list[tuple[str, str]]:
    """The form's "N of M free now" per profile, in the order of the profiles."""
    return re.findall(r'data-free="(\d+)" data-total="(\d+)"', form)
