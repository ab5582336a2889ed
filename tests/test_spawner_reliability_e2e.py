"""DS01Spawner's allocation under trouble, end to end (real JupyterHub, real containers): an
image pull longer than the claim's TTL, and the hub killed between `docker create` and
`docker start`, or after the start but before it recorded the server's address.

The trouble is injected by a subclass of DS01Spawner defined in the test hub's own config
(the only test hook; the production code has none): a slow `pull_image`, or the hub killing
itself (SIGKILL) at one point of `start`, once, when a marker file exists."""

from __future__ import annotations

import json
import time

import pytest
from harness import unique_name
from harness.ds01_spawner import Ds01Hub

from ds01hub.gpu.eventlog import EventLog

pytestmark = [pytest.mark.e2e, pytest.mark.docker]

PULL_SECONDS = 9.0  # three times the claim's TTL below

SLOW_PULL = f"""
import asyncio
from ds01hub.spawner import DS01Spawner

class SlowPullSpawner(DS01Spawner):
    async def pull_image(self, image):
        if self.user.name.startswith("slow"):
            await asyncio.sleep({PULL_SECONDS})
        return await super().pull_image(image)

c.JupyterHub.spawner_class = SlowPullSpawner
c.DS01Spawner.reservation_ttl = 3.0
"""

KILL_AT = """
import os
import signal
from pathlib import Path
from ds01hub.spawner import DS01Spawner

MARKER = Path({marker!r})

def die_once():
    if MARKER.exists():
        MARKER.unlink()
        os.kill(os.getpid(), signal.SIGKILL)

class DyingSpawner(DS01Spawner):
    async def {method}(self):
        {before}
        result = await super().{method}()
        {after}
        return result

c.JupyterHub.spawner_class = DyingSpawner
c.Spawner.http_timeout = 600  # a hub waiting on an address that never was would never finish
"""


def running_by_slot(docker_client, hub) -> dict[str, list[str]]:
    by_slot: dict[str, list[str]] = {}
    for container in hub.containers(all=False):
        for slot in filter(None, container.labels.get("ds01.gpus", "").split(",")):
            by_slot.setdefault(slot, []).append(container.name)
    return by_slot


def progress_until(hub, user: str, name: str, containing: str, timeout: float = 120) -> str:
    """Read the spawn's progress stream until a message contains `containing`."""
    path = f"/users/{user}/servers/{name}/progress"
    response = hub.api("GET", path, stream=True, timeout=timeout)
    deadline = time.monotonic() + timeout
    try:
        for line in response.iter_lines(decode_unicode=True):
            if line and line.startswith("data:"):
                message = json.loads(line[5:]).get("message", "")
                if containing in message:
                    return message
            if time.monotonic() > deadline:
                break
    finally:
        response.close()
    return ""


def test_a_pull_longer_than_the_claims_ttl_keeps_its_slot(hub_factory, tmp_path, docker_client):
    """Two MIG instances: one runs; the slow spawn gets the other and pulls for three TTLs;
    a third spawn meanwhile waits instead of taking the slot being pulled for."""
    ds01 = Ds01Hub(hub_factory, tmp_path, extra_config=SLOW_PULL)
    hub = ds01.hub
    holder, slow, waiter = unique_name("hold"), unique_name("slow"), unique_name("wait")
    try:
        for user in (holder, slow, waiter):
            hub.create_user(user, groups=["students"])
        mig = {"mig": "2g.20gb"}
        hub.start_server(holder, "m", mig)
        hub.wait_ready(holder, "m")
        hub.start_server(slow, "m", mig)
        granted = progress_until(hub, slow, "m", "GPU slot(s)")
        assert granted, hub.log()
        hub.start_server(waiter, "m", mig)
        while not (hub.server(slow, "m") or {}).get("ready"):  # the pull, then the start
            assert all(len(names) == 1 for names in running_by_slot(docker_client, hub).values())
            server = hub.server(slow, "m")
            assert server and server.get("pending"), hub.log()
            time.sleep(0.3)
        assert all(len(names) == 1 for names in running_by_slot(docker_client, hub).values())
        slow_slot = hub.container_of(slow, "m").labels["ds01.gpus"]
        waiting = hub.server(waiter, "m")
        assert waiting and waiting.get("pending") == "spawn" and not waiting.get("ready")

        hub.delete_server(holder, "m")  # the waiter gets the holder's slot, not the pulled one
        hub.wait_ready(waiter, "m", timeout=180)
        assert hub.container_of(waiter, "m").labels["ds01.gpus"] != slow_slot
        assert all(len(names) == 1 for names in running_by_slot(docker_client, hub).values())
        assert not [row for row in ds01.allocator(docker_client).status() if row.conflict]
    finally:
        hub.stop()


def _dying_hub(hub_factory, tmp_path, method: str, before: str = "", after: str = "") -> Ds01Hub:
    marker = tmp_path / "die-once"
    marker.write_text("")
    config = KILL_AT.format(
        marker=str(marker), method=method, before=before or "pass", after=after or "pass"
    )
    return Ds01Hub(hub_factory, tmp_path, extra_config=config)


def test_a_hub_killed_between_create_and_start_leaves_no_ghost(
    hub_factory, tmp_path, docker_client
):
    ds01 = _dying_hub(hub_factory, tmp_path, "start_object", before="die_once()")
    hub = ds01.hub
    user = unique_name("kcs")
    try:
        hub.create_user(user, groups=["researchers"])
        hub.start_server(user, "g", {"gpus": 1}, check=False)  # the hub dies answering it
        assert hub.process.wait(120) == -9  # died in start_object: created, never started
        [container] = hub.containers()
        assert container.status == "created"
        allocator = ds01.allocator(docker_client)
        assert allocator.holdings() == []  # it holds nothing: its spawn died with the hub
        assert [g.id for g in allocator.ghosts()] == [container.id]

        hub.start()  # JupyterHub stops the server it knew was starting: the ghost is removed
        deadline = time.monotonic() + 120
        while hub.containers() and time.monotonic() < deadline:
            time.sleep(0.3)
        assert hub.containers() == [], hub.log()
        events = EventLog(ds01.state_dir / "events.db").events(kind="reconcile", user=user)
        assert [e.reason.split(":")[0] for e in events] == ["removed"]
        assert EventLog(ds01.state_dir / "events.db").open_allocations() == []

        hub.start_server(user, "g", {"gpus": 1})  # and the server starts again at once
        hub.wait_ready(user, "g")
        assert hub.container_of(user, "g").status == "running"
    finally:
        hub.stop()


def test_a_hub_killed_after_start_adopts_the_server_on_restart(
    hub_factory, tmp_path, docker_client
):
    ds01 = _dying_hub(hub_factory, tmp_path, "start", after="die_once()")
    hub = ds01.hub
    user = unique_name("kas")
    try:
        hub.create_user(user, groups=["researchers"])
        hub.start_server(user, "g", {"gpus": 1}, check=False)  # the hub dies answering it
        assert hub.process.wait(120) == -9  # started, its address never recorded
        [container] = hub.containers(all=False)
        slot = container.labels["ds01.gpus"]

        hub.start()
        hub.wait_ready(user, "g", timeout=300)
        assert hub.container_of(user, "g").id == container.id  # adopted, not re-created
        log = hub.log(500_000)
        assert "adopting the running container" in log
        assert "does not appear to be running" not in log
        events = EventLog(ds01.state_dir / "events.db").events(kind="reconcile", user=user)
        assert [e.reason.split(":")[0] for e in events] == ["adopted"]
        held = [(h.slot_id, h.state) for h in ds01.allocator(docker_client).holdings()]
        assert held == [(slot, "running")]
    finally:
        hub.stop()


STALLS_ONCE = """
import asyncio
from ds01hub.spawner import DS01Spawner

class StallsOnce(DS01Spawner):
    stalled = True

    async def _keep_claim(self):
        if not StallsOnce.stalled:  # the first attempt never renews its claim
            await super()._keep_claim()

    async def pull_image(self, image):
        if StallsOnce.stalled:
            await asyncio.sleep(5)  # longer than the claim's TTL
            StallsOnce.stalled = False
        return await super().pull_image(image)

c.JupyterHub.spawner_class = StallsOnce
c.DS01Spawner.reservation_ttl = 2.0
"""


def test_a_spawn_whose_claim_lapsed_never_starts_on_it_and_asks_again(
    hub_factory, tmp_path, docker_client
):
    ds01 = Ds01Hub(hub_factory, tmp_path, extra_config=STALLS_ONCE)
    hub = ds01.hub
    user = unique_name("lap")
    try:
        hub.create_user(user, groups=["researchers"])
        hub.start_server(user, "g", {"gpus": 1})
        hub.wait_ready(user, "g")
        log = hub.log(500_000)
        assert "lapsed before it could start" in log and "asking again" in log
        assert len(hub.containers()) == 1  # the first attempt's container was removed
        held = [h.state for h in ds01.allocator(docker_client).holdings()]
        assert held == ["running"]
    finally:
        hub.stop()
