"""GPU equivalents (`max_gpu_equivalents`, issue 17): a whole GPU is 1, a MIG instance its
share of its GPU's compute slices (7 on an A100 or H100, 4 on an A30, from NVML's MIG
profile info); the quota is enforced by the pure decision, on slots
discovered through the (simulated) NVML backend."""

from datetime import UTC, datetime
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ds01hub.gpu.decision import GpuRequest, Holding, decide
from ds01hub.gpu.inventory import discover
from ds01hub.gpu.simulated_nvml import SimulatedNvml
from ds01hub.limits import LimitsError, SimulatedGpuSpec, parse_limits
from ds01hub.mig import format_share, gpu_share

NOW = datetime(2027, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def slots():
    """GPUs 0 and 1 whole; GPU 2 as 3 x 2g.20gb (2:0..2:2); GPU 3 as 7 x 1g.10gb (3:0..3:6)."""
    nvml = SimulatedNvml(
        [
            SimulatedGpuSpec(),
            SimulatedGpuSpec(),
            SimulatedGpuSpec(mig=("2g.20gb",) * 3),
            SimulatedGpuSpec(mig=("1g.10gb",) * 7),
        ]
    )
    return discover(nvml, simulated=True).slots


def limits(equivalents, **more):
    more.setdefault("max_gpus", None)
    return parse_limits({"defaults": {"max_gpu_equivalents": equivalents, **more}}).resolve("u")


def held(slot, container="other-container", user="u"):
    return Holding(slot, user, container, "running", 10)


def ask(count=0, **kw):
    return GpuRequest(user="u", container="c", count=count, **kw)


def test_shares_of_whole_gpus_and_mig_instances():
    assert gpu_share(None) == 1
    assert gpu_share("2g.20gb") == Fraction(2, 7)
    assert gpu_share("7g.80gb") == 1 and gpu_share("1g.10gb+me") == Fraction(1, 7)
    assert gpu_share("not-a-profile") == 1  # never undercounted
    assert format_share(Fraction(2, 7)) == "0.29 (2/7)" and format_share(Fraction(3, 2)) == "1.5"


def test_mig_instances_count_their_share_against_the_quota(slots):
    lim = limits(1)
    # two 2g.20gb (4/7) held elsewhere: another 2g fits (6/7), a whole GPU does not
    mine = [held("2:0", "a"), held("2:1", "b")]
    assert decide(ask(mig_profile="2g.20gb"), slots, mine, lim, now=NOW).granted == ("2:2",)
    refused = decide(ask(count=1, whole_gpu=True), slots, mine, lim, now=NOW)
    assert refused.code == "equivalents_limit"
    assert "holds 0.57 (4/7) of max 1 GPU equivalents" in refused.reason
    assert "2:0" in refused.reason and "2g.20gb = 2/7" in refused.reason
    # a plain count is placed on a slot that still fits: a 1g or 2g instance, not a whole GPU
    granted = decide(ask(count=1), slots, mine, lim, now=NOW).granted
    assert len(granted) == 1 and ":" in granted[0]
    assert gpu_share(next(s.profile for s in slots if s.id == granted[0])) <= Fraction(3, 7)


def test_equivalents_counted_across_mig_and_whole_gpus(slots):
    lim = limits(1.5)
    mine = [held("0", "whole"), held("3:0", "small"), held("3:1", "small")]  # 1 + 2/7
    assert decide(ask(mig_profile="1g.10gb"), slots, mine, lim, now=NOW).ok  # 10/7 <= 1.5
    over = decide(ask(mig_profile="2g.20gb"), slots, mine, lim, now=NOW)  # 11/7 > 1.5
    assert over.code == "equivalents_limit" and "asked for 0.29 (2/7) more" in over.reason
    two = decide(ask(count=2, mig_profile="1g.10gb"), slots, mine, lim, now=NOW)
    assert two.code == "equivalents_limit"  # 2/7 more would be 11/7
    # the container's own holdings are not counted against it (a restart within its hold)
    restart = [held("0", "c"), held("3:0", "small")]
    assert decide(ask(count=1, whole_gpu=True), slots, restart, lim, now=NOW).granted == ("0",)


def test_a_multi_slot_request_is_checked_on_its_sum(slots):
    decision = decide(ask(count=2, whole_gpu=True), slots, [], limits(1.5), now=NOW)
    assert decision.code == "equivalents_limit" and "asked for 2 more" in decision.reason
    assert decide(ask(count=2, whole_gpu=True), slots, [], limits(2), now=NOW).ok


def test_beside_max_gpus_the_tighter_one_refuses(slots):
    lim = limits(3, max_gpus=2)
    mine = [held("3:0", "a"), held("3:1", "b")]  # 2 slots, 2/7 equivalents
    assert decide(ask(mig_profile="1g.10gb"), slots, mine, lim, now=NOW).code == "user_limit"
    assert decide(ask(mig_profile="1g.10gb"), slots, mine, limits(3), now=NOW).ok


def test_a_profile_the_machine_lacks_is_named_as_such_not_as_the_quota(slots):
    decision = decide(ask(mig_profile="3g.40gb"), slots, [held("0", "a")], limits(1), now=NOW)
    assert decision.code == "not_available" and "3g.40gb" in decision.reason


@pytest.mark.parametrize(
    ("value", "message"),
    [(-1, "outside 0..1024"), ("two", "not a number"), (float("inf"), "not a finite"), (2e3, "")],
)
def test_a_bad_quota_is_refused_with_its_fix(value, message):
    with pytest.raises(LimitsError) as caught:
        limits(value)
    [problem] = caught.value.problems
    assert problem.key_path == "defaults.max_gpu_equivalents" and message in problem.message
    assert "such as 1.5" in problem.fix


def test_ds01_spellings_are_accepted():
    config = parse_limits({"defaults": {"gpu_equivalents": 2, "max_mig_per_container": 3}}).resolve(
        "u"
    )
    assert config.max_gpu_equivalents == 2 and config.max_gpus_per_container == 3


@settings(max_examples=200, deadline=None)
@given(
    cap=st.integers(0, 40).map(lambda n: n / 4),
    held_ids=st.sets(st.sampled_from(["0", "1", "2:0", "2:1", "2:2", "3:0", "3:3", "3:6"])),
    profile=st.sampled_from([None, "1g.10gb", "2g.20gb"]),
    count=st.integers(1, 3),
)
def test_property_a_grant_never_takes_the_user_past_the_quota(slots, cap, held_ids, profile, count):
    lim = limits(cap)
    mine = [held(slot_id, f"c{slot_id}") for slot_id in held_ids]
    decision = decide(ask(count=count, mig_profile=profile), slots, mine, lim, now=NOW)
    share = {s.id: gpu_share(s.profile) for s in slots}
    used = sum((share[i] for i in held_ids), Fraction(0))
    if decision.ok:
        assert used + sum(share[i] for i in decision.granted) <= Fraction(str(cap))
    else:
        assert decision.code in {"equivalents_limit", "not_available", "busy"}


# -- GPUs of other slice counts: A30 (4 compute slices) beside A100 (7) -------------------------

A100 = "NVIDIA A100-SXM4-80GB"
A30 = "NVIDIA A30"


@pytest.fixture(scope="module")
def mixed():
    """GPU 0: A100 as 7 x 1g.10gb (0:0..0:6); GPU 1: A30 as 4 x 1g.6gb (1:0..1:3); GPU 2: A30
    as 2 x 2g.12gb (2:0, 2:1); GPU 3: a whole A30."""
    nvml = SimulatedNvml(
        [
            SimulatedGpuSpec(A100, 81920, ("1g.10gb",) * 7),
            SimulatedGpuSpec(A30, 24576, ("1g.6gb",) * 4),
            SimulatedGpuSpec(A30, 24576, ("2g.12gb",) * 2),
            SimulatedGpuSpec(A30, 24576),
        ]
    )
    return discover(nvml, simulated=True)


def test_the_slice_count_comes_from_nvmls_mig_profile_info(mixed):
    assert [gpu.compute_slices for gpu in mixed.gpus] == [7, 4, 4, 7]  # GPU 3: MIG off
    by_id = {slot.id: slot for slot in mixed.slots}
    assert by_id["0:6"].compute_slices == 7 and by_id["1:3"].compute_slices == 4
    assert gpu_share("1g.6gb", 4) == Fraction(1, 4) and gpu_share("2g.12gb", 4) == Fraction(1, 2)
    assert gpu_share("4g.24gb", 4) == 1 and gpu_share("7g.80gb", 4) == 1  # never above 1


class _NoProfileInfo(SimulatedNvml):
    """An NVML without MIG profile info (an old driver): every profile is NotSupported."""

    def nvmlDeviceGetGpuInstanceProfileInfo(self, handle, profile, version=None):  # noqa: N802
        raise self.NVMLError_NotSupported()


def test_without_nvmls_profile_info_the_model_name_decides():
    nvml = _NoProfileInfo(
        [
            SimulatedGpuSpec(A30, 24576, ("1g.6gb",) * 4),
            SimulatedGpuSpec("NVIDIA H200", 144384, ("1g.18gb",) * 7),
        ]
    )
    assert [gpu.compute_slices for gpu in discover(nvml, simulated=True).gpus] == [4, 7]


def test_equivalents_counted_across_a30_and_a100_instances(mixed):
    lim = limits(1)
    mine = [held("1:0", "a"), held("1:1", "b")]  # 2 x 1g.6gb of an A30 = 1/2
    assert decide(ask(mig_profile="2g.12gb"), mixed.slots, mine, lim, now=NOW).ok  # 1/2 more = 1
    more = [*mine, held("2:0", "d")]  # 1 already
    over = decide(ask(mig_profile="1g.10gb"), mixed.slots, more, lim, now=NOW)
    assert over.code == "equivalents_limit"
    assert "holds 1 of max 1" in over.reason and "asked for 0.14 (1/7) more" in over.reason
    assert "on a 4-slice A30 2g.12gb = 1/2" in over.reason
    # the same 1g.10gb fits beside two A100 1g instances: 2/7 + 1/7
    a100 = [held("0:0", "a"), held("0:1", "b")]
    assert decide(ask(mig_profile="1g.10gb"), mixed.slots, a100, lim, now=NOW).ok
    # an A30 1g.6gb is 1/4, not 1/7: three of them and a 2g.12gb do not fit 1
    three = [held(f"1:{i}", f"x{i}") for i in range(3)]
    assert decide(ask(mig_profile="2g.12gb"), mixed.slots, three, lim, now=NOW).code == (
        "equivalents_limit"
    )


def test_a_simulated_a30_holds_four_compute_slices_an_a100_seven():
    layout = ["2g.12gb", "2g.12gb", "1g.6gb"]
    with pytest.raises(LimitsError) as caught:
        parse_limits(
            {
                "gpu_allocation": {
                    "simulate": {"gpus": [{"name": A30, "memory": "24g", "mig": layout}]}
                }
            }
        )
    [problem] = caught.value.problems
    assert "need 5 of this GPU's 4 compute slices" in problem.message
    assert "4 x 1g.6gb" in problem.fix
    config = parse_limits(
        {"gpu_allocation": {"simulate": {"gpus": [{"name": A100, "memory": "80g", "mig": layout}]}}}
    )
    assert config.gpu_allocation.simulate.gpus[0].mig == tuple(layout)


@settings(max_examples=200, deadline=None)
@given(
    cap=st.integers(0, 16).map(lambda n: n / 4),
    held_ids=st.sets(
        st.sampled_from(["0:0", "0:1", "0:5", "1:0", "1:1", "1:2", "2:0", "2:1", "3"])
    ),
    profile=st.sampled_from([None, "1g.10gb", "1g.6gb", "2g.12gb"]),
    count=st.integers(1, 2),
)
def test_property_on_a_mix_of_a30_and_a100_the_quota_holds(mixed, cap, held_ids, profile, count):
    lim = limits(cap)
    mine = [held(slot_id, f"c{slot_id}") for slot_id in held_ids]
    decision = decide(ask(count=count, mig_profile=profile), mixed.slots, mine, lim, now=NOW)
    slices = {"0": 7, "1": 4, "2": 4}  # what the GPUs are, not what the inventory says
    share = {
        s.id: Fraction(1) if s.profile is None else Fraction(int(s.profile[0]), slices[s.id[0]])
        for s in mixed.slots
    }
    used = sum((share[i] for i in held_ids), Fraction(0))
    if decision.ok:
        assert used + sum(share[i] for i in decision.granted) <= Fraction(str(cap))
    else:
        assert decision.code in {"equivalents_limit", "not_available", "busy"}
