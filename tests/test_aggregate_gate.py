"""Aggregate caps checked and a container started as one step per user (issue 17): the race of
two starts of one user, made deterministic with an engine in memory; the arithmetic of the
check as properties. The real multi-process torture is tests/test_aggregate_torture.py."""

from __future__ import annotations

import asyncio
import socket
from itertools import permutations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ds01hub import labels
from ds01hub.aggregate import ContainerUse, aggregate_refusal, counts_toward_caps
from ds01hub.gpu.allocator import Owner
from ds01hub.host.aggregate_gate import (
    AggregateRefused,
    UserLockTimeout,
    start_within_caps,
    user_lock,
)
from ds01hub.limits import AggregateLimits

LIVE = Owner.current().label()
DEAD = Owner(socket.gethostname(), "a-boot-before-this-one", 4242, 1).label()


class Engine:
    """Containers in memory: state, NanoCpus, Memory, creator label; `inspect_container` as
    Docker answers it (HostConfig only)."""

    def __init__(self) -> None:
        self.containers: dict[str, dict] = {}

    def add(self, name: str, cpus: float, memory: int, state="created", creator=LIVE) -> None:
        self.containers[name] = {
            "state": state,
            "host": {"NanoCpus": round(cpus * 1e9), "Memory": memory},
            "creator": creator,
        }

    def inspect_container(self, container_id: str) -> dict:
        return {"HostConfig": self.containers[container_id]["host"]}

    def records(self) -> list[labels.ContainerRecord]:
        return [
            labels.ContainerRecord(
                id=name,
                name=name,
                user="alice",
                project=name,
                group=None,
                priority=10,
                gpus=(),
                gpu_uuids=(),
                image="img",
                state=entry["state"],
                created_at=None,
                finished_at=None,
                labels={labels.CREATOR: entry["creator"]},
            )
            for name, entry in self.containers.items()
        ]

    async def start(self, name: str) -> str:
        self.containers[name]["state"] = "running"
        return name


CAP = AggregateLimits(cpus=1.5, memory=3 << 30)


def gate(tmp_path, engine: Engine, name: str, start=None, on_wait=None, timeout=30.0):
    return start_within_caps(
        tmp_path,
        "alice",
        CAP,
        engine,
        engine.records,
        (name, name),
        start or (lambda: engine.start(name)),
        on_wait=on_wait,
        timeout=timeout,
    )


async def test_two_starts_of_one_user_at_once_cannot_both_pass(tmp_path):
    """A has checked and is inside `docker start` when B arrives: B waits for the lock, then
    sees A running and is refused. Each alone fits (1 of 1.5 CPUs), both do not."""
    engine = Engine()
    engine.add("a", 1, 1 << 30)
    engine.add("b", 1, 1 << 30)
    a_inside, a_may_finish, b_waits = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def slow_start_a() -> str:
        a_inside.set()
        await a_may_finish.wait()
        return await engine.start("a")

    first = asyncio.ensure_future(gate(tmp_path, engine, "a", start=slow_start_a))
    await asyncio.wait_for(a_inside.wait(), 30)
    second = asyncio.ensure_future(gate(tmp_path, engine, "b", on_wait=b_waits.set))
    await asyncio.wait_for(b_waits.wait(), 30)
    assert engine.containers["b"]["state"] == "created"  # B has not started: it waits
    a_may_finish.set()
    assert await first == "a"
    with pytest.raises(AggregateRefused) as refused:
        await second
    assert "1 CPUs" in str(refused.value) and "2 together, over the aggregate 1.5" in str(
        refused.value
    )
    assert "a (1 CPUs, 1g memory)" in str(refused.value)
    assert [n for n, c in engine.containers.items() if c["state"] == "running"] == ["a"]


async def test_a_created_container_whose_creator_died_counts_its_start_may_still_land(
    tmp_path,
):
    engine = Engine()
    engine.add("late", 1, 1 << 30, creator=DEAD)
    engine.add("new", 1, 1 << 30)
    with pytest.raises(AggregateRefused, match="late"):
        await gate(tmp_path, engine, "new")
    engine.containers["late"]["creator"] = LIVE  # a live creator's start passes the lock
    assert await gate(tmp_path, engine, "new") == "new"


async def test_a_start_that_fits_runs_and_one_without_a_cap_takes_no_lock(tmp_path):
    engine = Engine()
    engine.add("a", 0.5, 1 << 30, state="running")
    engine.add("b", 1, 1 << 30)
    assert await gate(tmp_path, engine, "b") == "b"
    async with user_lock(tmp_path, "alice"):  # held: a start without a cap does not wait
        started = await start_within_caps(
            tmp_path, "alice", None, engine, engine.records, ("c", "c"), lambda: engine.start("b")
        )
    assert started == "b"


async def test_a_lock_held_too_long_is_a_named_error(tmp_path):
    engine = Engine()
    engine.add("a", 1, 1 << 30)
    async with user_lock(tmp_path, "alice"):
        with pytest.raises(UserLockTimeout, match="another start of alice's containers"):
            await gate(tmp_path, engine, "a", timeout=0.1)
    assert await gate(tmp_path, engine, "a") == "a"  # released with its holder


async def test_each_user_has_a_lock_of_their_own_and_no_name_leaves_the_folder(tmp_path):
    engine = Engine()
    engine.add("a", 1, 1 << 30)
    async with user_lock(tmp_path, "../bob"):
        assert await gate(tmp_path, engine, "a") == "a"
    assert [p.name for p in (tmp_path / "aggregate").iterdir()] != []
    assert all(p.parent == tmp_path / "aggregate" for p in (tmp_path / "aggregate").iterdir())


@pytest.mark.parametrize(
    ("state", "creator_alive", "counts"),
    [
        ("running", True, True),
        ("paused", None, True),
        ("restarting", False, True),
        ("created", True, False),
        ("created", False, True),
        ("created", None, True),
        ("exited", False, False),
        ("dead", None, False),
    ],
)
def test_which_containers_count(state, creator_alive, counts):
    assert counts_toward_caps(state, creator_alive) is counts


# -- the arithmetic, as properties -------------------------------------------------------------

NANOS = st.integers(1, 8_000_000_000)  # up to 8 CPUs, in Docker's nano-CPUs
BYTES = st.integers(4 << 20, 64 << 30)
USE = st.tuples(st.none() | NANOS, st.none() | BYTES, st.none() | st.integers(1, 5000))


def _use(index: int, values: tuple) -> ContainerUse:
    nanos, memory, pids = values
    return ContainerUse(f"c{index}", None if nanos is None else nanos / 1e9, memory, pids)


@st.composite
def caps(draw):
    return AggregateLimits(
        cpus=draw(st.none() | NANOS.map(lambda n: n / 1e9)),
        memory=draw(st.none() | BYTES),
        pids=draw(st.none() | st.integers(1, 20000)),
    )


def _fits(cap: AggregateLimits, uses: list[tuple]) -> bool:
    """The oracle, in exact integers: every capped resource limited on each, sum within."""
    for index, limit in enumerate((cap.cpus, cap.memory, cap.pids)):
        if limit is None:
            continue
        values = [use[index] for use in uses]
        if None in values:
            return False
        exact = round(limit * 1e9) if index == 0 else limit
        if sum(values) > exact:
            return False
    return True


@settings(max_examples=300, deadline=None)
@given(caps(), st.lists(USE, max_size=8))
def test_starts_admitted_one_by_one_never_exceed_the_caps_and_refusals_are_needed(cap, wanted):
    """Containers arriving one at a time, each admitted when the check says so: the admitted
    ones fit the caps (in exact integers, whatever floats the check used), and every refused
    one would have broken them."""
    admitted: list[tuple] = []
    for index, values in enumerate(wanted):
        running = [_use(i, v) for i, v in enumerate(admitted)]
        refusal = aggregate_refusal("alice", cap, running, _use(len(admitted), values))
        assert (refusal is None) == _fits(cap, [*admitted, values]), (index, refusal)
        if refusal is None:
            admitted.append(values)
        else:
            assert refusal.startswith("over the aggregate limits of alice")
    assert _fits(cap, admitted)


@settings(max_examples=150, deadline=None)
@given(caps(), st.lists(USE, min_size=1, max_size=5), USE)
def test_the_verdict_depends_on_the_set_of_running_containers_not_their_order(cap, running, new):
    verdicts = {
        aggregate_refusal("alice", cap, [_use(i, v) for i, v in order], _use(9, new)) is None
        for order in permutations(list(enumerate(running)))
    }
    assert len(verdicts) == 1


def test_fractions_of_a_cpu_add_up_exactly():
    cap = AggregateLimits(cpus=0.3)
    running = [ContainerUse("a", 0.1, None, None)]
    assert aggregate_refusal("alice", cap, running, ContainerUse("b", 0.2, None, None)) is None
