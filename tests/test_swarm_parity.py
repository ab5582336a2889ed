"""DS01SwarmSpawner decides as DS01Spawner does: the GPU queue's order (effective priority from
fair share, then arrival), the HTTP status of each refusal, and the setting a wait names. No
swarm is needed: the cluster is a parsed node object and the allocator's decisions are given."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from types import SimpleNamespace

import pytest
from harness import wait_until_async
from jupyterhub.spawner import SpawnException

from ds01hub.gpu.cluster import cluster_inventory, parse_node
from ds01hub.gpu.decision import Decision
from ds01hub.gpu.messages import EVENT_KEY
from ds01hub.limits import LimitsStore, parse_limits
from ds01hub.spawner.options import SpawnChoice
from ds01hub.spawner.progress import refusal_status
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
        user=SimpleNamespace(name=user, id=1, url=f"/user/{user}/", escaped_name=user, groups=[]),
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


class Refusing:
    """An allocator over one node that answers every request with `decision`."""

    def __init__(self, decision: Decision):
        self.decision = decision
        self.inventory = cluster_inventory([parse_node(NODE)])
        self.released: list[str] = []

    def allocate(self, request, limits) -> Decision:
        return self.decision

    def release(self, container: str, reason: str) -> None:
        self.released.append(container)


async def refused(tmp_path, decision: Decision, **settings) -> tuple[DS01SwarmSpawner, Exception]:
    made = spawner(tmp_path, gpu_wait_interval=0.05, **settings)
    made._allocator = lambda store: Refusing(decision)
    store = LimitsStore(str(tmp_path / "limits.yaml"))
    limits = parse_limits({"defaults": {"max_gpus": 1, "max_gpu_equivalents": 1}}).resolve("ann")
    with pytest.raises(SpawnException) as raised:
        await made._allocate(store, limits, SpawnChoice(image="img", gpus=1))
    return made, raised.value


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("user_limit", 409),
        ("equivalents_limit", 409),
        ("per_container_limit", 403),
        ("not_available", 400),
        ("bad_request", 400),
    ],
)
async def test_each_refusal_has_its_own_status_as_on_one_host(tmp_path, code, status):
    assert refusal_status(code) == status  # the one mapping DS01Spawner uses too
    _, error = await refused(tmp_path, Decision(reason="no", code=code))
    assert error.status_code == status and error.reason == code


async def test_a_wait_names_the_swarm_spawners_setting(tmp_path):
    busy = Decision(reason="all slots are taken", code="busy")
    made, error = await refused(tmp_path, busy, gpu_wait_timeout=0.3)
    assert error.status_code == 503
    waits = [e[EVENT_KEY] for e in made._events if e.get(EVENT_KEY, {}).get("kind") == "wait"]
    assert waits, made._events
    for said in (" ".join(waits[-1]["details"]), str(error)):
        assert "c.DS01SwarmSpawner.gpu_wait_timeout" in said
        assert "c.DS01Spawner." not in said


async def test_the_swarm_form_offers_no_queue_option_and_a_spawn_with_it_is_refused(tmp_path):
    made = spawner(tmp_path)
    cluster = Refusing(Decision())
    cluster.holdings = list
    made._allocator = lambda store: cluster
    form = await made._render_options_form()
    assert 'name="gpu"' in form and 'name="queue"' not in form
    made.user_options = {"gpus": 1, "queue": True}
    limits = parse_limits({"defaults": {"max_gpus": 1}}).resolve("ann")
    with pytest.raises(SpawnException) as raised:
        made._choose(cluster, limits)
    assert raised.value.status_code == 400
    assert "c.DS01SwarmSpawner.gpu_wait_timeout" in str(raised.value)
