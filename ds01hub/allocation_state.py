"""The edges of GPU allocation: holdings from Docker labels, reservations under a file lock.

Who holds which slot is rebuilt on every decision from two sources:

- Docker: each managed container's `ds01.gpus` label. A running container holds its slots; a
  stopped one until `gpu_hold_after_stop` (of its user's limits) after `State.FinishedAt`.
- Reservations (`reservations.json` in `state_dir`): slots granted to a spawn that has not yet
  created its labelled container. Each has a TTL and the owning process's pid, so a process
  killed mid-allocation leaks nothing: its reservation is ignored as soon as the pid is gone,
  and in any case when the TTL passes.

Every read-decide-write runs under an exclusive `fcntl.flock` on `state_dir/allocator.lock`
(across processes) plus a `threading.Lock` (flock is per open file, not per thread).

Reclaim. A container's labels cannot be changed once it exists, so when a higher-priority
request takes a slot that a stopped container holds, the loss is recorded beside the labels:
`revoked.json` maps the container id to the slots it lost (and to whom); `holdings()` ignores
revoked slots, `revoked(container)` tells the spawner, whose restart re-validation then asks
for new slots, and the event log gets a `reclaim` event naming the winner. Entries disappear
with their container.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ds01hub import labels, provenance
from ds01hub.allocator import Decision, GpuRequest, Holding, decide
from ds01hub.eventlog import EventLog
from ds01hub.inventory import Inventory
from ds01hub.labels import ContainerRecord
from ds01hub.limits import LimitsConfig, LimitsStore, ResolvedLimits, parse_limits
from ds01hub.provenance import Provenance

__all__ = ["DEFAULT_RESERVATION_TTL", "GpuAllocator", "SlotStatus", "docker_lister", "utcnow"]

DEFAULT_RESERVATION_TTL = 120.0
_HOST = socket.gethostname()


def utcnow() -> datetime:
    return datetime.now(UTC)


def docker_lister(
    client: Any, extra_labels: Sequence[str] = (), *, trust: Provenance | None = None
) -> Callable[[], list[dict]]:
    """Managed containers as Docker documents: list entries for running ones, inspect
    documents for the others that carry GPUs (only inspect has `State.FinishedAt`).
    `trust` narrows the listing to its deployment, `extra_labels` further (tests); what it
    returns is still only what the labels claim (the allocator verifies)."""
    scope = trust.label_filters() if trust else [f"{labels.MANAGED}=true"]
    filters = {"label": [*scope, *extra_labels]}

    def list_managed() -> list[dict]:
        import docker.errors

        documents = []
        for entry in client.api.containers(all=True, filters=filters):
            gpus = (entry.get("Labels") or {}).get(labels.GPUS)
            if entry.get("State") in labels.RUNNING_STATES or not gpus:
                documents.append(entry)
                continue
            with contextlib.suppress(docker.errors.NotFound):  # removed meanwhile
                documents.append(client.api.inspect_container(entry["Id"]))
        return documents

    return list_managed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class SlotStatus:
    """One row of `ds01hub status`: a slot and who holds it (None = free)."""

    slot_id: str
    uuid: str
    profile: str | None
    holding: Holding | None

    def to_dict(self) -> dict:
        data = {"slot": self.slot_id, "uuid": self.uuid, "profile": self.profile}
        held = self.holding.to_dict() if self.holding else {}
        for key in ("user", "container", "state", "held_until", "priority"):
            data[key] = held.get(key)
        return data


class GpuAllocator:
    """The service object every front end (spawner, CLI broker, culler) allocates through."""

    def __init__(
        self,
        docker_client: Any,
        inventory: Inventory,
        state_dir: str | os.PathLike,
        eventlog: EventLog | None = None,
        clock: Callable[[], datetime] = utcnow,
        *,
        limits: LimitsStore | LimitsConfig | None = None,
        reservation_ttl: float = DEFAULT_RESERVATION_TTL,
        container_lister: Callable[[], list[dict]] | None = None,
        trust: Provenance | None = None,
    ):
        """`limits` gives each container's hold (`gpu_hold_after_stop` of its user), the
        strategy and `preempt_running`; `container_lister` replaces the Docker listing (for the
        benchmark's recorded snapshot); `trust` (default: the state directory's) decides which
        containers are this deployment's: only those count."""
        self.inventory = inventory
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.trust = trust or provenance.load(self.state_dir)
        self.eventlog = eventlog
        self.clock = clock
        self.reservation_ttl = reservation_ttl
        self._limits = limits
        self._list = container_lister or docker_lister(docker_client, trust=self.trust)
        self._thread_lock = threading.Lock()
        self._lock_path = self.state_dir / "allocator.lock"
        self._reservations_path = self.state_dir / "reservations.json"
        self._revoked_path = self.state_dir / "revoked.json"
        self._hold_cache: tuple[LimitsConfig | None, dict] = (None, {})
        self._parsed: dict[tuple, ContainerRecord | None] = {}

    # -- configuration ------------------------------------------------------------------------

    @property
    def config(self) -> LimitsConfig:
        if isinstance(self._limits, LimitsStore):
            # read under the allocator's lock: never wait for a changed file here (spawns
            # refresh it before they allocate); its read goes on aside
            self._limits.reload(wait=False)
            return self._limits.current
        return self._limits if self._limits is not None else parse_limits({})

    # -- the lock and the two state files ------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive across threads and processes (released by the kernel if we die)."""
        with self._thread_lock, open(self._lock_path, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _read(self, path: Path) -> dict:
        try:
            data = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write(self, path: Path, data: Mapping) -> None:
        """Atomic replace, so a crash mid-write leaves the previous file."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, sort_keys=True))
        os.replace(tmp, path)

    def _live_reservations(self, now: datetime) -> dict[str, dict]:
        live = {}
        for name, entry in self._read(self._reservations_path).items():
            if entry.get("expires", 0) <= now.timestamp():
                continue
            if entry.get("host") == _HOST and not _pid_alive(int(entry.get("pid", 0))):
                continue
            live[name] = entry
        return live

    # -- holdings ------------------------------------------------------------------------------

    def records(self) -> list[ContainerRecord]:
        """This deployment's managed containers (signature verified), parsed from Docker."""
        parsed = (ContainerRecord.from_docker(doc, self.trust) for doc in self._list())
        return [record for record in parsed if record is not None]

    def _gpu_records(self) -> list[ContainerRecord]:
        """Managed containers whose labels name GPU slots (the only ones that can hold any);
        the label is looked at before the full parse, which most containers then skip."""
        records = []
        parsed: dict[tuple, ContainerRecord | None] = {}
        for doc in self._list():
            config = doc.get("Config")
            found = config.get("Labels") if config is not None else doc.get("Labels")
            if not (found and found.get(labels.GPUS)):
                continue
            # A container's labels never change; its state, FinishedAt and name (which the
            # signature covers) may: those key the cache of parsed records, so an unchanged
            # container is not parsed (or verified) again.
            state = doc.get("State")
            key = (
                doc.get("Id"),
                doc.get("Name") or str(doc.get("Names")),
                str(state.get("Status")) + str(state.get("FinishedAt"))
                if isinstance(state, Mapping)
                else state,
            )
            record = (
                self._parsed.get(key)
                if key in self._parsed
                else ContainerRecord.from_docker(doc, self.trust)
            )
            parsed[key] = record
            if record is not None:
                records.append(record)
        self._parsed = parsed
        return records

    def _hold_of(self, record: ContainerRecord, config: LimitsConfig) -> float | None:
        """The user's gpu_hold_after_stop, cached per (user, group) while `config` is in force."""
        if self._hold_cache[0] is not config:
            self._hold_cache = (config, {})
        cache = self._hold_cache[1]
        key = (record.user, record.group)
        if key not in cache:
            groups = [record.group] if record.group else []
            cache[key] = config.resolve(record.user, groups).gpu_hold_after_stop
        return cache[key]

    def _label_holdings(
        self, records: list[ContainerRecord], now: datetime, revoked: Mapping[str, Any]
    ) -> list[Holding]:
        config = self.config
        holdings = []
        for record in records:
            if not record.gpus:
                continue
            lost = set(revoked.get(record.id, {}).get("slots", ()))
            if record.running:
                state, until = "running", None
            else:
                hold = self._hold_of(record, config)
                if record.finished_at is None:
                    until = None  # never finished (or unknown): held until removed
                elif hold is None:
                    until = None  # DS01 `gpu_hold_after_stop: null`: held until removed
                else:
                    until = record.finished_at + timedelta(seconds=hold)
                    if until <= now:
                        continue
                state = "stopped"
            holdings += [
                Holding(
                    slot,
                    record.user,
                    record.name,
                    state,
                    record.priority,
                    until,
                    record.id,
                    record.group,
                )
                for slot in record.gpus
                if slot not in lost
            ]
        return holdings

    def _snapshot(self, now: datetime) -> tuple[list[ContainerRecord], list[Holding], dict]:
        records = self._gpu_records()
        revoked = self._read(self._revoked_path)
        holdings = self._label_holdings(records, now, revoked)
        labelled = {(h.container, h.slot_id) for h in holdings}
        for name, entry in self._live_reservations(now).items():
            until = datetime.fromtimestamp(entry["expires"], UTC)
            holdings += [
                Holding(
                    slot,
                    entry["user"],
                    name,
                    "reserved",
                    entry["priority"],
                    until,
                    "",
                    entry.get("group"),
                )
                for slot in entry["slots"]
                if (name, slot) not in labelled
            ]
        return records, holdings, revoked

    def holdings(self) -> list[Holding]:
        """Every live holding: labelled containers (running, or stopped within their hold,
        minus revoked slots) and live reservations."""
        return self._snapshot(self.clock())[1]

    def status(self) -> list[SlotStatus]:
        """Each inventory slot with its holder (the first, should a slot show two)."""
        by_slot: dict[str, Holding] = {}
        for holding in self.holdings():
            by_slot.setdefault(holding.slot_id, holding)
        return [
            SlotStatus(slot.id, slot.uuid, slot.profile, by_slot.get(slot.id))
            for slot in self.inventory.slots
        ]

    def revocations(self) -> dict[str, dict]:
        """Container id -> {name, slots, by, by_container, at}: GPUs taken by a higher
        priority from stopped containers (for `ds01hub status`, container lists, the spawner)."""
        return self._read(self._revoked_path)

    def revoked(self, container: str) -> list[str]:
        """Slots taken from this container (by name or id) by a higher-priority request."""
        lost = []
        for container_id, entry in self._read(self._revoked_path).items():
            if container in (container_id, entry.get("name")):
                lost += entry.get("slots", [])
        return lost

    # -- allocate / commit / release ----------------------------------------------------------

    def allocate(self, request: GpuRequest, limits: ResolvedLimits) -> Decision:
        """Decide under the lock; on success reserve the slots for `request.container` (TTL)
        and record allocate/reclaim events."""
        with self.locked():
            now = self.clock()
            config = self.config
            records, holdings, revoked = self._snapshot(now)
            decision = decide(
                request,
                self.inventory.slots,
                holdings,
                limits,
                strategy=config.gpu_allocation.strategy,
                now=now,
                preempt_running=config.policies.preempt_running,
            )
            reservations = self._live_reservations(now)
            if decision.ok and decision.granted:
                reservations[request.container] = {
                    "user": request.user,
                    "group": limits.group,
                    "slots": list(decision.granted),
                    "priority": request.priority
                    if request.priority is not None
                    else limits.priority,
                    "expires": now.timestamp() + self.reservation_ttl,
                    "pid": os.getpid(),
                    "host": _HOST,
                }
            self._write(self._reservations_path, reservations)
            if decision.reclaimed:
                self._revoke(decision, request, revoked, records, now)
            # Sweep what existed before this decision, then log it (its new intervals are live).
            self._sweep(records, holdings, now)
            self._log_decision(decision, request, limits, now)
        return decision

    def _revoke(
        self,
        decision: Decision,
        request: GpuRequest,
        revoked: dict,
        records: list[ContainerRecord],
        now: datetime,
    ) -> None:
        present = {record.id for record in records}
        revoked = {cid: entry for cid, entry in revoked.items() if cid in present}
        for holding in decision.reclaimed:
            entry = revoked.setdefault(
                holding.container_id, {"name": holding.container, "slots": []}
            )
            entry["slots"] = sorted(set(entry["slots"]) | {holding.slot_id})
            entry.update(by=request.user, by_container=request.container, at=now.isoformat())
        self._write(self._revoked_path, revoked)

    def _log_decision(
        self, decision: Decision, request: GpuRequest, limits: ResolvedLimits, now: datetime
    ) -> None:
        if self.eventlog is None:
            return
        for holding in decision.reclaimed:
            self.eventlog.record(
                "reclaim",
                holding.user,
                slot=holding.slot_id,
                container=holding.container,
                group=holding.group,
                reason=f"taken by {request.user} ({request.container}, priority "
                f"{request.priority or limits.priority} > {holding.priority}) while "
                f"{holding.state}",
                at=now,
            )
        for slot in decision.granted:
            self.eventlog.record(
                "allocate",
                request.user,
                slot=slot,
                container=request.container,
                group=limits.group,
                reason=f"priority {request.priority or limits.priority}",
                at=now,
            )

    def _sweep(
        self, records: list[ContainerRecord], holdings: list[Holding], now: datetime
    ) -> None:
        """Close or mark the event log's open intervals that Docker no longer backs:
        stopped -> `hold`, hold passed -> `expire`, container or reservation gone -> `release`."""
        if self.eventlog is None:
            return
        live = {(h.container, h.slot_id): h for h in holdings}
        labelled = {(r.name, slot) for r in records for slot in r.gpus}
        for interval in self.eventlog.open_allocations():
            key = (interval.container, interval.slot)
            holding = live.get(key)
            if holding is None:
                if key in labelled:
                    kind, reason = "expire", "GPU hold after stop expired"
                else:
                    kind, reason = "release", "container removed or reservation lapsed"
            elif holding.state == "stopped" and interval.last_kind != "hold":
                until = holding.held_until
                kind = "hold"
                reason = "stopped; holds the slot " + (
                    f"until {until:%Y-%m-%d %H:%M} UTC" if until else "until removed"
                )
            else:
                continue
            self.eventlog.record(
                kind,
                interval.user,
                slot=interval.slot,
                container=interval.container,
                group=interval.group,
                reason=reason,
                at=now,
            )

    def commit(self, container_name: str) -> None:
        """The container now exists with `ds01.gpus`: its labels hold the slots from here on."""
        with self.locked():
            reservations = self._read(self._reservations_path)
            if reservations.pop(container_name, None) is not None:
                self._write(self._reservations_path, reservations)

    def release(self, container_name: str, reason: str = "released") -> None:
        """Forget a reservation (spawn failed or cancelled) and log the release of every slot
        the container still has open in the event log."""
        with self.locked():
            reservations = self._read(self._reservations_path)
            if reservations.pop(container_name, None) is not None:
                self._write(self._reservations_path, reservations)
            if self.eventlog is None:
                return
            for interval in self.eventlog.open_allocations():
                if interval.container == container_name:
                    self.eventlog.record(
                        "release",
                        interval.user,
                        slot=interval.slot,
                        container=container_name,
                        group=interval.group,
                        reason=reason,
                        at=self.clock(),
                    )

    def sweep(self) -> None:
        """Bring the event log in line with Docker (the culler calls this periodically)."""
        with self.locked():
            now = self.clock()
            records, holdings, _ = self._snapshot(now)
            self._sweep(records, holdings, now)

    def end_hold(self, container_id: str, reason: str) -> list[str]:
        """A stopped container gives its GPU slots back now instead of at the end of its
        `gpu_hold_after_stop`: its server is gone and its user did not stop it (the Docker
        engine stopped under it; ds01hub.spawner.recovery). Recorded beside the labels as a
        reclaim is (`revoked.json`, with `reason` and no winner), so its next start asks for
        slots again; each slot's open interval gets a `release` event. A running container
        keeps its slots. Returns the slots given back."""
        with self.locked():
            now = self.clock()
            records, holdings, revoked = self._snapshot(now)
            mine = [h for h in holdings if h.container_id == container_id and h.state == "stopped"]
            if not mine:
                return []
            present = {record.id for record in records}
            revoked = {cid: entry for cid, entry in revoked.items() if cid in present}
            entry = revoked.setdefault(container_id, {"name": mine[0].container, "slots": []})
            entry["slots"] = sorted(set(entry["slots"]) | {h.slot_id for h in mine})
            entry.update(reason=reason, at=now.isoformat())
            self._write(self._revoked_path, revoked)
            slots = {h.slot_id for h in mine}
            for interval in self.eventlog.open_allocations() if self.eventlog else ():
                if interval.container == mine[0].container and interval.slot in slots:
                    self.eventlog.record(
                        "release",
                        interval.user,
                        slot=interval.slot,
                        container=interval.container,
                        group=interval.group,
                        reason=reason,
                        at=now,
                    )
        return sorted(slots)
