"""The Grafana dashboard (config/grafana/ds01hub-dashboard.json) is valid and every query of
every panel names only metrics the code exports: the names come from the real collectors'
exposition (ds01-ops' state, event log and limits collectors on a SIMULATED machine, and the
hub process's spawner metrics), not from a list kept by hand."""

from __future__ import annotations

import functools
import json
import re
from datetime import UTC, datetime
from pathlib import Path

from harness.inspect_docs import TRUST, inspect_doc
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ds01hub.gpu.allocator import GpuAllocator
from ds01hub.gpu.eventlog import EventLog
from ds01hub.gpu.inventory import discover
from ds01hub.gpu.simulated_nvml import SimulatedNvml
from ds01hub.limits import SimulatedGpuSpec, parse_limits
from ds01hub.services.ops import metrics
from ds01hub.spawner import metrics as spawn_metrics  # noqa: F401  (registers the hub's)

DASHBOARD = Path(__file__).resolve().parent.parent / "config" / "grafana" / "ds01hub-dashboard.json"
NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
METRIC = re.compile(r"\b(ds01_[a-z0-9_]+|jupyterhub_[a-z0-9_]+)\b")
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
    "summary": ("", "_sum", "_count", "_created"),
}


def exported(registry) -> set[str]:
    """Every series name a scrape of `registry` can show (a family without samples yet
    counts by its type's suffixes)."""
    names = set()
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def ops_registry(tmp_path) -> CollectorRegistry:
    nvml = SimulatedNvml([SimulatedGpuSpec(), SimulatedGpuSpec(mig=("2g.20gb",) * 2)])
    nvml.nvmlInit()
    inventory = discover(nvml, simulated=True)
    log = EventLog(tmp_path / "events.sqlite")
    docs = [functools.partial(inspect_doc, NOW)("train", "alice", ["0"], "students")]
    allocator = GpuAllocator(
        None,
        inventory,
        tmp_path / "state",
        log,
        clock=lambda: NOW,
        limits=parse_limits({"defaults": {"max_gpus": 4}}),
        container_lister=lambda: list(docs),
        trust=TRUST,
    )
    registry = CollectorRegistry()
    registry.register(metrics.StateCollector(allocator, log))
    registry.register(metrics.LimitsCollector())
    return registry


def queries(dashboard: dict) -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def test_the_dashboard_is_valid_grafana_json():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"  # the dashboard's variable
        assert panel["targets"], panel["title"]
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource"]


def test_every_query_names_a_metric_the_code_exports(tmp_path):
    names = exported(ops_registry(tmp_path)) | exported(REGISTRY)
    assert "ds01_gpu_slots_free" in names and "ds01_spawn_queue_wait_seconds_bucket" in names
    assert "ds01_gpu_slots_free_total" not in names  # the check can fail
    dashboard = json.loads(DASHBOARD.read_text())
    used = set()
    for title, expr in queries(dashboard):
        found = METRIC.findall(expr)
        assert found, f"{title}: {expr!r} names no ds01 metric"
        unknown = [name for name in found if name not in names]
        assert not unknown, f"{title}: {expr!r} names {unknown}, which nothing exports"
        used.update(found)
    # every family the code exports has a panel (a new metric needs one too)
    families = {re.sub(r"_(total|bucket|sum|count|created)$", "", n) for n in names}
    shown = {re.sub(r"_(total|bucket|sum|count|created)$", "", n) for n in used}
    missing = {n for n in families if n.startswith("ds01_")} - shown
    assert not missing, f"no panel shows {sorted(missing)}"
