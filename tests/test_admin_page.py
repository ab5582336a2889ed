"""The admin page model and HTML, on a real allocator and event log (Docker replaced by a
recorded container list, NVML by the SIMULATED one)."""

from __future__ import annotations

import functools
import random
import re
from datetime import UTC, datetime, timedelta

from harness.allocation_fakes import fill_event_log
from harness.inspect_docs import TRUST, inspect_doc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ds01hub.gpu.allocator import GpuAllocator
from ds01hub.gpu.eventlog import EventLog, Interval, NewEvent
from ds01hub.gpu.fairshare import FairShare, UserShare
from ds01hub.gpu.inventory import discover
from ds01hub.gpu.queued import QueuedRequest
from ds01hub.gpu.simulated_nvml import SimulatedNvml
from ds01hub.limits import SimulatedGpuSpec, parse_limits
from ds01hub.services.ops import charts
from ds01hub.services.ops.admin_page import (
    ChartCache,
    PageContext,
    chart_data,
    history,
    overview,
    page_policy,
    queue_rows,
    render_page,
    usage_rows,
    week_start,
)
from ds01hub.services.ops.warnings import CullWarning

NOW = datetime(2026, 3, 4, 12, 0, tzinfo=UTC)  # a Wednesday
LIMITS = parse_limits({"defaults": {"gpu_hold_after_stop": "1h", "max_gpus": 4}})


doc = functools.partial(inspect_doc, NOW)


def machine(tmp_path, docs):
    nvml = SimulatedNvml([SimulatedGpuSpec(), SimulatedGpuSpec(mig=("2g.20gb",) * 2)])
    nvml.nvmlInit()
    inventory = discover(nvml, simulated=True)
    log = EventLog(tmp_path / "events.sqlite")
    allocator = GpuAllocator(
        None,
        inventory,
        tmp_path / "state",
        log,
        clock=lambda: NOW,
        limits=LIMITS,
        container_lister=lambda: list(docs),
        trust=TRUST,
    )
    return nvml, inventory, log, allocator


def test_week_starts_monday_midnight_utc():
    assert week_start(NOW) == datetime(2026, 3, 2, tzinfo=UTC)
    assert week_start(datetime(2026, 3, 2, 0, 0, tzinfo=UTC)) == datetime(2026, 3, 2, tzinfo=UTC)


def test_overview_has_every_slot_holder_state_utilisation_and_usage(tmp_path):
    docs = [
        doc("train", "alice", ["0"], "students"),
        doc("paused", "bob", ["1:0"], "staff", state="exited", stopped_ago=timedelta(minutes=20)),
    ]
    nvml, inventory, log, allocator = machine(tmp_path, docs)
    nvml.set_utilization("0", 88)
    # alice: 10 h last week (closed), 2 h this week (closed); bob: 1 h this week, still open
    last_week = NOW - timedelta(days=8)
    log.record("allocate", "alice", "0", "old", "students", at=last_week)
    log.record("release", "alice", "0", "old", "students", at=last_week + timedelta(hours=10))
    log.record("allocate", "alice", "0", "train", "students", at=NOW - timedelta(hours=3))
    log.record("release", "alice", "0", "train", "students", at=NOW - timedelta(hours=1))
    log.record("allocate", "bob", "1:0", "paused", "staff", at=NOW - timedelta(hours=1))

    model = overview(allocator.status(), inventory, log, NOW, config_error=None)

    slots = {row["slot"]: row for row in model["slots"]}
    assert set(slots) == {"0", "1:0", "1:1"}
    assert slots["0"]["user"] == "alice" and slots["0"]["group"] == "students"
    assert (slots["0"]["state"], slots["0"]["utilization"]) == ("running", 88)
    assert slots["1:0"]["state"] == "stopped" and slots["1:0"]["kind"] == "2g.20gb"
    assert slots["1:0"]["held_until"] == (NOW + timedelta(minutes=40)).isoformat()
    assert slots["1:1"]["state"] == "free" and slots["1:1"]["user"] is None
    users = {row["name"]: row for row in model["usage"]["user"]}
    assert users["alice"] == {"name": "alice", "week": 2.0, "total": 12.0}
    assert users["bob"] == {"name": "bob", "week": 1.0, "total": 1.0}
    groups = {row["name"]: row for row in model["usage"]["group"]}
    assert groups["students"]["total"] == 12.0 and groups["staff"]["week"] == 1.0
    assert model["usage"]["user"][0]["name"] == "alice"  # biggest user first
    assert model["simulated"] is True and model["config_error"] is None


def test_the_page_escapes_names_and_shows_a_config_error_and_pending_culls(tmp_path):
    evil = "<script>alert(1)</script>"
    nvml, inventory, log, allocator = machine(tmp_path, [doc("x", evil, ["0"], "g")])
    later, sooner = (
        CullWarning(user, "", f"default._.{user}", "idle", "idle for 2h", NOW, NOW, NOW + delay)
        for user, delay in ((evil, timedelta(minutes=9)), ("dora", timedelta(minutes=2)))
    )
    model = overview(
        allocator.status(),
        inventory,
        log,
        NOW,
        config_error="line 3: <bad> key",
        pending_culls=[later, sooner],
    )
    assert [w["user"] for w in model["pending_culls"]] == ["dora", evil]  # soonest first
    assert model["pending_culls"][0]["project"] == "default"
    page = render_page(model)
    assert 'id="pending-culls"' in page and "idle for 2h" in page
    assert evil not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'id="config-error"' in page and "line 3: &lt;bad&gt; key" in page
    assert 'id="slots"' in page and "SIMULATED" in page


def test_an_empty_machine_renders_none_rows(tmp_path):
    _, inventory, log, allocator = machine(tmp_path, [])
    page = render_page(overview(allocator.status(), inventory, None, NOW))
    assert page.count('class="state-free"') == 3
    assert '<td colspan="3" class="note text-body-secondary">none</td>' in page  # no usage
    assert '<td colspan="4" class="note text-body-secondary">none</td>' in page  # no culls
    assert "no GPU time recorded" in page  # the charts say so too
    assert "config-error" not in page


def test_a_slot_held_twice_is_a_conflict_row_and_an_alert(tmp_path):
    docs = [doc("a", "alice", ["0"], "students"), doc("b", "bob", ["0"], "students")]
    _, inventory, log, allocator = machine(tmp_path, docs)
    model = overview(allocator.status(), inventory, log, NOW)
    row = {r["slot"]: r for r in model["slots"]}["0"]
    assert row["state"] == "conflict" and row["conflict"] is True
    assert {h["container"] for h in row["holders"]} == {"a", "b"}
    [alert] = [a for a in model["alerts"] if a.startswith("slot 0")]
    assert "a (alice, running)" in alert and "b (bob, running)" in alert
    page = render_page(model)
    assert '<td class="state-conflict"><span class="badge text-bg-danger">conflict</span>' in page
    assert 'class="alert alert-danger error"' in page


def test_events_that_wait_for_a_full_event_log_are_an_alert(tmp_path):
    _, inventory, log, allocator = machine(tmp_path, [])
    fill_event_log(log)
    log.record_many([NewEvent("release", "alice", "0", "a")], defer=True)
    alerts = overview(allocator.status(), inventory, log, NOW)["alerts"]
    [alert] = [a for a in alerts if a.startswith("event log")]
    assert alert.startswith("event log: 1 event(s) wait to be written, 0 lost")
    assert "database or disk is full" in alert


def test_charts_show_the_event_logs_hours_per_week_and_each_slots_day(tmp_path):
    """The numbers drawn (each mark's data-value) are the event log's."""
    _, inventory, log, allocator = machine(tmp_path, [])
    last_week = NOW - timedelta(days=8)  # Tuesday of the week before
    log.record("allocate", "alice", "0", "old", "students", at=last_week)
    log.record("release", "alice", "0", "old", "students", at=last_week + timedelta(hours=10))
    log.record("allocate", "bob", "1:0", "b", "staff", at=NOW - timedelta(minutes=90))
    model = overview(allocator.status(), inventory, log, NOW)
    data = model["charts"]
    assert data["weeks"][-2:] == ["02-23", "03-02"]
    assert data["user"] == {"alice": [0.0] * 6 + [10.0, 0.0], "bob": [0.0] * 7 + [1.5]}
    assert data["group"]["staff"][-1] == 1.5
    # 12:00 now: the last hour (11-12) held all of it, the one before (10-11) half
    assert data["hours"][-1] == "11:00" and data["slots"]["1:0"][-2:] == [0.5, 1.0]
    assert set(data["slots"]) == {"0", "1:0", "1:1"} and not any(data["slots"]["1:1"])

    page = render_page(model)
    bars = dict(
        ((name, week), float(value))
        for name, week, value in re.findall(
            r'class="ds01-bar"[^>]*data-name="([^"]*)" data-label="([^"]*)" data-value="([^"]*)"',
            page,
        )
    )
    assert bars[("alice", "02-23")] == 10.0 and bars[("bob", "03-02")] == 1.5
    cells = re.findall(r'data-slot="1:0" data-label="([^"]*)" data-value="([^"]*)"', page)
    assert cells[-2:] == [("10:00", "0.5"), ("11:00", "1")]
    assert "<title>bob: 1.5 GPU-hours (03-02)</title>" in page


def _flat(data: dict) -> dict:
    """Chart numbers as {(series, name, index): value}, for comparing within rounding."""
    return {
        (series, name, i): value
        for series in ("user", "group", "slots")
        for name, values in data[series].items()
        for i, value in enumerate(values)
    }


def _same_charts(cached: dict, fresh: dict) -> None:
    """Equal up to the last rounding digit (sums added in another order may round apart)."""
    assert {k: v for k, v in cached.items() if k not in ("user", "group", "slots")} == {
        k: v for k, v in fresh.items() if k not in ("user", "group", "slots")
    }
    a, b = _flat(cached), _flat(fresh)
    assert set(a) == set(b)
    assert all(abs(a[k] - b[k]) <= 0.0101 for k in a), [(k, a[k], b[k]) for k in a if a[k] != b[k]]


def _same_history(log: EventLog, slots: list[str], now: datetime, cache: ChartCache) -> None:
    """The cached charts are a fresh read's; the usage tables are EventLog.gpu_hours'."""
    chart, usage = history(log, slots, now, cache)
    _same_charts(chart, chart_data(log, slots, now))
    for by in ("user", "group"):
        week = log.gpu_hours(by=by, since=week_start(now), until=now)
        total = log.gpu_hours(by=by, until=now)
        expected = {r["name"]: (r["week"], r["total"]) for r in usage_rows(week, total)}
        got = {r["name"]: (r["week"], r["total"]) for r in usage[by]}
        assert set(got) == set(expected)
        assert all(abs(got[n][i] - expected[n][i]) <= 0.0101 for n in got for i in (0, 1))


def test_cached_charts_equal_a_fresh_read_and_reread_only_when_the_log_changes(tmp_path):
    """Between writes the cache reads the log once; held slots still count up to `now`; a
    write (a release, a new allocation) and a new hour or week give what a fresh read gives."""
    log = EventLog(tmp_path / "events.sqlite")
    rng = random.Random(7)
    for i in range(300):
        start = NOW - timedelta(hours=rng.uniform(0, 24 * 60))
        user, slot = f"u{rng.randrange(12)}", rng.choice(["0", "1:0", "1:1"])
        log.record("allocate", user, slot, f"c{i}", f"g{i % 3}", at=start)
        end = start + timedelta(hours=rng.expovariate(1 / 5))
        if i % 50 and end < NOW:  # a few stay open: slots held now
            log.record("release", user, slot, f"c{i}", f"g{i % 3}", at=end)
    slots = ["0", "1:0", "1:1"]
    cache = ChartCache()
    moments = [NOW, NOW + timedelta(minutes=1), NOW + timedelta(minutes=59)]
    for now in moments:
        _same_history(log, slots, now, cache)
    assert cache.reads == 1
    later = NOW + timedelta(hours=2)
    log.record("release", "u1", "0", "c0", "g0", at=NOW + timedelta(hours=1))  # a write
    log.record("allocate", "new", "1:1", "n1", "g9", at=NOW + timedelta(minutes=90))
    _same_history(log, slots, later, cache)
    assert cache.reads == 2
    for now in (later + timedelta(hours=3), NOW + timedelta(days=5)):  # new hours, a new week
        _same_history(log, slots, now, cache)
    assert cache.reads == 2
    held = chart_data(log, slots, NOW + timedelta(days=5), cache)["slots"]["1:1"]
    assert held[-1] == 1.0  # "new" still holds 1:1: its hours grow without a write


#: A step of the property below: minutes to advance the clock, then maybe one event.
STEPS = st.lists(
    st.tuples(
        st.integers(0, 60 * 24 * 9),
        st.none() | st.tuples(st.sampled_from(["allocate", "release"]), st.integers(0, 5)),
    ),
    min_size=1,
    max_size=6,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=STEPS)
def test_cached_charts_always_equal_a_fresh_read(tmp_path_factory, steps):
    """Whatever is written and whenever the page loads (minutes or days apart, across hours
    and weeks), the cached charts are the fresh read's."""
    log = EventLog(tmp_path_factory.mktemp("charts") / "events.sqlite")
    log.record("allocate", "a", "0", "c0", "g", at=NOW - timedelta(days=10))
    log.record("allocate", "b", "1:0", "c1", None, at=NOW - timedelta(hours=30))
    log.record("release", "b", "1:0", "c1", None, at=NOW - timedelta(hours=2))
    slots, cache, now = ["0", "1:0", "1:1"], ChartCache(), NOW
    for minutes, event in steps:
        now += timedelta(minutes=minutes)
        if event is not None:
            kind, n = event
            log.record(kind, f"u{n % 3}", slots[n % 3], f"k{n}", f"g{n % 2}", at=now)
            now += timedelta(seconds=1)
        _same_history(log, slots, now, cache)


def test_chart_names_are_escaped_and_many_users_share_others():
    series = {f"<u{i}>": [float(i)] for i in range(10)}
    intervals = [
        Interval(name, None, "0", f"c{i}", NOW - timedelta(hours=i + 1), NOW)
        for i, name in enumerate(series)
    ]
    weekly = charts.weekly_hours(intervals, "user", [week_start(NOW)], NOW)
    assert len(weekly) == len(charts.PALETTE) + 1 and charts.OTHERS in weekly
    assert weekly[charts.OTHERS] == [round(1 + 2 + 3, 2)]  # the three smallest
    svg = charts.stacked_bars(weekly, ["03-02"], "GPU-hours", "t")
    assert "<u9>" not in svg and "&lt;u9&gt;" in svg


def test_the_page_is_the_hubs_page_with_a_navbar_entry_and_reloads():
    model = overview([], _Inventory(), None, NOW)
    page = render_page(model, PageContext(user="root", prefix="/jhub/"))
    assert 'href="/jhub/hub/static/css/style.min.css' in page  # the hub's own styles
    assert 'id="ds01-gpus-link" href="/jhub/services/ds01-ops/"' in page
    assert '<meta http-equiv="refresh" content="60">' in page
    assert "<title>ds01 GPUs</title>" in page
    policy = page_policy(page)
    assert policy.startswith("default-src 'none'; script-src 'self' 'sha256-")
    assert policy.count("'sha256-") == 1  # the hub's configuration script in <head>, only


def test_pending_spawns_are_the_queue_oldest_first():
    users = [
        {
            "name": "b",
            "servers": {
                "": {
                    "pending": "spawn",
                    "started": "2026-03-04T11:00:00Z",
                    "user_options": {"gpus": 1},
                }
            },
        },
        {
            "name": "a",
            "servers": {
                "p": {
                    "pending": "spawn",
                    "started": "2026-03-04T10:00:00Z",
                    "user_options": {"mig": "2g.20gb"},
                },
                "q": {"pending": None, "ready": True},
            },
        },
    ]
    rows = queue_rows(users)
    assert [(r["user"], r["project"], r["wants"]) for r in rows] == [
        ("a", "p", "MIG 2g.20gb"),
        ("b", "default", "1 GPU"),
    ]
    page = render_page(overview([], _Inventory(), None, NOW, queue=rows))
    assert re.search(r'<table class="table table-sm" id="queue">.*MIG 2g\.20gb', page, re.S)


def _pending(started: str, **options) -> dict:
    return {"pending": "spawn", "started": started, "user_options": options}


def test_the_queue_is_ranked_by_effective_priority_then_arrival_with_stored_requests():
    """Fair share lowers the heavy user; among equals the earlier arrival goes first; a stored
    request and the hub's pending spawn of the same server are one row (the stored one)."""
    users = [
        {"name": "heavy", "groups": [], "servers": {"": _pending("2026-03-04T09:00:00Z", gpus=1)}},
        {"name": "a", "groups": [], "servers": {"p": _pending("2026-03-04T10:00:00Z", gpus=2)}},
        {"name": "b", "groups": ["researchers"], "servers": {"": _pending("2026-03-04T11:00:00Z")}},
        {"name": "idle", "servers": {"": {"pending": None, "ready": True}}},
    ]
    stored = [
        QueuedRequest(
            "c", "", "c-x", {"mig": "2g.20gb"}, 10, since=NOW.replace(hour=9, minute=30).timestamp()
        ),
        QueuedRequest("a", "p", "a-p", {"gpus": 2}, 10, since=NOW.replace(hour=8).timestamp()),
    ]
    fair = FairShare(100.0, {"heavy": UserShare("heavy", None, 9.0, 0.9, 0.25, 0.1)})
    rows = queue_rows(
        users, stored, fair, lambda user, groups: 50 if "researchers" in groups else 10
    )
    assert [(r["position"], r["user"], r["effective"], r["queued"]) for r in rows] == [
        (1, "b", 150.0, False),
        (2, "a", 110.0, True),
        (3, "c", 110.0, True),
        (4, "heavy", 20.0, False),
    ]
    assert rows[1]["since"] == "2026-03-04T08:00:00+00:00" and rows[1]["wants"] == "2 GPUs"
    assert rows[2]["wants"] == "MIG 2g.20gb" and rows[0]["wants"] is None
    assert rows[3]["priority"] == 10 and rows[0]["priority"] == 50
    page = render_page(overview([], _Inventory(), None, NOW, queue=rows))
    table = re.search(r'<table class="table table-sm" id="queue">(.*?)</table>', page, re.S)[1]
    assert re.findall(r"<th[^>]*>([^<]+)</th>", table) == [
        "Position",
        "User",
        "Request",
        "Waiting since",
        "Effective priority",
    ]
    cells = [
        [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row)]
        for row in re.findall(r"<tr>(.*?)</tr>", table, re.S)[1:]
    ]
    assert cells[0] == [
        "1",
        "b",
        "a start for default",
        "2026-03-04 11:00 UTC",
        "150.0 (50 configured)",
    ]
    assert cells[1] == [
        "2",
        "a",
        "2 GPUs for p queued",
        "2026-03-04 08:00 UTC",
        "110.0 (10 configured)",
    ]
    assert [c[0] for c in cells] == ["1", "2", "3", "4"]


def test_a_queue_without_fair_share_is_first_come_first_served_and_odd_times_go_last():
    users = [
        {"name": "late", "servers": {"": _pending("2026-03-04T11:00:00Z", gpus=1)}},
        {"name": "odd", "servers": {"": _pending("not a time", gpus=1)}},
        {"name": "early", "servers": {"": _pending("2026-03-04T10:00:00+00:00", gpus=1)}},
    ]
    rows = queue_rows(users)
    assert [(r["user"], r["effective"]) for r in rows] == [
        ("early", 0.0),
        ("late", 0.0),
        ("odd", 0.0),
    ]


class _Inventory:
    simulated = False
    reason = None


def test_the_hub_gets_ds01_pages_once_and_the_ds01_api_stays_out_of_the_menu():
    from traitlets.config import Config

    from ds01hub.hub.services import TEMPLATES, configure_notebook, configure_ops, configure_pages

    c = Config()
    c.JupyterHub.template_paths = ["/site/templates"]
    configure_ops(c, announce=False)
    configure_pages(c)
    assert c.JupyterHub.template_paths == [str(TEMPLATES), "/site/templates"]
    configure_notebook(c)
    [notebook] = [s for s in c.JupyterHub.services.get_value([]) if s["name"] == "ds01"]
    assert notebook["display"] is False


def test_the_fair_share_table_shows_each_users_factor_and_effective_priority(tmp_path):
    from ds01hub.gpu.fairshare import report

    config = parse_limits({"gpu_allocation": {"fairshare": {"half_life": "7d", "weight": 10}}})
    _, inventory, log, _ = machine(tmp_path, [])
    allocator = GpuAllocator(
        None,
        inventory,
        tmp_path / "s2",
        log,
        clock=lambda: NOW,
        limits=config,
        trust=TRUST,
        container_lister=list,
    )
    log.record("allocate", "<b>eve</b>", "0", "a", "lab", at=NOW - timedelta(hours=5))
    log.record("release", "<b>eve</b>", "0", "a", "lab", at=NOW - timedelta(hours=1))
    log.record("allocate", "dan", "0", "b", "lab", at=NOW - timedelta(hours=1))
    rows = report(allocator.fair_share(), config)
    model = overview(allocator.status(), inventory, log, NOW, fairshare=rows)
    assert [r["user"] for r in model["fairshare"]] == ["dan", "<b>eve</b>"]
    assert model["fairshare"][0]["effective"] > model["fairshare"][1]["effective"] > 10
    page = render_page(model)
    assert 'id="fairshare"' in page and "&lt;b&gt;eve&lt;/b&gt;" in page
    assert "Fair share" not in render_page(overview(allocator.status(), inventory, log, NOW))
