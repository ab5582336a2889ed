"""Sizes and durations as the limits file and Docker spell them."""

import pytest

from ds01hub.units import UnitError, format_duration, format_size, parse_duration, parse_size


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
