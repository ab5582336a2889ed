"""Waiting for a GPU without a time limit, end to end (real JupyterHub, real containers): a
spawn with the `queue` option finds no free GPU, its request is stored and the spawn ends
saying so; the hub restarts; when a slot frees, the hub starts that server by itself."""

from __future__ import annotations

import pytest
from harness import unique_name, wait_until
from harness.ds01_spawner import Ds01Hub

from ds01hub.gpu.queued import QueuedStore

pytestmark = [pytest.mark.e2e, pytest.mark.docker]

MIG = {"mig": "2g.20gb"}  # the test hub's simulated inventory has two of these

QUEUE_CONFIG = """
from ds01hub.hub.services import configure_queue
from ds01hub.services.ops.warnings import hub_announcement
configure_queue(c, {state_dir!r})
c.JupyterHub.template_vars = {{"announcement": hub_announcement({state_dir!r})}}
c.DS01Spawner.queue_first_wait = 2.0
c.DS01Spawner.max_queued_per_user = 1
"""


def test_a_queued_request_survives_a_hub_restart_and_starts_when_a_slot_frees(
    hub_factory, tmp_path, docker_client
):
    config = QUEUE_CONFIG.format(state_dir=str(tmp_path / "state"))
    ds01 = Ds01Hub(hub_factory, tmp_path, extra_config=config)
    hub = ds01.hub
    first, second, waiter = (unique_name(p) for p in ("qa", "qb", "qw"))
    store = QueuedStore(ds01.state_dir)
    try:
        for user in (first, second, waiter):
            hub.create_user(user, groups=["students"])
        for user in (first, second):  # both MIG slots in use by running servers
            hub.start_server(user, "m", MIG)
            hub.wait_ready(user, "m")
        response = hub.start_server(waiter, "q", {**MIG, "queue": True}, check=False)
        message = response.json().get("message", response.text)
        assert "queued: no " in message and "starts by itself" in message, message
        assert "no estimate: the GPUs are in use by running containers" in message
        [stored] = store.load()
        assert (stored.user, stored.server, stored.options) == (
            waiter,
            "q",
            {"image": stored.options["image"], **MIG},
        )
        # One request per user here (max_queued_per_user = 1): a second is refused.
        again = hub.start_server(waiter, "q2", {**MIG, "queue": True}, check=False)
        assert "already has 1 queued request(s)" in again.json().get("message", again.text)

        hub.stop()
        hub.start()
        assert [r.container for r in store.load()] == [stored.container]
        assert not (hub.server(waiter, "q") or {}).get("ready")
        # The restarted hub waits for it again and notes where it stands (container-list):
        # first of one; the shutdown stopped the other servers, so their holds' end is known.
        [noted] = wait_until(
            lambda: [r for r in store.load() if r.position == 1 and r.estimate],
            60,
            message=lambda: f"the request's position is noted\n{store.load()}\n{hub.log()}",
        )
        assert noted.waiting == 1
        home = hub.login(waiter).get(f"{hub.hub_url}home", timeout=30).text
        assert "Your server q waits for a GPU: position 1 of 1, estimate: " in home

        hub.delete_server(first, "m")  # its container is removed and its slot released
        wait_until(
            lambda: hub.server(waiter, "q"),
            120,
            message=lambda: f"the hub starts the queued server\n{hub.log()}",
        )
        hub.wait_ready(waiter, "q", timeout=240)
        container = hub.container_of(waiter, "q")
        assert container.status == "running" and container.labels["ds01.gpus"].startswith("4:")
        assert store.load() == []
        home = hub.login(waiter).get(f"{hub.hub_url}home", timeout=30).text
        assert "Your queued server q got its GPU and started at" in home
        assert "ds01: 1 queued spawn request(s) wait for GPUs" in hub.log(500_000)
    finally:
        hub.stop()
