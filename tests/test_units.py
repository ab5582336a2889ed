"""Sizes and durations as the limits file and Docker spell them."""

import pytest

from ds01hub.units import (
    UnitError,
    format_duration,
    format_size,
    gpus_free_text,
    human_duration,
    human_size,
    parse_duration,
    parse_size,
    quota_rows,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("32g", 32 << 30),
        ("32G", 32 << 30),
        ("512m", 512 << 20),
        ("1.5G", int(1.5 * (1 << 30))),
        ("64GiB", 64 << 30),
        ("100GB", 100 << 30),
        ("2t", 2 << 40),
        ("1024", 1024),
        ("10k", 10 << 10),
        (4096, 4096),
        (" 8g ", 8 << 30),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["lots", "32x", "-1g", "", "g", "1.2.3g", True, -5, None, [1]])
def test_parse_size_rejects_with_the_accepted_forms(bad):
    with pytest.raises(UnitError, match="512m, 32g"):
        parse_size(bad)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("48h", 48 * 3600),
        ("30m", 1800),
        ("7d", 7 * 86400),
        ("1h30m", 5400),
        ("0.5h", 1800),
        ("0.25h", 900),
        ("90s", 90),
        ("1w", 604800),
        ("0h", 0),
        ("2d 12h", 2.5 * 86400),
        (120, 120),
    ],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["2 days", "h", "48", "soon", "1h-30m", "", True, -1])
def test_parse_duration_rejects_with_the_accepted_forms(bad):
    with pytest.raises(UnitError, match="48h"):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("n", "text"), [(32 << 30, "32g"), (1536 << 20, "1536m"), (1 << 40, "1t"), (1000, "1000")]
)
def test_format_size_round_trips(n, text):
    assert format_size(n) == text
    assert parse_size(text) == n


@pytest.mark.parametrize(
    ("seconds", "text"), [(5400, "1h30m"), (172800, "2d"), (0, "0s"), (90061, "1d1h1m1s")]
)
def test_format_duration_round_trips(seconds, text):
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (0, "0s"), (5, "5s"), (65, "1m 5s"), (3600, "1h"), (3 * 3600 + 720, "3h 12m")]
    + [(86400 * 2 + 3600, "2d 1h"), (86400 + 60, "1d")],
)
def test_human_duration_shows_the_two_largest_units(seconds, text):
    assert human_duration(seconds) == text


def test_human_size_rounds_for_reading():
    assert human_size(None) == "-" and human_size(None, none="no limit") == "no limit"
    assert human_size(512) == "512B"
    assert human_size(1.5 * 2**30) == "1.5G"
    assert human_size(32 * 2**30) == "32G"


def test_quota_rows_say_unlimited_and_until_removed_never_none():
    quota = {"gpus": [{"slot": "0:1", "name": "A100 MIG 2g.20gb"}], "running": 1, "containers": 2}
    rows = quota_rows(quota | {"limits": {"max_cpus": 4.0}})
    assert ("GPUs", "1 GPU in use of unlimited (slot 0:1: A100 MIG 2g.20gb)", "") in rows
    assert ("GPUs per container", "", "unlimited") in rows
    assert ("CPUs per container", "", "4") in rows
    assert ("GPUs kept after a stop", "", "until the container is removed") in rows
    assert ("Idle containers stopped after", "", "never") in rows
    assert not any("None" in cell for row in rows for cell in row)


def test_free_gpu_slots_read_as_counts_per_kind_and_only_when_known():
    free = {
        "whole": {"free": 3, "total": 4},
        "mig": {"2g.20gb": {"free": 1, "total": 2}, "7g.80gb": {"free": 0, "total": 1}},
        "simulated": True,
    }
    assert gpus_free_text(free) == (
        "3 of 4 whole GPUs; 1 of 2 MIG 2g.20gb slices; 0 of 1 MIG 7g.80gb slice (SIMULATED)"
    )
    assert gpus_free_text({"whole": {"free": 0, "total": 0}, "mig": {}}) == (
        "none (this machine has no GPUs)"
    )
    quota = {"limits": {"max_gpus": 2}, "gpus": []}
    assert (
        "GPUs free now",
        "3 of 4 whole GPUs; 1 of 2 MIG 2g.20gb slices; 0 of 1 MIG 7g.80gb slice (SIMULATED)",
        "",
    ) in quota_rows(quota | {"gpus_free": free})
    assert not any(row[0] == "GPUs free now" for row in quota_rows(quota | {"gpus_free": None}))
