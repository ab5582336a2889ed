"""Fair share: decayed GPU-hours from the event log -> factor -> effective priority, used by
the GPU queue's order and the reclaim rule. A controlled clock throughout: events carry their
own timestamps and every computation gets its `now`."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime, timedelta

import pytest
from harness import wait_until_async
from hypothesis import given, settings
from hypothesis import strategies as st

from ds01hub.gpu.allocator import GpuAllocator
from ds01hub.gpu.decision import Decision, GpuRequest, Holding, decide
from ds01hub.gpu.eventlog import EventLog, Interval
from ds01hub.gpu.fairshare import FairShare, Waiting, decayed_usage, rank
from ds01hub.gpu.inventory import discover
from ds01hub.gpu.simulated_nvml import SimulatedNvml
from ds01hub.limits import FairShareConfig, LimitsError, SimulatedGpuSpec, parse_limits
from ds01hub.spawner.gpu_queue import GpuQueue

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
DAY = 86400.0
WEEK = 7 * DAY
CONFIG = FairShareConfig(half_life=WEEK, weight=10.0)


def use(log: EventLog, user: str, hours: float, ended: datetime, group: str | None = None):
    """`user` held one slot for `hours`, released at `ended` (written through the log)."""
    container = f"{user}-{ended.timestamp()}"
    start = ended - timedelta(hours=hours)
    log.record("allocate", user, slot="0", container=container, group=group, at=start)
    log.record("release", user, slot="0", container=container, group=group, at=ended)


@pytest.fixture
def log(tmp_path):
    return EventLog(tmp_path / "events.db")


def test_three_users_of_different_usage_are_ordered_least_used_first(log):
    now = T0 + timedelta(days=1)
    use(log, "heavy", 40, T0)
    use(log, "medium", 10, T0)
    use(log, "light", 1, T0)
    fair = FairShare.compute(CONFIG, log.intervals(until=now), now.timestamp())
    factors = [fair.factor(u) for u in ("light", "medium", "heavy")]
    assert factors == sorted(factors, reverse=True) and factors[0] > factors[-1]
    assert fair.factor("nobody") == 1.0  # no recent use: the whole weight
    # Equal configured priority: the waiter order follows usage, whatever the arrival order.
    waiting = [
        Waiting("h", "heavy", 10, 0),
        Waiting("m", "medium", 10, 1),
        Waiting("l", "light", 10, 2),
        Waiting("n", "newcomer", 10, 3),
    ]
    assert [w.user for w, _ in rank(waiting, fair)] == ["newcomer", "light", "medium", "heavy"]
    # A higher configured priority still wins when the weight is small beside it.
    waiting.append(Waiting("boss", "heavy", 30, 4))
    assert rank(waiting, fair)[0][0].key == "boss"


def test_usage_halves_over_one_half_life(log):
    use(log, "alice", 2, T0)
    at = [T0 + timedelta(seconds=s) for s in (0, WEEK, 2 * WEEK)]
    values = [decayed_usage(log.intervals(until=t), t.timestamp(), WEEK)["alice"] for t in at]
    # Over the interval itself usage decays a little (its start is older): just under 2 h.
    assert 1.99 < values[0] < 2.0
    assert values[1] == pytest.approx(values[0] / 2, rel=1e-9)
    assert values[2] == pytest.approx(values[0] / 4, rel=1e-9)


def test_an_open_interval_counts_up_to_now_and_grows(log):
    log.record("allocate", "bob", slot="1", container="c", at=T0)
    hour, later = T0 + timedelta(hours=1), T0 + timedelta(hours=2)
    one = FairShare.compute(CONFIG, log.intervals(until=hour), hour.timestamp())
    two = FairShare.compute(CONFIG, log.intervals(until=later), later.timestamp())
    assert two.users["bob"].usage > one.users["bob"].usage > 0.99


def test_factor_is_half_at_exactly_the_fair_share(log):
    use(log, "a", 5, T0)
    use(log, "b", 5, T0)
    fair = FairShare.compute(CONFIG, log.intervals(), T0.timestamp())
    assert fair.factor("a") == pytest.approx(0.5) and fair.factor("b") == pytest.approx(0.5)


def test_group_shares_weigh_usage(log):
    """Same usage; a group with three times the share keeps a higher factor."""
    config = FairShareConfig(half_life=WEEK, weight=10, shares={"research": 3, "students": 1})
    use(log, "r", 5, T0, group="research")
    use(log, "s", 5, T0, group="students")
    fair = FairShare.compute(config, log.intervals(), T0.timestamp())
    assert fair.users["r"].share == pytest.approx(0.75)
    assert fair.factor("r") == pytest.approx(2 ** (-0.5 / 0.75))
    assert fair.factor("s") == pytest.approx(2 ** (-0.5 / 0.25))


def test_off_means_configured_priority(log):
    use(log, "a", 5, T0)
    fair = FairShare.compute(None, log.intervals(), T0.timestamp())
    assert fair.effective("a", 10) == 10 and not fair.users


# -- the reclaim rule --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_gpu():
    return discover(SimulatedNvml([SimulatedGpuSpec()]), simulated=True).slots


def test_reclaim_uses_effective_priority(log, one_gpu):
    """Equal configured priorities: without fair share nobody takes anything; with it, the
    user who used little takes the slot a heavy user's stopped container holds."""
    use(log, "heavy", 50, T0)
    now = T0 + timedelta(hours=1)
    fair = FairShare.compute(CONFIG, log.intervals(until=now), now.timestamp())
    stopped = Holding("0", "heavy", "c-heavy", "stopped", 10, now + timedelta(hours=5))
    limits = parse_limits({}).resolve("light")
    request = GpuRequest("light", "c-light", 1)
    assert decide(request, one_gpu, [stopped], limits, now=now).code == "busy"
    decision = decide(request, one_gpu, [stopped], limits, now=now, fair=fair)
    assert decision.granted == ("0",) and decision.reclaimed == (stopped,)
    # ...but the heavy user cannot take the light user's in turn.
    light_stopped = Holding("0", "light", "c-light", "stopped", 10, now + timedelta(hours=5))
    back = GpuRequest("heavy", "c-heavy2", 1)
    refused = decide(back, one_gpu, [light_stopped], limits, now=now, fair=fair)
    assert refused.code == "busy"


# -- the queue ---------------------------------------------------------------------------------


async def test_the_queue_serves_by_effective_priority(log):
    use(log, "heavy", 30, T0)
    use(log, "light", 1, T0)
    now = T0 + timedelta(hours=1)
    free = [0]
    served: list[str] = []

    async def fair_share() -> FairShare:
        return FairShare.compute(CONFIG, log.intervals(until=now), now.timestamp())

    queue = GpuQueue(recheck_interval=60, fair_share=fair_share)

    def attempt_for(key):
        async def attempt() -> Decision:
            if free[0] <= 0:
                return Decision(reason="busy", code="busy")
            free[0] -= 1
            served.append(key)
            return Decision(granted=(key,))

        return attempt

    async def abandon(decision: Decision) -> None:
        free[0] += 1

    tasks = {
        user: asyncio.create_task(
            queue.acquire(user, 10, attempt_for(user), user=user, timeout=30, abandon=abandon)
        )
        for user in ("heavy", "light")  # heavy arrives first
    }
    await wait_until_async(lambda: len(queue) == 2, 10, message="both wait")
    await wait_until_async(lambda: queue.keys() == ["light", "heavy"], 10, message="reordered")
    free[0] = 1
    queue.notify()
    await tasks["light"]
    assert served == ["light"] and not tasks["heavy"].done()
    free[0] = 1
    queue.notify()
    await tasks["heavy"]
    assert served == ["light", "heavy"]


# -- the allocator reads the log ---------------------------------------------------------------


def test_allocator_fair_share_reads_the_log_with_its_clock(tmp_path, log):
    config = parse_limits({"gpu_allocation": {"fairshare": {"half_life": "1d", "weight": 20}}})
    clock = [T0 + timedelta(hours=1)]
    allocator = GpuAllocator(
        None,
        discover(SimulatedNvml([SimulatedGpuSpec()]), simulated=True),
        tmp_path / "state",
        log,
        lambda: clock[0],
        limits=config,
        container_lister=list,
        container_remover=lambda _id: True,
    )
    use(log, "a", 4, T0)
    use(log, "b", 1, T0)
    first = allocator.fair_share()
    assert first.weight == 20 and first.factor("a") < first.factor("b") < 1
    clock[0] += timedelta(days=1)  # one half-life later, within the interval cache or not
    later = allocator.fair_share()
    assert later.users["a"].usage == pytest.approx(first.users["a"].usage / 2, rel=1e-6)


# -- the limits file ---------------------------------------------------------------------------


def test_limits_fairshare_is_validated_with_named_problems():
    with pytest.raises(LimitsError) as caught:
        parse_limits(
            {
                "groups": {"students": {"members": ["s"]}},
                "gpu_allocation": {
                    "fairshare": {
                        "half_life": "0s",
                        "weight": -1,
                        "shares": {"studnets": 2, "students": "x"},
                        "decay": 1,
                    }
                },
            }
        )
    text = "\n".join(caught.value.lines())
    assert "gpu_allocation.fairshare.decay: unknown key" in text
    assert "fairshare.half_life: bad value: 0 or null decays nothing" in text
    assert "fairshare.weight: bad value: outside 0..1000" in text
    assert "fairshare.shares.students: bad value: not a number" in text
    assert "fairshare.shares.studnets: names no group defined under groups" in text


def test_limits_fairshare_defaults_and_values():
    assert parse_limits({}).gpu_allocation.fairshare is None
    on = parse_limits({"gpu_allocation": {"fairshare": {}}}).gpu_allocation.fairshare
    assert on == FairShareConfig()
    config = parse_limits(
        {
            "groups": {"r": {"members": ["x"]}},
            "gpu_allocation": {
                "fairshare": {"half_life": "36h", "weight": 2.5, "shares": {"r": 4}}
            },
        }
    ).gpu_allocation.fairshare
    assert config == FairShareConfig(36 * 3600.0, 2.5, {"r": 4.0})


# -- properties --------------------------------------------------------------------------------

intervals = st.lists(
    st.builds(
        lambda user, start, length: Interval(
            user,
            None,
            "0",
            f"c{start}",
            datetime.fromtimestamp(start, UTC),
            datetime.fromtimestamp(start + length, UTC),
        ),
        st.sampled_from(["a", "b", "c", "d"]),
        st.floats(0, 25 * DAY),  # all end by day 30: before any `now` below
        st.floats(0, 5 * DAY),
    ),
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(intervals, st.floats(30 * DAY, 60 * DAY), st.floats(3600, 30 * DAY))
def test_factors_are_in_range_and_fall_with_usage(found, now, half_life):
    config = FairShareConfig(half_life=half_life, weight=10)
    fair = FairShare.compute(config, found, now)
    for entry in fair.users.values():
        assert 0 <= entry.factor <= 1 and math.isfinite(entry.factor)
        assert 0 <= fair.effective(entry.user, 10) - 10 <= 10
    # Within one group (all have equal shares), more usage never gives a higher factor.
    ordered = sorted(fair.users.values(), key=lambda e: e.usage)
    factors = [e.factor for e in ordered]
    assert all(x >= y - 1e-12 for x, y in zip(factors, factors[1:], strict=False))


@settings(max_examples=200, deadline=None)
@given(intervals, st.floats(30 * DAY, 60 * DAY), st.floats(0, 10 * DAY), st.floats(3600, 30 * DAY))
def test_usage_only_decays_once_nothing_runs(found, now, later, half_life):
    before = decayed_usage(found, now, half_life)
    after = decayed_usage(found, now + later, half_life)
    for user, value in after.items():
        assert value <= before[user] * (1 + 1e-9) + 1e-12  # float noise on near-0 usage
        assert value == pytest.approx(before[user] * 2 ** (-later / half_life), rel=1e-6, abs=1e-12)
