"""Limits from JupyterHub group properties (issue 17): validated by the YAML's readers with the
YAML's messages, a bad property refused whole, and the precedence user_overrides > group
properties > YAML groups > defaults."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ds01hub.hub.group_limits import GroupLimits, hub_group_limits
from ds01hub.limits import LimitsError, parse_group_properties, parse_limits

CONFIG = parse_limits(
    {
        "defaults": {"max_gpus": 1, "memory": "16g", "max_cpus": 4},
        "groups": {"students": {"members": ["alice"], "memory": "32g", "priority": 20}},
        "user_overrides": {"alice": {"max_cpus": 8}},
    }
)
NOW = datetime(2027, 1, 1, tzinfo=UTC)


def test_group_properties_sit_between_the_overrides_and_the_yaml_groups():
    [layer] = hub_group_limits(
        [("students", {"ds01": {"max_gpus": 2, "memory": "64g", "max_cpus": 32}})]
    )
    alice = CONFIG.resolve("alice", ["students"], now=NOW, hub_groups=[layer])
    assert (alice.max_gpus, alice.memory, alice.max_cpus) == (2, 64 << 30, 8)
    assert alice.sources["max_gpus"] == "hub_groups.students"
    assert alice.sources["memory"] == "hub_groups.students"
    assert alice.sources["max_cpus"] == "user_overrides.alice"
    assert alice.sources["priority"] == "groups.students"  # the YAML group still under it
    assert "JupyterHub group students's properties over it" in alice.group_reason
    rows = {label: source for label, _, source in alice.source_rows()}
    assert rows["Memory"] == "hub_groups.students"


def test_a_hub_only_group_and_the_highest_priority_of_several():
    layers = hub_group_limits(
        [
            ("zeta", {"ds01": {"max_gpus": 5, "priority": 30}}),
            ("gpu-lab", {"ds01": {"max_gpus": 3, "priority": 60}}),
            ("other", {"colour": "blue"}),  # no ds01 key: not a source of limits
        ]
    )
    assert [layer.name for layer in layers] == ["gpu-lab", "zeta"]
    bob = CONFIG.resolve("bob", ["gpu-lab", "zeta"], now=NOW, hub_groups=layers)
    assert bob.group == "gpu-lab" and bob.max_gpus == 3 and bob.priority == 60
    assert bob.memory == 16 << 30 and bob.sources["memory"] == "defaults"


def test_expiring_group_properties_stop_applying_after_their_date():
    [layer] = hub_group_limits([("course", {"ds01": {"max_gpus": 4, "expires": "2027-01-31"}})])
    before = CONFIG.resolve(
        "bob", ["course"], now=datetime(2027, 1, 30, tzinfo=UTC), hub_groups=[layer]
    )
    assert before.max_gpus == 4 and before.notices()
    after = CONFIG.resolve(
        "bob", ["course"], now=datetime(2027, 2, 1, tzinfo=UTC), hub_groups=[layer]
    )
    assert after.max_gpus == 1 and [e.source for e in after.expired] == ["hub_groups.course"]


def test_a_bad_property_is_refused_whole_with_the_yaml_message():
    properties = {"ds01": {"max_gpus": 2, "memory": "1k", "shm_sise": "1g"}}
    with pytest.raises(LimitsError) as caught:
        parse_group_properties("students", properties)
    error = caught.value
    yaml_error = pytest.raises(LimitsError, parse_limits, {"defaults": {"memory": "1k"}}).value
    [yaml_memory] = yaml_error.problems
    memory, unknown = error.problems
    assert (memory.message, memory.fix) == (yaml_memory.message, yaml_memory.fix)
    assert memory.file == "JupyterHub group 'students' properties"
    assert memory.key_path == "ds01.memory" and unknown.key_path == "ds01.shm_sise"
    assert "did you mean 'shm_size'?" in unknown.fix
    assert error.summary() == "2 problems in JupyterHub group 'students' properties"
    # never half-applied: the user's groups give one error, not a layer with max_gpus: 2
    with pytest.raises(LimitsError):
        hub_group_limits([("students", properties), ("fine", {"ds01": {"max_gpus": 1}})])
    groups = GroupLimits(problems={"students": error.problems})
    assert groups.for_groups(["fine-only"]) == []
    with pytest.raises(LimitsError):
        groups.for_groups(["students"])


@pytest.mark.parametrize(
    "section",
    [[], "64g", 7, {"ds01": 1}, {"expires": "soon"}, {"reason": ["x"]}, {1: 2}],
)
def test_any_shape_gets_a_named_problem(section):
    with pytest.raises(LimitsError) as caught:
        parse_group_properties("g", {"ds01": section})
    assert all(p.file == "JupyterHub group 'g' properties" for p in caught.value.problems)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
        ),
        max_leaves=20,
    )
)
def test_property_any_json_is_a_layer_or_a_limits_error(value):
    try:
        layer = parse_group_properties("g", {"ds01": value})
    except LimitsError as error:
        assert error.problems
        return
    assert layer is not None
    CONFIG.resolve("u", ["g"], now=NOW, hub_groups=[layer])  # and it resolves


def test_the_culler_and_the_admin_page_use_the_groups_the_hub_reported(tmp_path):
    from ds01hub import provenance
    from ds01hub.services.ops.admin_page import overview, render_page
    from ds01hub.services.ops.culler import Culler

    config = parse_limits({"defaults": {"idle_timeout": "1h"}})
    culler = Culler(None, None, None, config, state_dir=tmp_path, trust=provenance.load(tmp_path))
    bad = pytest.raises(LimitsError, parse_group_properties, "broken", {"ds01": {"memory": 0}})
    culler.group_limits = GroupLimits(
        layers={"night": parse_group_properties("night", {"ds01": {"idle_timeout": "8h"}})},
        problems={"broken": bad.value.problems},
    )
    assert culler.policy_for("u", ["night"]).idle_timeout == 8 * 3600
    assert culler.policy_for("u", ["broken"]).idle_timeout == 3600  # the file's, not half of it
    from types import SimpleNamespace

    inventory = SimpleNamespace(simulated=False, reason=None, slots=[])
    model = overview([], inventory, None, NOW, group_problems={"broken": bad.value.problems})
    page = render_page(model)
    assert "JupyterHub group broken: its ds01 properties are refused" in page
    assert "ds01.memory: invalid memory: 0 means no limit to Docker" in page
