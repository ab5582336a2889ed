"""DS01SwarmSpawner decides as DS01Spawner does: the GPU queue's order (effective priority from
fair share, then arrival), the HTTP status of each refusal, and the setting a wait names. No
swarm is needed: the cluster is a parsed node object and the allocator's decisions are given."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from types import SimpleNamespace

import pytest
from harness import wait_until_async

from ds01hub.gpu.decision import Decision
from ds01hub.spawner.swarm_spawner import DS01SwarmSpawner
from ds01hub.units import utcnow

NODE = {
    "ID": "n1",
    "Description": {
        "Hostname": "node1",
        "Resources": {
            "GenericResources": [{"NamedResourceSpec": {"Kind": "DS01-GPU-0", "Value": "GPU-aa"}}]
        },
    },
    "Spec": {"Availability": "active"},
    "Status": {"State": "ready"},
}
FAIRSHARE = "gpu_allocation:\n  fairshare:\n    half_life: 1d\n    weight: 20\n"


@pytest.fixture(autouse=True)
def _hub_wide_state():
    """The class's per-hub queue and event log are keyed by path; each test has its own."""
    yield
    DS01SwarmSpawner._queues.clear()
    DS01SwarmSpawner._eventlogs.clear()


def spawner(tmp_path, user: str = "ann", **settings) -> DS01SwarmSpawner:
    limits = tmp_path / "limits.yaml"
    if not limits.exists():
        limits.write_text(FAIRSHARE)
    return DS01SwarmSpawner(
        user=SimpleNamespace(name=user, id=1, url=f"/user/{user}/", escaped_name=user),
        hub=SimpleNamespace(
            url="http://hub/", api_url="http://hub/api", public_host="", base_url="/hub/"
        ),
        orm_spawner=None,
        limits_path=str(limits),
        state_dir=str(tmp_path / "state"),
        **settings,
    )


def used(made: DS01SwarmSpawner, user: str, hours: float) -> None:
    """`user` held a slot for `hours`, released an hour ago (in the hub's event log)."""
    ended = utcnow() - timedelta(hours=1)
    log = made._eventlog()
    began = ended - timedelta(hours=hours)
    log.record("allocate", user, slot="n1:0", container=f"c-{user}", at=began)
    log.record("release", user, slot="n1:0", container=f"c-{user}", at=ended)


async def test_the_swarm_queue_orders_by_fair_share_then_arrival(tmp_path):
    first = spawner(tmp_path)
    for user, hours in (("heavy", 40), ("medium", 10), ("light", 1)):
        used(first, user, hours)
    queue = first._queue()
    assert spawner(tmp_path, "bob")._queue() is queue  # one queue per hub
    free = [0]
    served: list[str] = []

    def attempt_for(key: str):
        async def attempt() -> Decision:
            if free[0] <= 0:
                return Decision(reason="all slots are taken", code="busy")
            free[0] -= 1
            served.append(key)
            return Decision(granted=("n1:0",))

        return attempt

    async def abandon(decision: Decision) -> None:
        free[0] += 1

    waits = [  # equal configured priority; the heaviest user asks first
        asyncio.create_task(
            queue.acquire(user, 10, attempt_for(user), user=user, timeout=30, abandon=abandon)
        )
        for user in ("heavy", "medium", "light")
    ]
    try:
        await wait_until_async(lambda: len(queue) == 3, 10, message="all three wait")
        queue.notify()
        await wait_until_async(
            lambda: queue.keys() == ["light", "medium", "heavy"], 10, message="by usage"
        )
        for expected in (["light"], ["light", "medium"], ["light", "medium", "heavy"]):
            free[0] = 1
            queue.notify()
            await wait_until_async(lambda e=expected: served == e, 10, message=f"{expected}")
    finally:
        for wait in waits:
            wait.cancel()
