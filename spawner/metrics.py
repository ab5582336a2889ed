"""Spawn metrics, emitted where the spawns happen (the hub process) and so exposed on the hub's
own endpoint `/hub/metrics` (JupyterHub serves prometheus_client's default registry there,
token with `read:metrics`): `ds01_spawn_queue_length`, `ds01_spawn_queue_wait_seconds`,
`ds01_spawn_failures_total{reason}`, and the hub's own event log health and limits reloads
(the collectors of `ds01hub.services.ops.metrics`). The spawner only calls
`waiting_for_gpu(group)`, `spawn_failed(reason)`, `watch_eventlog` and `watch_limits`.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram

from ds01hub.services.ops.metrics import NO_GROUP, EventLogHealth, LimitsCollector

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


_WATCHED: weakref.WeakSet = weakref.WeakSet()


def watch_eventlog(eventlog: Any) -> None:
    """Report this event log's health on the process's default registry (the hub's
    /hub/metrics); registered once per process."""
    if not _WATCHED:
        REGISTRY.register(EventLogHealth(lambda: list(_WATCHED)))
    _WATCHED.add(eventlog)


_HUB_LIMITS = LimitsCollector()
REGISTRY.register(_HUB_LIMITS)


def watch_limits(store: Any) -> None:
    """Export `store`'s reload state on this process's default registry (the hub's
    /hub/metrics)."""
    _HUB_LIMITS.watch(store)
