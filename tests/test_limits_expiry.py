"""Limits that expire: `user_overrides.NAME.expires` (issue 17), on a controlled clock.

The override applies through its day (UTC) and not from the next midnight; users are told
EXPIRY_WARN_DAYS before; the event log records an expiry once, at the moment it took effect.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ds01hub import provenance
from ds01hub.gpu.eventlog import EventLog
from ds01hub.limits import (
    EXPIRY_EVENT,
    EXPIRY_WARN_DAYS,
    LimitsError,
    parse_limits,
    record_expired,
)
from ds01hub.services.ops.culler import Culler

DS01HUB = str(Path(sys.executable).with_name("ds01hub"))


def config(expires="2027-01-31"):
    return parse_limits(
        {
            "defaults": {"max_gpus": 1, "memory": "16g"},
            "groups": {"students": {"members": ["alice"], "max_gpus": 1, "priority": 20}},
            "user_overrides": {
                "alice": {"max_gpus": 3, "memory": "64g", "reason": "thesis", "expires": expires}
            },
        }
    )


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_the_override_applies_through_its_day_and_not_after():
    limits = config(date(2027, 1, 31))  # YAML's date and JSON's text read the same
    during = limits.resolve("alice", now=at("2027-01-31T23:59:59"))
    assert (during.max_gpus, during.memory) == (3, 64 << 30)
    assert during.sources["max_gpus"] == "user_overrides.alice"
    assert [e.expires for e in during.expiries] == [date(2027, 1, 31)] and not during.expired
    after = limits.resolve("alice", now=at("2027-02-01T00:00:00"))
    assert (after.max_gpus, after.memory) == (1, 16 << 30)
    assert after.sources["max_gpus"] == "groups.students"
    assert after.sources["memory"] == "defaults"
    assert after.reason is None and not after.expiries
    assert [e.source for e in after.expired] == ["user_overrides.alice"]


def test_users_are_warned_a_few_days_before_and_told_after():
    limits = config()
    early = limits.resolve("alice", now=at("2027-01-20T12:00:00"))
    assert early.notices() == []
    soon = limits.resolve("alice", now=at("2027-01-29T12:00:00"))
    [notice] = soon.notices()
    assert "expire after 2027-01-31" in notice and "in 2 days" in notice
    assert "today" in limits.resolve("alice", now=at("2027-01-31T08:00:00")).notices()[0]
    [gone] = limits.resolve("alice", now=at("2027-02-03T00:00:00")).notices()
    assert "expired on 2027-01-31" in gone
    shown = dict(soon.display_rows())
    assert shown["Expires"] == "user_overrides.alice: after 2027-01-31 (UTC)"
    data = soon.to_dict()
    assert data["expiries"] == [{"source": "user_overrides.alice", "expires": "2027-01-31"}]
    assert data["notices"] == [notice]


@given(
    day=st.dates(date(2001, 1, 1), date(9990, 1, 1)),
    offset=st.integers(-(10**8), 10**8),
)
def test_property_an_override_applies_exactly_until_the_midnight_after_its_date(day, offset):
    limits = config(day)
    midnight = datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1)
    now = midnight + timedelta(seconds=offset)
    resolved = limits.resolve("alice", now=now)
    assert (resolved.max_gpus == 3) == (now < midnight)
    assert len(resolved.expiries) + len(resolved.expired) == 1
    notices = resolved.notices()
    warned = now >= midnight - timedelta(days=EXPIRY_WARN_DAYS)
    assert bool(notices) == warned


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("tomorrow", "not a date"),
        ("2027-02-30", "not a date"),
        (datetime(2027, 1, 31, 12, tzinfo=UTC), "not a date"),
        (20270131, "not a date"),
        (True, "not a date"),
        ("2027-01-31" * 1000, "not a date"),
        (date(1999, 12, 31), "outside 2000-01-01"),
        (date(9999, 12, 31), "outside"),
    ],
)
def test_a_bad_expires_is_named_with_its_fix(value, message):
    with pytest.raises(LimitsError) as caught:
        config(value)
    [problem] = caught.value.problems
    assert problem.key_path == "user_overrides.alice.expires"
    assert message in problem.message and "2027-01-31" in problem.fix


def test_the_event_log_records_an_expiry_once_at_its_moment(tmp_path):
    log = EventLog(tmp_path / "events.db")
    limits = config()
    before = limits.resolve("alice", now=at("2027-01-30T00:00:00"))
    assert record_expired(log, "alice", before.group, before.expired) == 0
    after = limits.resolve("alice", now=at("2027-02-02T00:00:00"))
    assert record_expired(log, "alice", after.group, after.expired) == 1
    assert record_expired(log, "alice", after.group, after.expired) == 0  # a second spawn
    [event] = log.events(kind=EXPIRY_EVENT)
    assert (event.user, event.group) == ("alice", "students")
    assert event.reason == "user_overrides.alice expired on 2027-01-31"
    assert event.at == at("2027-02-01T00:00:00")


def test_the_culler_pass_records_expiries_of_users_who_never_spawn(tmp_path):
    log = EventLog(tmp_path / "events.db")
    clock = [at("2027-01-31T12:00:00")]
    culler = Culler(
        None,
        None,
        None,
        config(),
        eventlog=log,
        state_dir=tmp_path,
        clock=lambda: clock[0],
        trust=provenance.load(tmp_path),
    )
    assert culler.record_expired_limits(clock[0]) == 0
    clock[0] = at("2027-02-01T00:00:01")
    assert culler.record_expired_limits(clock[0]) == 1
    assert culler.record_expired_limits(clock[0]) == 0
    assert [e.user for e in log.events(kind=EXPIRY_EVENT)] == ["alice"]


def test_the_limits_command_shows_sources_and_the_expiry(tmp_path):
    soon = datetime.now(UTC).date() + timedelta(days=2)
    path = tmp_path / "limits.yaml"
    path.write_text(
        "defaults: {memory: 16g}\n"
        f"user_overrides:\n  alice: {{memory: 64g, expires: {soon.isoformat()}}}\n"
    )
    result = subprocess.run(
        [DS01HUB, "limits", "alice", "--limits", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    memory = next(line for line in lines if line.startswith("Memory:"))
    assert "64g" in memory and memory.endswith("(user_overrides.alice)")
    expires = next(line for line in lines if line.startswith("Expires:"))
    assert expires.split()[1:4] == ["user_overrides.alice:", "after", str(soon)]
    assert any(line.startswith("note: ") and "in 2 days" in line for line in lines)


def test_the_notice_reaches_the_spawn_page_the_user_cli_and_the_notebook_panel():
    from ds01hub.cli.user.views import quota_line
    from ds01hub.spawner.options import GpuOffer, render_form
    from ds01hub.widgets.quota_panel import limits_table

    soon = config().resolve("alice", now=at("2027-01-30T00:00:00"))
    [notice] = soon.notices()
    page = render_form(
        profiles=(),
        limits=soon,
        offer=GpuOffer.from_slots((), (), False),
        images="*",
        own_images=(),
        default_image="ds01/base:1",
    )
    assert "Note: your limits from user_overrides.alice expire after 2027-01-31" in page
    quota = {"limits": {"group": "students", "max_gpus": 3}, "notices": [notice]}
    assert quota_line(quota).endswith(f"\nNote: {notice}")
    assert "expire after 2027-01-31" in limits_table(quota)
