"""The admin page model and HTML, on a real allocator and event log (Docker replaced by a
recorded container list, NVML by the SIMULATED one)."""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta

from harness.allocation_fakes import fill_event_log
from harness.inspect_docs import TRUST, inspect_doc

from ds01hub.gpu.allocator import GpuAllocator
from ds01hub.gpu.eventlog import EventLog, NewEvent
from ds01hub.gpu.inventory import discover
from ds01hub.gpu.simulated_nvml import SimulatedNvml
from ds01hub.limits import SimulatedGpuSpec, parse_limits
from ds01hub.services.ops.admin_page import overview, render_page, week_start
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
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'id="config-error"' in page and "line 3: &lt;bad&gt; key" in page
    assert 'id="slots"' in page and "SIMULATED" in page


def test_an_empty_machine_renders_none_rows(tmp_path):
    _, inventory, log, allocator = machine(tmp_path, [])
    page = render_page(overview(allocator.status(), inventory, None, NOW))
    assert page.count('<td class="state-free">free</td>') == 3
    assert '<td colspan="3" class="note">none</td>' in page
    assert '<td colspan="4" class="note">none</td>' in page  # no pending culls
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
    assert '<td class="state-conflict">conflict</td>' in page
    assert 'class="error alert"' in page


def test_events_that_wait_for_a_full_event_log_are_an_alert(tmp_path):
    _, inventory, log, allocator = machine(tmp_path, [])
    fill_event_log(log)
    log.record_many([NewEvent("release", "alice", "0", "a")], defer=True)
    alerts = overview(allocator.status(), inventory, log, NOW)["alerts"]
    [alert] = [a for a in alerts if a.startswith("event log")]
    assert alert.startswith("event log: 1 event(s) wait to be written, 0 lost")
    assert "database or disk is full" in alert


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
    assert "<h2>Fair share</h2>" in page and "&lt;b&gt;eve&lt;/b&gt;" in page
    assert "Fair share" not in render_page(overview(allocator.status(), inventory, log, NOW))
