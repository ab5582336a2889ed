"""What people are told about GPUs (ds01hub.gpu.messages), built from real allocator decisions
on simulated slots: the headline says the facts of the decision, the details name holders and
configuration keys, and a message survives the trip through another process's event."""

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ds01hub.gpu import messages
from ds01hub.gpu.decision import Decision, GpuRequest, Holding, decide
from ds01hub.gpu.inventory import discover
from ds01hub.gpu.messages import Message, MessageError, Situation
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


def held(slot, user="other", state="running", until=None):
    return Holding(slot, user, f"c._.{user}", state, 10, until)


def test_a_wait_says_the_place_in_line_and_what_is_free_instead(slots):
    request = GpuRequest("u", "c._.u", count=1, whole_gpu=True)
    limits = limits_for()
    holdings = [held("0", "alice"), held("1", "bob", "stopped", NOW + timedelta(hours=1))]
    decision = decide(request, slots, holdings, limits, now=NOW)
    assert decision.code == "busy"
    deadline = NOW + timedelta(minutes=10)
    situation = Situation(
        request, decision, slots, limits, position=2, waiting=3, deadline=deadline, timeout=600
    )
    message = messages.wait_message(situation, NOW)
    assert message.headline == (
        "You are 2nd in line for a whole GPU; 3 MIG 2g.20gb slices are free now."
    )
    assert message.kind == "wait" and not message.refused
    assert message.countdown(NOW + timedelta(seconds=20)) == "gives up in 9m40s (at 12:10 UTC)"
    details = "\n".join(message.details)
    assert "slot 0: alice" in details and "slot 1: bob" in details
    assert "position 2 of 3" in details and "c.DS01Spawner.gpu_wait_timeout" in details
    assert message.text().splitlines()[0] == message.headline
    assert "details:" in message.text()


def test_a_wait_without_alternatives_names_when_a_hold_ends(slots):
    request = GpuRequest("u", "c._.u", count=1, mig_profile="2g.20gb")
    until = NOW + timedelta(minutes=30)
    holdings = [held("2:0", "a"), held("2:1", "b"), held("2:2", "c", "stopped", until)]
    holdings += [held("0", "d"), held("1", "e")]
    limits = limits_for()
    decision = decide(request, slots, holdings, limits, now=NOW)
    message = messages.wait_message(Situation(request, decision, slots, limits), NOW)
    assert message.headline == (
        "You are next in line for a MIG 2g.20gb slice; all 3 are in use; "
        "the first hold ends at 12:30 UTC at the latest."
    )
    assert message.deadline is None and message.countdown(NOW) == ""


def test_only_alternatives_the_user_may_use_are_offered(slots):
    request = GpuRequest("u", "c._.u", count=1, mig_profile="2g.20gb")
    holdings = [held("2:0"), held("2:1"), held("2:2")]
    limits = limits_for(allow_full_gpu=False)
    decision = decide(request, slots, holdings, limits, now=NOW)
    message = messages.wait_message(Situation(request, decision, slots, limits), NOW)
    assert "free now" not in message.headline  # whole GPUs are free, but not for this user


def test_a_quota_refusal_names_the_limit_and_where_it_was_set(slots):
    request = GpuRequest("u", "new._.u", count=1)
    limits = limits_for(max_gpus=1)
    decision = decide(request, slots, [held("0", "u")], limits, now=NOW)
    message = messages.refusal_message(Situation(request, decision, slots, limits))
    assert message.refused and message.code == "user_limit"
    assert message.headline == "You already hold 1 of your 1 GPU, so you cannot have another."
    assert any(line.startswith("max_gpus: 1 (from") for line in message.details)
    assert any("slot 0: u" in line for line in message.details)


def test_a_timeout_says_what_was_free_all_along(slots):
    request = GpuRequest("u", "c._.u", count=1, whole_gpu=True)
    limits = limits_for()
    decision = decide(request, slots, [held("0"), held("1")], limits, now=NOW)
    situation = Situation(request, decision, slots, limits, simulated=True, timeout=600)
    message = messages.timeout_message(situation)
    assert message.headline == (
        "A whole GPU (SIMULATED) did not become free within 10m, "
        "but 3 MIG 2g.20gb slices are free now."
    )
    assert message.code == "gpu_wait"


def test_a_missing_mig_profile_lists_the_ones_here(slots):
    request = GpuRequest("u", "c._.u", count=1, mig_profile="1g.10gb")
    limits = limits_for()
    decision = decide(request, slots, [], limits, now=NOW)
    message = messages.refusal_message(Situation(request, decision, slots, limits))
    assert message.headline == "This machine has no MIG 1g.10gb slices."
    assert message.action == "Choose one it has (2g.20gb)."


def test_html_escapes_everything_and_links_back():
    message = Message(
        "refused", "busy", "<b>x</b>", "do <this>", ("held: <script>",), NOW, None, None
    )
    page = message.html("/hub/spawn/u/?a=<1>")
    assert "<b>x</b>" not in page and "&lt;script&gt;" in page
    assert 'href="/hub/spawn/u/?a=&lt;1&gt;"' in page
    assert "<details" in page and 'data-ds01-deadline="2026-03-01T12:00:00+00:00"' in page


def test_gpu_use_reads_as_people_say_it():
    assert messages.gpu_use([("0", "NVIDIA A100")], 2) == "1 of 2 GPUs in use (slot 0: NVIDIA A100)"
    assert messages.gpu_use([], 1) == "0 of 1 GPU in use"
    assert messages.gpu_use([("0", "A"), ("1", "B")], None) == (
        "2 GPUs in use of unlimited (slot 0: A; slot 1: B)"
    )


@pytest.mark.parametrize(("n", "text"), [(1, "next"), (2, "2nd"), (3, "3rd"), (11, "11th")])
def test_ordinal(n, text):
    assert messages.ordinal(n) == text


def test_an_event_carries_a_message_between_processes():
    message = messages.lost_message("slot 0 is held by bob", 3)
    event = {"progress": 35, messages.EVENT_KEY: message.to_dict()}
    assert Message.from_event(event) == message
    assert Message.from_event({"progress": 1}) is None
    assert Message.from_event({messages.EVENT_KEY: {"kind": "nope"}}) is None


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ([], "an object"),
        ({"kind": "wait", "code": "busy"}, "headline"),
        ({"kind": "wait", "code": "busy", "headline": "h", "deadline": "soon"}, "deadline"),
        ({"kind": "wait", "code": "busy", "headline": "h", "position": -1}, "position"),
        ({"kind": "wait", "code": "busy", "headline": "h", "details": "x"}, "details"),
        ({"kind": "wait", "code": "busy", "headline": "x" * 5000}, "headline"),
    ],
)
def test_a_bad_message_names_its_field(data, named):
    with pytest.raises(MessageError, match=named):
        Message.from_dict(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


@given(
    st.fixed_dictionaries(
        {"kind": st.sampled_from(["wait", "refused"]), "code": st.text(max_size=10)},
        optional={
            "headline": json_values,
            "details": json_values,
            "deadline": json_values,
            "position": json_values,
            "waiting": json_values,
        },
    )
)
def test_any_event_data_is_a_message_or_a_named_error(data):
    try:
        message = Message.from_dict(data)
    except MessageError:
        return
    assert Message.from_dict(message.to_dict()) == message


def test_a_decision_round_trips_its_facts(slots):
    decision = Decision(code="busy", reason="r", holders=(held("0"),), free=("1",))
    assert decision.to_dict()["holders"][0]["slot"] == "0"
    assert decision.to_dict()["free"] == ["1"]
