"""What happens to a container after it stops: its GPU hold expires, later it is removed.

- `gpu_hold_after_stop` after `State.FinishedAt`, the slots of a stopped container are free.
  The allocator derives that from Docker on every decision (`GpuAllocator.holdings`); here the
  expiry is *recorded*: `GpuAllocator.sweep()` writes the `expire` event (and `hold` when a
  container stops, `release` when one is gone), and the pass reports which holds expired.
- `container_hold_after_stop` after it stopped, the container itself is removed. Its
  workspace is a mount (a bind or named volume) and `remove_container(v=False)` keeps it, so
  the next start makes a fresh container over the same files. The removal is a `release` event
  without a slot whose reason starts with `removed:`.

A never-started (`created`) container holds GPUs only through the claim of the spawn making
it (`ds01hub.gpu.allocator`); once nothing claims it, the pass's `GpuAllocator.reconcile()`
removes it. For `container_hold_after_stop` it counts as stopped from its creation. Pure
planning (`expired_holds`, `removals_due`) is separate from the pass that acts (`Lifecycle`).

A removed container that was under its user's own parent cgroup (aggregate caps, with the
site's cgroup root set) takes the parent with it when it was the user's last container, as a
delete through the hub does (`ds01hub.host.aggregate_gate.remove_unused_parent`, under the
user's lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import docker.errors

from ds01hub import labels
from ds01hub.aggregate import is_user_parent
from ds01hub.gpu.allocator import GpuAllocator
from ds01hub.gpu.eventlog import EventLog
from ds01hub.host.aggregate_gate import UserLockTimeout, remove_unused_parent, user_records
from ds01hub.host.cgroups import CgroupError
from ds01hub.hub.group_snapshot import SnapshotError, lenient_resolver
from ds01hub.labels import ContainerRecord
from ds01hub.limits import LimitsConfig, LimitsStore, ResolvedLimits
from ds01hub.provenance import Provenance
from ds01hub.units import format_duration

__all__ = ["Lifecycle", "LifecycleAction", "expired_holds", "removals_due", "stopped_records"]

log = logging.getLogger("ds01hub.services.ops.lifecycle")


@dataclass(frozen=True)
class LifecycleAction:
    """`kind`: `expire` (the GPU hold passed: slots free) or `remove` (container removed)."""

    kind: str
    user: str
    container: str
    container_id: str
    group: str | None
    slots: tuple[str, ...]
    due: datetime
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.kind,
            "user": self.user,
            "container": self.container,
            "group": self.group,
            "slots": list(self.slots),
            "due": self.due.isoformat(),
            "reason": self.reason,
        }


def _past_hold(
    records: Iterable[ContainerRecord],
    hold_of: Callable[[ContainerRecord], float | None],
    now: datetime,
    kind: str,
    explain: Callable[[ContainerRecord, float], str],
) -> list[LifecycleAction]:
    """Stopped containers whose hold (seconds after they stopped; None = forever) has passed."""
    actions = []
    for record in records:
        hold = hold_of(record)
        if record.running or record.finished_at is None or hold is None:
            continue
        due = record.finished_at + timedelta(seconds=hold)
        if due <= now:
            actions.append(
                LifecycleAction(
                    kind,
                    record.user,
                    record.name,
                    record.id,
                    record.group,
                    record.gpus,
                    due,
                    explain(record, hold),
                )
            )
    return actions


def expired_holds(
    records: Iterable[ContainerRecord],
    gpu_hold_of: Callable[[ContainerRecord], float | None],
    now: datetime,
) -> list[LifecycleAction]:
    """Stopped containers whose GPU hold has passed (None hold = held until removed)."""
    return _past_hold(
        (r for r in records if r.gpus and r.state != "created"),
        gpu_hold_of,
        now,
        "expire",
        lambda r, hold: (
            f"GPU hold expired: stopped at {r.finished_at:%Y-%m-%d %H:%M} UTC, "
            f"gpu_hold_after_stop {format_duration(hold)}"
        ),
    )


def removals_due(
    records: Iterable[ContainerRecord],
    container_hold_of: Callable[[ContainerRecord], float | None],
    now: datetime,
) -> list[LifecycleAction]:
    """Stopped containers kept longer than `container_hold_after_stop` (None = never removed)."""
    return _past_hold(
        records,
        container_hold_of,
        now,
        "remove",
        lambda r, hold: (
            f"removed: stopped at {r.finished_at:%Y-%m-%d %H:%M} UTC, "
            f"container_hold_after_stop {format_duration(hold)}; workspace kept"
        ),
    )


def stopped_records(
    client: Any, trust: Provenance, extra_labels: Iterable[str] = ()
) -> list[ContainerRecord]:
    """`trust`'s deployment's managed containers that are not running, from inspect documents
    (the list API has no `FinishedAt`); `extra_labels` (`key=value`) narrows the listing."""
    records = []
    filters = {"label": trust.label_filters(extra_labels)}
    for entry in client.api.containers(all=True, filters=filters):
        if entry.get("State") in labels.RUNNING_STATES:
            continue
        with contextlib.suppress(docker.errors.NotFound):  # removed meanwhile
            inspected = client.api.inspect_container(entry["Id"])
            record = ContainerRecord.from_docker(inspected, trust)
            if record is not None:
                records.append(record)
    return records


class Lifecycle:
    """One pass over stopped containers: record expired GPU holds, remove containers whose
    container hold passed. Uses the allocator's clock, so tests control time in one place."""

    def __init__(
        self,
        docker_client: docker.DockerClient,
        allocator: GpuAllocator,
        limits: LimitsStore | LimitsConfig,
        eventlog: EventLog | None = None,
        *,
        extra_labels: Iterable[str] = (),
        cgroup_root: str = "",
    ):
        self.docker = docker_client
        self.extra_labels = list(extra_labels)
        self.cgroup_root = cgroup_root  # "" : no per-user parents to remove
        self.allocator = allocator
        self.limits = limits
        self.eventlog = eventlog

    def _resolver(self) -> Callable[[ContainerRecord], ResolvedLimits]:
        if isinstance(self.limits, LimitsStore):
            self.limits.reload()
            config = self.limits.current
        else:
            config = self.limits
        cache: dict[tuple, ResolvedLimits] = {}
        try:  # with the hub groups' properties, as the allocator's hold times
            snapshot = self.allocator.hub_groups.current()
        except SnapshotError:
            snapshot = None
        limits_of = lenient_resolver(config, snapshot)

        def resolve(record: ContainerRecord) -> ResolvedLimits:
            key = (record.user, record.group)
            if key not in cache:
                cache[key] = limits_of(record.user, record.group)
            return cache[key]

        return resolve

    def plan(self, now: datetime | None = None) -> list[LifecycleAction]:
        """What a pass would do now: expiries not yet recorded, then removals."""
        now = now or self.allocator.clock()
        records = stopped_records(self.docker, self.allocator.trust, self.extra_labels)
        resolve = self._resolver()
        expiries = expired_holds(records, lambda r: resolve(r).gpu_hold_after_stop, now)
        if self.eventlog is not None:
            still_open = {(a.container, a.slot) for a in self.eventlog.open_allocations()}
            expiries = [a for a in expiries if any((a.container, s) in still_open for s in a.slots)]
        removals = removals_due(records, lambda r: resolve(r).container_hold_after_stop, now)
        return expiries + removals

    def run_once(self, dry_run: bool = False) -> list[LifecycleAction]:
        """Plan and (unless `dry_run`) act: each due container is removed (volumes kept) and
        its removal recorded; the allocator's reconcile removes the never-started containers
        nothing claims and records hold/expire, and the release of the removed ones' slots."""
        actions = self.plan()
        if dry_run:
            return actions
        done = [a for a in actions if a.kind == "expire"]
        for action in actions:
            if action.kind == "remove" and self._remove(action):
                done.append(action)
        now = self.allocator.clock()
        done += [
            LifecycleAction(
                "remove", a.user, a.container, a.container_id, None, a.slots, now, a.reason
            )
            for a in self.allocator.reconcile()
        ]
        return done

    def _remove(self, action: LifecycleAction) -> bool:
        try:
            parent = self._cgroup_parent(action.container_id)
            self.docker.api.remove_container(action.container_id, v=False, force=False)
        except Exception as error:  # running again, or already gone: nothing to do now
            log.info("not removing %s: %s", action.container, error)
            return False
        log.info("removed %s (%s)", action.container, action.reason)
        self._remove_user_parent(action.user, parent)
        if self.eventlog is not None:
            self.eventlog.record(
                "release",
                action.user,
                container=action.container,
                group=action.group,
                reason=action.reason,
            )
        return True

    def _cgroup_parent(self, container_id: str) -> str:
        """The container's CgroupParent when per-user parents are in use, else ""."""
        if not self.cgroup_root:
            return ""
        host = self.docker.api.inspect_container(container_id).get("HostConfig") or {}
        return str(host.get("CgroupParent") or "")

    def _remove_user_parent(self, user: str, parent: str) -> None:
        """`user`'s parent cgroup goes when their last container did (only their own per-user
        parent: a group's parent or a slice stays). The pass runs in a worker thread: the
        gate's lock is awaited on a loop of its own there."""
        if not self.cgroup_root or not is_user_parent(parent, user):
            return
        trust, api = self.allocator.trust, self.docker.api

        def records() -> list[ContainerRecord]:
            return user_records(api, trust, user, self.extra_labels)

        removing = remove_unused_parent(
            self.allocator.state_dir, user, records, self.cgroup_root, parent
        )
        try:
            removed = asyncio.run(removing)
        except (CgroupError, UserLockTimeout) as error:  # left for the next removal
            log.warning("cgroup %s of %s kept: %s", parent, user, error)
            return
        if removed:
            log.info("removed the unused cgroup parent %s of %s", parent, user)
