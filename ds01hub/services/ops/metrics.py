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
  count too, and the counter survives restarts. `ds01_gpu_slot_conflicts` counts slots that
  more than one container holds (exclusivity broken: alert on anything above 0).
- **Event log health**, in both places (`EventLogHealth`; the hub process watches its event log
  with `watch_eventlog`): `ds01_eventlog_unwritten_events` (events waiting for a writable log),
  `ds01_eventlog_write_errors_total`, `ds01_eventlog_dropped_events_total` and
  `ds01_state_free_bytes` (free space where the log lives). Alert on errors or waiting events.
- **Limits reloads**, from each process's own `LimitsStore` by `LimitsCollector`:
  `ds01_limits_reload_failures_total{file}` and `ds01_limits_last_reload_ok{file}` (0 while a
  broken or too slow edit of the file is ignored and the last good one is in force). The hub
  exports its spawner's store on /hub/metrics (`watch_limits`), ds01-ops its own.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ds01hub.engine import EngineState, engine_unreachable
from ds01hub.gpu.allocator import GpuAllocator
from ds01hub.gpu.eventlog import EventLog
from ds01hub.limits import LimitsStore

__all__ = [
    "EventLogHealth",
    "LimitsCollector",
    "StateCollector",
    "cull_reason_code",
]

NO_GROUP = "none"

# -- event log health (both processes) --------------------------------------------------------


class EventLogHealth(Collector):
    """Write trouble of event logs this process writes (`EventLog.health()`), summed."""

    def __init__(self, eventlogs: Callable[[], Iterable[Any]]):
        self._eventlogs = eventlogs

    def collect(self) -> Iterator[Any]:
        healths = [log.health() for log in self._eventlogs()]
        yield GaugeMetricFamily(
            "ds01_eventlog_unwritten_events",
            "Events waiting in this process for the event log to become writable",
            value=sum(h["unwritten"] for h in healths),
        )
        yield CounterMetricFamily(
            "ds01_eventlog_write_errors",
            "Failed writes to the event log (a full disk, an unwritable file)",
            value=sum(h["write_errors"] for h in healths),
        )
        yield CounterMetricFamily(
            "ds01_eventlog_dropped_events",
            "Events lost because too many waited for a writable event log",
            value=sum(h["dropped"] for h in healths),
        )
        free = [h["free_bytes"] for h in healths if h["free_bytes"] is not None]
        if free:
            yield GaugeMetricFamily(
                "ds01_state_free_bytes",
                "Free space on the file system of the event log (the state directory)",
                value=min(free),
            )


# -- state metrics (ds01-ops service) ---------------------------------------------------------


def cull_reason_code(reason: str) -> str:
    """`idle: no hub activity ...` -> `idle` (cull events start with their code)."""
    code = reason.partition(":")[0].strip()
    return code if code and " " not in code else "other"


class StateCollector(Collector):
    """Computes the state metrics on each scrape from the allocator's `status()`, the
    inventory's live utilisation and the event log."""

    def __init__(
        self,
        allocator: GpuAllocator,
        eventlog: EventLog | None = None,
        engine: EngineState | None = None,
    ):
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
            yield from EventLogHealth(lambda: [self.eventlog]).collect()

    def _from_docker(self, rows: list[Any]) -> Iterator[Any]:
        inventory = self.allocator.inventory
        total = GaugeMetricFamily("ds01_gpu_slots", "GPU slots on this machine", labels=["kind"])
        kinds = Tally(row.profile or "gpu" for row in rows)
        for kind, count in sorted(kinds.items()):
            total.add_metric([kind], count)
        yield total
        free = sum(1 for row in rows if row.holding is None)
        yield GaugeMetricFamily("ds01_gpu_slots_free", "GPU slots nobody holds", value=free)
        yield GaugeMetricFamily(
            "ds01_gpu_slot_conflicts",
            "GPU slots held by more than one container (should always be 0)",
            value=sum(1 for row in rows if row.conflict),
        )
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

    def watch(self, store: LimitsStore) -> None:
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
