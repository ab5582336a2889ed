"""The one MIG profile grammar (ds01hub.mig): what the limits file, the spawn options, the
inventory and the simulated NVML accept is the same set of names."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ds01hub.limits import LimitsError, parse_limits
from ds01hub.mig import is_profile, parse_profile, profile_in_device_name
from ds01hub.spawner.options import OptionsError, _read_mig


@pytest.mark.parametrize(
    "name, slices, gigabytes, media",
    [("1g.10gb", 1, 10, False), ("7g.141gb", 7, 141, False), ("1g.10gb+me", 1, 10, True)],
)
def test_a_profile_name_is_parsed(name, slices, gigabytes, media):
    profile = parse_profile(name)
    assert (profile.slices, profile.gigabytes, profile.media) == (slices, gigabytes, media)
    assert profile.memory_mb == gigabytes * 1024


@pytest.mark.parametrize(
    "text", ["5g.40gb", "2g.20GB", "2g.0gb", "2g.20gb+gfx", " 2g.20gb", "2g.20gb\n", "", None, 3]
)
def test_what_is_not_a_profile(text):
    assert parse_profile(text) is None


@pytest.mark.parametrize(
    "device, profile",
    [
        ("NVIDIA H100 80GB HBM3 MIG 2g.20gb", "2g.20gb"),
        ("NVIDIA A100-SXM4-40GB MIG 1g.5gb+me", "1g.5gb+me"),
        ("NVIDIA H200 MIG 7g.141gb", "7g.141gb"),
        ("NVIDIA B200 MIG 1g.23gb+gfx", None),  # a kind we do not know: shown as plain "mig"
    ],
)
def test_the_profile_in_a_device_name(device, profile):
    found = profile_in_device_name(device)
    assert (found.name if found else None) == profile


def _limits_accept(profile: str) -> bool:
    document = {"gpu_allocation": {"simulate": {"gpus": [{"memory": "80g", "mig": [profile]}]}}}
    try:
        parse_limits(document)
    except LimitsError as error:
        assert all(p.code in ("invalid-value", "mig-capacity") for p in error.problems)
        return False
    return True


def _options_accept(profile: str) -> bool:
    try:
        _read_mig(profile)
    except OptionsError:
        return False
    return True


@given(
    st.one_of(
        st.from_regex(r"[0-9]{1,2}g\.[0-9]{1,4}gb(\+me|\+gfx)?", fullmatch=True),
        st.text(max_size=12),
    )
)
def test_the_spawn_options_and_the_limits_file_accept_the_same_names(text):
    """A profile offered in `profile_list` is never refused by the limits file, and the other
    way round (a profile larger than its GPU is a capacity problem, not a name problem)."""
    if text:  # an empty option is no MIG request at all
        assert _options_accept(text) == is_profile(text)
    if is_profile(text) and parse_profile(text).gigabytes <= 80:
        assert _limits_accept(text)
    if not is_profile(text):
        assert not _limits_accept(text)
