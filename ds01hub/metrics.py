"""Prometheus metrics (prometheus_client, which JupyterHub already depends on).

Two kinds, served in two places:

- **Spawner metrics**, emitted where the spawns happen (the hub process) and therefore exposed
  on the hub's own endpoint `/hub/metrics` (JupyterHub serves `prometheus_client`'s default
  registry there, token with `read:metrics`): `ds01_spawn_queue_length`,
  `ds01_spawn_queue_wait_seconds`, `ds01_spawn_failures_total{reason}`. The spawner only calls
  `waiting_for_gpu(group)` and `spawn_failed(reason)`.
- **State metrics**, computed at scrape time from Docker (through the allocator) and the event
  log by `StateCollector`, exposed by the ds01-ops service on `/services/ds01-ops/metrics`:
  slots total/free, allocated (running or reserved) and held (stopped within the hold) by
  group, GPU utilisation per slot, GPU-hours by group, `ds01_culls_total{reason}` and
  `ds01_docker_engine_up` (0 while the engine is unreachable: then only the event log's
  families are served). Culls
  are counted from the event log, so culls made by `ds01hub cull --once` in another process
  count too, and the counter survives restarts.
- **Limits reloads**, from each process's own `LimitsStore` by `LimitsCollector`:
  `ds01_limits_reload_failures_total{file}` and `ds01_limits_last_reload_ok{file}` (0 while a
  broken or too slow edit of the file is ignored and the last good one is in force). The hub
  exports its spawner's store on /hub/metrics (`watch_limits`), ds01-ops its own.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ds01hub.engine import engine_unreachable

__all__ = [
    "LimitsCollector",
    "QUEUE_LENGTH",
    "QUEUE_WAIT",
    "SPAWN_FAILURES",
    "StateCollector",
    "cull_reason_code",
    "spawn_failed",
    "waiting_for_gpu",
    "watch_limits",
]

NO_GROUP = "none"

# -- spawner metrics (hub process, default registry -> /hub/metrics) ---------------------------

QUEUE_LENGTH = Gauge(
    "ds01_spawn_queue_length",
    "Spawns waiting for a GPU slot right now",
    ["group"],
)
QUEUE_WAIT = Histogram(
    "ds01_spawn_queue_wait_seconds",
    "How long spawns waited for a GPU slot (granted or given up)",
    ["group"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, float("inf")),
)
SPAWN_FAILURES = Counter(
    "ds01_spawn_failures_total",
    "Spawns that failed, by reason: options, quota, uid, gpu_wait (gave up queueing), the "
    "allocator's refusal code (user_limit, per_container_limit, not_available), or error",
    ["reason"],
)


@contextlib.contextmanager
def waiting_for_gpu(group: str | None) -> Iterator[None]:
    """Wrap the spawner's wait for a GPU: counts it in the queue while inside and records the
    wait when it ends (granted, refused or cancelled alike)."""
    label = group or NO_GROUP
    QUEUE_LENGTH.labels(label).inc()
    started = time.monotonic()
    try:
        yield
    finally:
        QUEUE_LENGTH.labels(label).dec()
        QUEUE_WAIT.labels(label).observe(time.monotonic() - started)


def spawn_failed(reason: str) -> None:
    """Count a failed spawn; `reason` is a short code (the spawner's SpawnException reason:
    `quota`, `gpu_wait`, `user_limit`, ...), never free text (each value is a new series)."""
    SPAWN_FAILURES.labels(reason).inc()


# -- state metrics (ds01-ops service) ---------------------------------------------------------


def cull_reason_code(reason: str) -> str:
    """`idle: no hub activity ...` -> `idle` (cull events start with their code)."""
    code = reason.partition(":")[0].strip()
    return code if code and " " not in code else "other"


class StateCollector(Collector):
    """Computes the state metrics on each scrape from the allocator's `status()`, the
    inventory's live utilisation and the event log."""

    def __init__(self, allocator: Any, eventlog: Any = None, engine: Any = None):
        self.allocator = allocator
        self.eventlog = eventlog
        self.engine = engine  # a ds01hub.engine.EngineState: outages are recorded there too

    def collect(self) -> Iterator[Any]:
        """While the Docker engine is unreachable, `ds01_docker_engine_up` is 0 and only the
        event log's families are served (a scrape never fails for it)."""
        try:
            rows = self.allocator.status()
        except Exception as error:
            if not engine_unreachable(error):
                raise
            if self.engine is not None:
                self.engine.lost(error)
            rows = None
        else:
            if self.engine is not None:
                self.engine.back()
        yield GaugeMetricFamily(
            "ds01_docker_engine_up",
            "1 when the Docker engine answered this scrape, 0 when it was unreachable",
            value=0 if rows is None else 1,
        )
        if rows is not None:
            yield from self._from_docker(rows)
        if self.eventlog is not None:
            yield from self._from_eventlog()

    def _from_docker(self, rows: list[Any]) -> Iterator[Any]:
        inventory = self.allocator.inventory
        total = GaugeMetricFamily("ds01_gpu_slots", "GPU slots on this machine", labels=["kind"])
        kinds = Tally(row.profile or "gpu" for row in rows)
        for kind, count in sorted(kinds.items()):
            total.add_metric([kind], count)
        yield total
        free = sum(1 for row in rows if row.holding is None)
        yield GaugeMetricFamily("ds01_gpu_slots_free", "GPU slots nobody holds", value=free)
        allocated = GaugeMetricFamily(
            "ds01_gpu_slots_allocated",
            "GPU slots of running containers or in-flight spawns, by group",
            labels=["group"],
        )
        held = GaugeMetricFamily(
            "ds01_gpu_slots_held",
            "GPU slots held by stopped containers (gpu_hold_after_stop), by group",
            labels=["group"],
        )
        by_state: dict[str, Tally] = {"allocated": Tally(), "held": Tally()}
        for row in rows:
            if row.holding is not None:
                state = "held" if row.holding.state == "stopped" else "allocated"
                by_state[state][row.holding.group or NO_GROUP] += 1
        for family, state in ((allocated, "allocated"), (held, "held")):
            for group, count in sorted(by_state[state].items()):
                family.add_metric([group], count)
            yield family
        utilisation = GaugeMetricFamily(
            "ds01_gpu_utilization_percent", "NVML utilisation of whole-GPU slots", labels=["slot"]
        )
        for row in rows:
            value = inventory.utilization(row.slot_id)
            if value is not None:
                utilisation.add_metric([row.slot_id], value)
        yield utilisation

    def _from_eventlog(self) -> Iterator[Any]:
        culls = CounterMetricFamily(
            "ds01_culls", "Servers stopped by the culler, by reason", labels=["reason"]
        )
        tally = Tally(cull_reason_code(e.reason) for e in self.eventlog.events(kind="cull"))
        for code in sorted(set(tally) | {"idle", "max_runtime"}):
            culls.add_metric([code], tally.get(code, 0))
        yield culls
        hours = CounterMetricFamily(
            "ds01_gpu_hours", "GPU slot-hours used (held time counts), by group", labels=["group"]
        )
        for group, value in sorted(self.eventlog.gpu_hours(by="group").items()):
            hours.add_metric([group], value)
        yield hours


# -- limits reloads (every process with a LimitsStore) -----------------------------------------


class LimitsCollector(Collector):
    """Whether each watched limits file reloads: failures so far and the last outcome, read
    from the stores (`reload_failures`, `last_reload_ok`) at scrape time."""

    def __init__(self, stores: Iterable[Any] = ()):
        self.stores: dict[str, Any] = {}
        for store in stores:
            self.watch(store)

    def watch(self, store: Any) -> None:
        self.stores[str(store.path)] = store  # one series per file: the latest store wins

    def collect(self) -> Iterator[Any]:
        failures = CounterMetricFamily(
            "ds01_limits_reload_failures",
            "Reloads of the limits file that failed (problems, or slower than the time "
            "limit); the last good file stayed in force",
            labels=["file"],
        )
        ok = GaugeMetricFamily(
            "ds01_limits_last_reload_ok",
            "1 when the limits file in force is the one on disk; 0 while a broken or too "
            "slow edit is ignored",
            labels=["file"],
        )
        for file, store in sorted(self.stores.items()):
            failures.add_metric([file], store.reload_failures)
            ok.add_metric([file], 1 if store.last_reload_ok else 0)
        yield failures
        yield ok


_HUB_LIMITS = LimitsCollector()
REGISTRY.register(_HUB_LIMITS)


def watch_limits(store: Any) -> None:
    """Export `store`'s reload state on this process's default registry (the hub's
    /hub/metrics)."""
    _HUB_LIMITS.watch(store)
