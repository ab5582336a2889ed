"""The pure allocation decision, on slots discovered through the NVML backend (simulated)."""

from datetime import UTC, datetime, timedelta

import pytest

from ds01hub.gpu.decision import GpuRequest, Holding, decide
from ds01hub.gpu.inventory import discover
from ds01hub.gpu.simulated_nvml import SimulatedNvml
from ds01hub.limits import SimulatedGpuSpec, parse_limits

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def slots():
    """GPUs 0 and 1 whole, GPU 2 split into three 2g.20gb MIG instances (2:0, 2:1, 2:2)."""
    nvml = SimulatedNvml(
        [SimulatedGpuSpec(), SimulatedGpuSpec(), SimulatedGpuSpec(mig=("2g.20gb",) * 3)]
    )
    return discover(nvml, simulated=True).slots


def limits_for(user="u", **defaults):
    defaults.setdefault("max_gpus", 4)
    defaults.setdefault("max_gpus_per_container", 4)
    return parse_limits({"defaults": defaults}).resolve(user)


def held(slot, user="other", state="running", priority=10, until=None, container=None):
    return Holding(slot, user, container or f"c-{user}-{slot}", state, priority, until)


def ask(user="u", container="c", count=1, **kw):
    return GpuRequest(user=user, container=container, count=count, **kw)


def test_spread_takes_the_least_allocated_gpu_first(slots):
    lim = limits_for()
    assert decide(ask(), slots, [], lim, now=NOW).granted == ("0",)
    assert decide(ask(), slots, [held("0")], lim, now=NOW).granted == ("1",)
    # GPU 2 with one of three MIG slots taken (1/3) loses to an idle GPU...
    busy = [held("0"), held("2:0")]
    assert decide(ask(), slots, busy, lim, now=NOW).granted == ("1",)
    # ...and wins over a fully used one.
    assert decide(ask(), slots, busy + [held("1")], lim, now=NOW).granted == ("2:1",)


def test_spread_spreads_one_multi_slot_request_over_gpus(slots):
    decision = decide(ask(count=3), slots, [], limits_for(), now=NOW)
    assert decision.granted == ("0", "1", "2:0")


def test_pack_fills_the_most_allocated_gpu_first(slots):
    decision = decide(ask(), slots, [held("2:0")], limits_for(), strategy="pack", now=NOW)
    assert decision.granted == ("2:1",)
    two = decide(ask(count=2), slots, [], limits_for(), strategy="pack", now=NOW)
    assert two.granted[0] == "0" and len(set(two.granted)) == 2


def test_mig_profile_requests_get_mig_instances_only(slots):
    decision = decide(ask(count=0, mig_profile="2g.20gb"), slots, [], limits_for(), now=NOW)
    assert decision.granted == ("2:0",)
    missing = decide(ask(mig_profile="1g.10gb"), slots, [], limits_for(), now=NOW)
    assert missing.code == "not_available"
    assert "1g.10gb" in missing.reason and "2g.20gb" in missing.reason


def test_whole_gpu_requests_and_allow_full_gpu(slots):
    all_whole_busy = [held("0"), held("1")]
    whole = decide(ask(whole_gpu=True), slots, all_whole_busy, limits_for(), now=NOW)
    assert whole.code == "busy"  # MIG instances are free but not what was asked
    mig_only = limits_for(allow_full_gpu=False)
    assert decide(ask(), slots, [], mig_only, now=NOW).granted == ("2:0",)
    refused = decide(ask(whole_gpu=True), slots, [], mig_only, now=NOW)
    assert refused.code == "not_available" and "allow_full_gpu" in refused.reason


def test_per_container_limit(slots):
    decision = decide(ask(count=2), slots, [], limits_for(max_gpus_per_container=1), now=NOW)
    assert decision.code == "per_container_limit" and "1 per container" in decision.reason
    # max_gpus caps a single container too
    capped = decide(ask(count=3), slots, [], limits_for(max_gpus=2, max_gpus_per_container=None))
    assert capped.code == "per_container_limit"


def test_user_limit_counts_all_their_containers_and_names_them(slots):
    mine = [
        held("0", user="u", container="a._.u"),
        held("2:1", user="u", container="b._.u", state="stopped", until=NOW + timedelta(hours=2)),
    ]
    decision = decide(ask(container="c._.u"), slots, mine, limits_for(max_gpus=2), now=NOW)
    assert decision.code == "user_limit"
    assert "holds 2 of max 2" in decision.reason
    assert "a._.u" in decision.reason and "b._.u" in decision.reason
    assert "held until 2026-03-01 14:00 UTC" in decision.reason
    unlimited = decide(ask(container="c._.u"), slots, mine, limits_for(max_gpus=None), now=NOW)
    assert unlimited.granted == ("1",)


def test_a_restarting_container_gets_its_own_held_slots_back_first(slots):
    mine = [held("2:2", user="u", container="c", state="stopped", until=NOW + timedelta(hours=1))]
    decision = decide(ask(container="c"), slots, mine, limits_for(max_gpus=1), now=NOW)
    assert decision.ok and decision.granted == ("2:2",)


def test_an_expired_hold_frees_the_slot(slots):
    holdings = [held(s, state="stopped", until=NOW - timedelta(seconds=1)) for s in ("0", "1")]
    holdings += [held(s) for s in ("2:0", "2:1", "2:2")]
    decision = decide(ask(), slots, holdings, limits_for(), now=NOW)
    assert decision.granted == ("0",) and decision.reclaimed == ()


def _full(state_of_0="stopped", priority_of_0=10, until_of_0=None):
    until_of_0 = until_of_0 or NOW + timedelta(hours=5)
    return [
        held("0", user="low", state=state_of_0, priority=priority_of_0, until=until_of_0),
        held("1", user="mid", priority=50),
        held("2:0", user="r1", priority=10),
        held("2:1", user="r2", priority=10),
        held("2:2", user="r3", state="reserved", priority=1, until=NOW + timedelta(minutes=1)),
    ]


def test_higher_priority_reclaims_a_slot_a_lower_priority_only_holds(slots):
    decision = decide(ask(user="boss"), slots, _full(), limits_for("boss", priority=90), now=NOW)
    assert decision.ok and decision.granted == ("0",)
    (taken,) = decision.reclaimed
    assert (taken.user, taken.slot_id, taken.state) == ("low", "0", "stopped")


def test_running_containers_and_reservations_are_never_reclaimed_by_default(slots):
    everything_running = _full(state_of_0="running")
    decision = decide(ask(user="boss"), slots, everything_running, limits_for("boss", priority=90))
    assert decision.code == "busy"
    assert "never preempted" in decision.reason
    preempt = decide(
        ask(user="boss"),
        slots,
        everything_running,
        limits_for("boss", priority=90),
        now=NOW,
        preempt_running=True,
    )
    assert preempt.granted == ("0",) and preempt.reclaimed[0].user == "low"
    assert "2:2" not in preempt.granted


def test_equal_or_lower_priority_cannot_reclaim(slots):
    decision = decide(ask(user="peer"), slots, _full(), limits_for("peer", priority=10), now=NOW)
    assert decision.code == "busy" and decision.reclaimed == ()


def test_reclaim_prefers_the_lowest_priority_then_the_earliest_expiry(slots):
    holdings = [
        held("0", user="a", state="stopped", priority=20, until=NOW + timedelta(hours=1)),
        held("1", user="b", state="stopped", priority=5, until=NOW + timedelta(hours=9)),
        held("2:0", user="c", state="stopped", priority=5, until=NOW + timedelta(hours=3)),
        held("2:1", user="d"),
        held("2:2", user="e"),
    ]
    decision = decide(ask(user="boss"), slots, holdings, limits_for("boss", priority=90))
    assert decision.granted == ("2:0",)


def test_refusal_names_who_holds_what_and_the_earliest_expiry(slots):
    decision = decide(ask(user="peer"), slots, _full(), limits_for("peer", priority=10), now=NOW)
    assert decision.earliest_expiry == NOW + timedelta(minutes=1)
    for text in ("slot 0: low", "slot 1: mid", "slot 2:2: r3", "reserved", "stopped"):
        assert text in decision.reason
    assert "Earliest hold expiry: 2026-03-01 12:01 UTC (slot 2:2, r3)" in decision.reason
    assert not decision.ok and decision.to_dict()["code"] == "busy"


def test_no_gpu_asked_is_granted_nothing_and_bad_counts_are_refused(slots):
    assert decide(ask(count=0), slots, [], limits_for()).granted == ()
    assert decide(ask(count=0), slots, [], limits_for()).ok
    assert decide(ask(count=-1), slots, [], limits_for()).code == "bad_request"
    with pytest.raises(ValueError, match="strategy"):
        decide(ask(), slots, [], limits_for(), strategy="random")


def test_more_than_the_machine_has(slots):
    decision = decide(ask(count=4, whole_gpu=True), slots, [], limits_for())
    assert decision.code == "not_available" and "has 2 slot(s)" in decision.reason
