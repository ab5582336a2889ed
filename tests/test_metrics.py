"""Metrics: the spawner helpers and the state collector over a real allocator and event log
(Docker replaced by a recorded container list, NVML by the SIMULATED one)."""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta

from harness.allocation_fakes import fill_event_log
from harness.inspect_docs import TRUST, inspect_doc
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ds01hub.gpu.allocator import GpuAllocator
from ds01hub.gpu.eventlog import EventLog, NewEvent
from ds01hub.gpu.inventory import discover
from ds01hub.gpu.simulated_nvml import SimulatedNvml
from ds01hub.limits import SimulatedGpuSpec, parse_limits
from ds01hub.services.ops import metrics
from ds01hub.spawner import metrics as spawn_metrics

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
LIMITS = parse_limits({"defaults": {"gpu_hold_after_stop": "1h", "max_gpus": 4}})


doc = functools.partial(inspect_doc, NOW)


def samples(registry):
    """{(name, frozenset(labels)): value} of everything the registry exposes."""
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_state_metrics_count_slots_by_group_utilisation_culls_and_gpu_hours(tmp_path):
    nvml = SimulatedNvml(
        [SimulatedGpuSpec(), SimulatedGpuSpec(), SimulatedGpuSpec(mig=("2g.20gb",) * 3)]
    )
    nvml.nvmlInit()
    inventory = discover(nvml, simulated=True)
    nvml.set_utilization("0", 73)
    docs = [
        doc("train", "alice", ["0"], "students"),
        doc("old", "bob", ["1"], "students", state="exited", stopped_ago=timedelta(minutes=10)),
        doc("mig", "carol", ["2:0", "2:1"], "staff"),
        doc("gone", "dave", ["2:2"], "staff", state="exited", stopped_ago=timedelta(hours=2)),
    ]
    log = EventLog(tmp_path / "events.sqlite")
    log.record(
        "allocate",
        "alice",
        slot="0",
        container="train",
        group="students",
        at=NOW - timedelta(hours=3),
    )
    log.record("cull", "erin", container="x", reason="idle: no hub activity for 2h")
    log.record("cull", "erin", container="y", reason="idle: no hub activity for 5h")
    log.record("cull", "fred", container="z", reason="max_runtime: running for 3d")
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
    registry = CollectorRegistry()
    registry.register(metrics.StateCollector(allocator, log))
    got = samples(registry)

    assert got[("ds01_gpu_slots", frozenset({("kind", "gpu")}))] == 2
    assert got[("ds01_gpu_slots", frozenset({("kind", "2g.20gb")}))] == 3
    assert got[("ds01_gpu_slots_free", frozenset())] == 1  # dave's hold passed
    assert got[("ds01_gpu_slots_allocated", frozenset({("group", "students")}))] == 1
    assert got[("ds01_gpu_slots_allocated", frozenset({("group", "staff")}))] == 2
    assert got[("ds01_gpu_slots_held", frozenset({("group", "students")}))] == 1
    assert ("ds01_gpu_slots_held", frozenset({("group", "staff")})) not in got
    assert got[("ds01_gpu_utilization_percent", frozenset({("slot", "0")}))] == 73
    assert ("ds01_gpu_utilization_percent", frozenset({("slot", "2:0")})) not in got  # MIG
    assert got[("ds01_culls_total", frozenset({("reason", "idle")}))] == 2
    assert got[("ds01_culls_total", frozenset({("reason", "max_runtime")}))] == 1
    hours = got[("ds01_gpu_hours_total", frozenset({("group", "students")}))]
    assert hours >= 3.0  # open interval counted up to the real now, which is later than NOW


def test_conflicts_and_event_log_health_are_metrics(tmp_path):
    nvml = SimulatedNvml([SimulatedGpuSpec()])
    nvml.nvmlInit()
    docs = [doc("a", "alice", ["0"], "students"), doc("b", "bob", ["0"], "students")]
    log = EventLog(tmp_path / "events.sqlite")
    allocator = GpuAllocator(
        None,
        discover(nvml, simulated=True),
        tmp_path / "state",
        log,
        clock=lambda: NOW,
        limits=LIMITS,
        container_lister=lambda: list(docs),
        trust=TRUST,
    )
    registry = CollectorRegistry()
    registry.register(metrics.StateCollector(allocator, log))
    got = samples(registry)
    assert got[("ds01_gpu_slot_conflicts", frozenset())] == 1
    assert got[("ds01_eventlog_unwritten_events", frozenset())] == 0
    assert got[("ds01_eventlog_write_errors_total", frozenset())] == 0
    assert got[("ds01_state_free_bytes", frozenset())] > 0


def test_the_hub_process_reports_its_event_log_health(tmp_path):
    log = EventLog(tmp_path / "events.sqlite")
    spawn_metrics.watch_eventlog(log)
    fill_event_log(log)
    log.record_many([NewEvent("release", "alice", "0", "a")], defer=True)
    got = samples(spawn_metrics.REGISTRY)
    assert got[("ds01_eventlog_write_errors_total", frozenset())] >= 2
    assert got[("ds01_eventlog_unwritten_events", frozenset())] >= 1


def test_waiting_for_gpu_counts_the_queue_and_records_the_wait():
    group = "queue-test-group"
    wait = spawn_metrics.QUEUE_WAIT.labels(group)
    before = wait._sum.get()
    with spawn_metrics.waiting_for_gpu(group):
        assert spawn_metrics.QUEUE_LENGTH.labels(group)._value.get() == 1
        try:
            with spawn_metrics.waiting_for_gpu(group):
                assert spawn_metrics.QUEUE_LENGTH.labels(group)._value.get() == 2
                raise TimeoutError
        except TimeoutError:
            pass
    assert spawn_metrics.QUEUE_LENGTH.labels(group)._value.get() == 0
    assert wait._sum.get() > before


def test_spawn_failures_are_counted_by_reason():
    counter = spawn_metrics.SPAWN_FAILURES.labels("not_available")
    before = counter._value.get()
    spawn_metrics.spawn_failed("not_available")
    assert counter._value.get() == before + 1


def test_cull_reason_code_takes_the_leading_word():
    assert metrics.cull_reason_code("idle: no hub activity for 2h") == "idle"
    assert metrics.cull_reason_code("max_runtime: running 3d") == "max_runtime"
    assert metrics.cull_reason_code("stopped by hand, no code") == "other"
