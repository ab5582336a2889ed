"""Property: whatever the limits file holds (random bytes, random YAML-ish text, random nested
structures of random scalars, dumped or handed over as data), loading it gives a configuration
or a LimitsError with bounded problems: never another exception, never a hang (pytest-timeout
bounds each test; the generators are bounded in size)."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ds01hub.limits import LimitsConfig, LimitsError, load_limits, parse_limits
from ds01hub.strict_yaml import StrictYamlError, read_yaml

pytestmark = pytest.mark.timeout(300)

SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Names the validator knows, so random structures reach deep into it; plus some it does not.
KEYS = st.sampled_from(
    [
        "defaults", "groups", "user_overrides", "policies", "gpu_allocation", "default_group",
        "members", "description", "reason", "memory", "shm_size", "max_cpus", "cpus",
        "max_gpus", "max_mig_instances", "max_gpus_per_container", "allow_full_gpu",
        "ipc_mode", "pids_limit", "max_containers_per_user", "idle_timeout", "max_runtime",
        "gpu_hold_after_stop", "container_hold_after_stop", "priority", "allowed_images",
        "cgroup_parent", "preempt_running", "enable_mig", "mig_profile", "strategy", "simulate",
        "gpus", "seed", "mig", "count", "name", "storage_workspace", "wizard", "students",
        "alice", "h.baker@hertie-school.lan", "", "~",
    ]
)  # fmt: skip
ODD_TEXT = st.sampled_from(
    [
        "32g", "32 gb", "0", "1", "6m", "99999999t", "1e12", ".nan", "-1", "48h", "9999999d",
        "2g.20gb", "9g.1gb", "7g.80gb", "spread", "pack", "host", "least_allocated", "~", "",
        "1:30", "0x1F", "yes", "2024-13-45", "students", "alice",
    ]
)  # fmt: skip
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-3, max_value=130),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    ODD_TEXT,
)
NAMES = st.one_of(KEYS, st.text(max_size=8), st.integers(), st.none(), st.booleans())
TREES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(NAMES, children, max_size=5),
    ),
    max_leaves=40,
)
DOCUMENTS = st.one_of(TREES, st.dictionaries(KEYS, TREES, max_size=6))


def load_bytes(tmp_path, raw: bytes) -> LimitsConfig | None:
    path = tmp_path / "limits.yaml"
    path.write_bytes(raw)
    try:
        return load_limits(path)
    except LimitsError as error:
        assert error.problems
        assert all(len(str(problem)) < 2000 for problem in error.problems)
        return None


@SETTINGS
@given(raw=st.binary(max_size=3000))
def test_random_bytes_load_or_give_named_problems(tmp_path, raw):
    load_bytes(tmp_path, raw)


YAMLISH = st.text(
    alphabet=st.sampled_from(list("{}[]:,-?&*!|>'\"#%@`\n\t abx019.~<=\\") + ["\ufeff", "é"]),
    max_size=400,
)


@SETTINGS
@given(text=YAMLISH)
def test_random_yamlish_text_loads_or_gives_named_problems(tmp_path, text):
    load_bytes(tmp_path, text.encode("utf-8"))


@SETTINGS
@given(data=DOCUMENTS)
def test_random_structures_validate_or_give_named_problems(data):
    try:
        config = parse_limits(data)
    except LimitsError as error:
        assert error.problems and all(p.code != "internal-error" for p in error.problems)
        return
    config.resolve("alice", ["students"])


@SETTINGS
@given(data=DOCUMENTS, anchors=st.booleans())
def test_random_structures_dumped_as_yaml_load_or_give_named_problems(tmp_path, data, anchors):
    if anchors:  # shared sub-structures become anchors and aliases in the dump
        data = {"shared": data, "defaults": data, "groups": {"g": data}}
    try:
        text = yaml.safe_dump(data, allow_unicode=True)
    except yaml.YAMLError:
        return  # not representable (a key that is a list): nothing to load
    config = load_bytes(tmp_path, text.encode("utf-8"))
    if config is not None:
        config.resolve("alice", ["students"])


@SETTINGS
@given(data=st.dictionaries(KEYS, TREES, max_size=6))
def test_what_the_strict_reader_builds_is_what_yaml_says(data):
    """Where PyYAML and the strict reader both accept a text, they read the same data."""
    text = yaml.safe_dump(data, allow_unicode=True)
    try:
        built = read_yaml(text).data
    except StrictYamlError:
        return
    assert repr(built) == repr(yaml.safe_load(text))  # repr: NaN is never equal to itself
