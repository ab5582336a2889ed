"""The edges of GPU allocation: holdings from Docker labels, claims under a file lock.

Exclusivity is the invariant this module keeps (docs/architecture.md, "Allocation state",
states it in full): **at no moment do two containers run on one slot.** Who holds which slot is
rebuilt on every decision from two sources:

- Docker: each managed container's `ds01.gpus` label. A running container holds its slots; a
  stopped one until `gpu_hold_after_stop` (of its user's limits) after `State.FinishedAt`,
  minus the slots a higher priority took from it (`revoked.json`). A never-started (`created`)
  container holds through the claim of its name (below), or, without one, while the process
  that created it lives (its `ds01.owner` label: another hub's spawn on the same engine). One
  that neither keeps is a *ghost*: it is removed (never forced, so a start that lands first
  wins) before anything else is decided, and its slots are free.
- Claims (`reservations.json`): slots granted to a spawn, keyed by container name, from
  `allocate` until the container has started. A claim belongs to a process (host, boot, pid and
  the pid's start time, so a reused pid is not its owner) and dies with it; `granted` claims
  also lapse at their TTL unless `renew`ed (a spawn that is still pulling an image renews).
  `begin_start` checks, under the lock, that the container's slots are its own alone and turns
  the claim into `starting`, which outlives its owner for `start_grace` seconds: a `docker start`
  sent just before its sender was killed may still land. The claim ends when the container is
  seen running (or to have run) on the claimed slots, when its container is gone, or at
  `release`.

Every read-decide-write runs under an exclusive `fcntl.flock` on `state_dir/allocator.lock`
(across processes) plus a `threading.Lock` (flock is per open file, not per thread). A call
that fails (a full disk, an unwritable state directory) leaves the state as it was: the new
claim, the revocations and the decision's events are written all together or not at all.

Reclaim. A container's labels cannot be changed once it exists, so when a higher-priority
request takes a slot that a stopped container holds, the loss is recorded beside the labels:
`revoked.json` maps the container id to the slots it lost (and to whom); holdings ignore
revoked slots of stopped containers (a running one still uses them: it holds them until it
stops), `revoked(container)` tells the spawner, whose restart re-validation then asks for new
slots, and the event log gets a `reclaim` event naming the winner. Entries disappear with their
container.

Fair share. With `gpu_allocation.fairshare`, priorities in the decision are effective ones
(`gpu.fairshare`), computed from the event log's intervals at most every `fair_share_refresh`
seconds of the clock (usage decays over days: seconds of lag change nothing).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import docker.errors

from ds01hub import labels, paths, provenance
from ds01hub.engine import engine_unreachable
from ds01hub.errors import Ds01hubError
from ds01hub.gpu.decision import Decision, GpuRequest, Holding, decide, describe_holding
from ds01hub.gpu.eventlog import EventLog, EventLogError, NewEvent
from ds01hub.gpu.fairshare import FairShare, relevant_since
from ds01hub.gpu.inventory import Inventory
from ds01hub.hub.group_snapshot import (
    GroupSnapshot,
    SnapshotError,
    SnapshotReader,
    lenient_resolver,
)
from ds01hub.labels import ContainerRecord
from ds01hub.limits import (
    FairShareConfig,
    LimitsConfig,
    LimitsStore,
    ResolvedLimits,
    parse_limits,
)
from ds01hub.provenance import Provenance
from ds01hub.units import utcnow

__all__ = [
    "DEFAULT_RESERVATION_TTL",
    "DEFAULT_START_GRACE",
    "CREATOR_LABEL",
    "AllocationStateError",
    "Claim",
    "GpuAllocator",
    "Owner",
    "ReconcileAction",
    "SlotStatus",
    "StartCheck",
    "docker_lister",
    "docker_remover",
]

DEFAULT_RESERVATION_TTL = 120.0
DEFAULT_START_GRACE = 60.0
#: Label naming the process that created a container (`Owner.label()`), set (and signed) by
#: its creator.
CREATOR_LABEL = labels.CREATOR
_HOST = socket.gethostname()
#: Holding states, strongest first: one container's several claims on a slot show as one.
_STRENGTH = {"running": 0, "starting": 1, "reserved": 2, "stopped": 3}


class AllocationStateError(Ds01hubError, RuntimeError):
    """The allocation state could not be written (nothing was changed); names the path and
    the reason."""

    status = 500  # the host's failure, not the caller's


def _read_boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


_BOOT_ID = _read_boot_id()


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of a local process, from
    /proc/PID/stat; None when there is no such process (or no /proc)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class Owner:
    """The process a claim belongs to. The pid's start time tells a reused pid apart, the boot
    id a reboot; on another host nothing can be told (None: the claim's TTL decides)."""

    host: str
    boot: str
    pid: int
    started: int | None = None

    @classmethod
    def of(cls, pid: int) -> Owner:
        """The local process `pid` as it is now."""
        stat = _proc_stat(pid)
        return cls(_HOST, _BOOT_ID, pid, stat[1] if stat else None)

    @classmethod
    def current(cls) -> Owner:
        return cls.of(os.getpid())

    def alive(self) -> bool | None:
        if self.host != _HOST:
            return None
        if self.boot and _BOOT_ID and self.boot != _BOOT_ID:
            return False
        stat = _proc_stat(self.pid)
        if stat is None:
            return _pid_exists(self.pid)
        state, started = stat
        if state in ("Z", "X"):  # killed, not yet reaped: it will never act again
            return False
        return self.started is None or started == self.started

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "boot": self.boot, "pid": self.pid, "started": self.started}

    def label(self) -> str:
        """`host/boot/pid/started`, the value of `CREATOR_LABEL`."""
        return f"{self.host}/{self.boot}/{self.pid}/{'' if self.started is None else self.started}"

    @classmethod
    def from_label(cls, text: str | None) -> Owner | None:
        """None for a missing or malformed label."""
        parts = (text or "").split("/")
        if len(parts) != 4 or not parts[2].isdigit() or not (parts[3] or "0").isdigit():
            return None
        return cls(parts[0], parts[1], int(parts[2]), int(parts[3]) if parts[3] else None)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Owner:
        started = data.get("started")
        return cls(
            str(data["host"]),
            str(data["boot"]),
            int(data["pid"]),
            None if started is None else int(started),
        )


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Claim:
    """Slots granted to container `name` until it has started (see the module docstring).
    `phase`: `granted` (lives with its owner, until `expires` unless renewed), `committed`
    (the caller said the container exists: lives with its owner while the container has
    never started), `starting`
    (checked by `begin_start`: lives until `expires` whatever happens to its owner).
    `since`: when the phase began (epoch seconds)."""

    name: str
    user: str
    group: str | None
    slots: tuple[str, ...]
    priority: int
    owner: Owner
    expires: float
    phase: str = "granted"
    since: float = 0.0
    container_id: str = ""

    def holding_state(self) -> str:
        return "starting" if self.phase == "starting" else "reserved"

    def to_dict(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "group": self.group,
            "slots": list(self.slots),
            "priority": self.priority,
            "owner": self.owner.to_dict(),
            "expires": self.expires,
            "phase": self.phase,
            "since": self.since,
            "container_id": self.container_id,
        }

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> Claim | None:
        """None for an entry this version cannot read (it then holds nothing)."""
        try:
            return cls(
                name=name,
                user=str(data["user"]),
                group=data.get("group"),
                slots=tuple(str(s) for s in data["slots"]),
                priority=int(data["priority"]),
                owner=Owner.from_dict(data["owner"]),
                expires=float(data["expires"]),
                phase=str(data.get("phase", "granted")),
                since=float(data.get("since", 0.0)),
                container_id=str(data.get("container_id", "")),
            )
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class StartCheck:
    """`begin_start`'s answer. `code`: ok, gone (no such container), lost (its claim lapsed or
    belongs to another process), mismatch (its labels name other slots than its claim),
    reclaimed (a higher priority took a slot of it), busy (another container runs on, or
    another spawn claims, one of its slots). `stop_first`: ids of running containers that a
    higher priority preempted from these slots (`preempt_running`): stop them, check again."""

    ok: bool
    code: str = "ok"
    reason: str = ""
    stop_first: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReconcileAction:
    """What `reconcile` (or an allocation) did about a container nothing owns any more."""

    kind: str  # "removed"
    container: str
    container_id: str
    user: str
    slots: tuple[str, ...]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "container": self.container,
            "container_id": self.container_id,
            "user": self.user,
            "slots": list(self.slots),
            "reason": self.reason,
        }


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


def docker_remover(client: Any) -> Callable[[str], bool]:
    """Remove a never-started container: True when it is gone, False when it cannot be
    removed because it started meanwhile (never forced: Docker orders the two on the
    container's own lock, so a late `docker start` either lands first or finds nothing)."""

    def remove(container_id: str) -> bool:
        try:
            client.api.remove_container(container_id, v=True)
        except docker.errors.NotFound:
            return True
        except docker.errors.APIError as error:
            if error.status_code == 409:
                return False
            raise
        return True

    return remove


@dataclass(frozen=True)
class SlotStatus:
    """One row of `ds01hub status`: a slot, its holder (None = free) and every holder should
    there be more than one container (`conflict`: shown, never hidden)."""

    slot_id: str
    uuid: str
    profile: str | None
    holding: Holding | None
    holders: tuple[Holding, ...] = ()

    @property
    def conflict(self) -> bool:
        return len({h.container for h in self.holders}) > 1

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"slot": self.slot_id, "uuid": self.uuid, "profile": self.profile}
        held = self.holding.to_dict() if self.holding else {}
        for key in ("user", "container", "state", "held_until", "priority"):
            data[key] = held.get(key)
        data["conflict"] = self.conflict
        data["holders"] = [h.to_dict() for h in self.holders]
        return data


@dataclass
class _View:
    """One consistent reading of Docker and the state files."""

    records: list[ContainerRecord]
    claims: dict[str, Claim]  # live ones only
    stored_claims: dict[str, Claim]  # as on disk (dead ones too)
    revoked: dict[str, Any]
    holdings: list[Holding] = field(default_factory=list)
    ghosts: list[ContainerRecord] = field(default_factory=list)

    def record(self, container_id: str) -> ContainerRecord | None:
        return next((r for r in self.records if r.id == container_id), None)


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
        start_grace: float = DEFAULT_START_GRACE,
        container_lister: Callable[[], list[dict]] | None = None,
        container_remover: Callable[[str], bool] | None = None,
        owner: Callable[[], Owner] = Owner.current,
        owner_alive: Callable[[Owner], bool | None] = Owner.alive,
        trust: Provenance | None = None,
    ):
        """`limits` gives each container's hold (`gpu_hold_after_stop` of its user), the
        strategy and `preempt_running`; `container_lister` / `container_remover` replace the
        Docker calls, `owner` / `owner_alive` the process identity (the benchmark's recorded
        snapshot; tests that play several processes in one); `trust` (default: the state
        directory's) decides which containers are this deployment's: only those count."""
        self.inventory = inventory
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.trust = trust or provenance.load(self.state_dir)
        self.eventlog = eventlog
        self.clock = clock
        self.reservation_ttl = reservation_ttl
        self.start_grace = start_grace
        self._limits = limits
        self._list = container_lister or docker_lister(docker_client, trust=self.trust)
        self._remove = container_remover or docker_remover(docker_client)
        self._owner = owner
        self._owner_alive = owner_alive
        self._thread_lock = threading.Lock()
        self._lock_path = self.state_dir / "allocator.lock"
        self._claims_path = self.state_dir / "reservations.json"
        self._revoked_path = self.state_dir / "revoked.json"
        self._hold_cache: tuple[LimitsConfig | None, GroupSnapshot | None, dict] = (None, None, {})
        # hold times with the hub groups' properties (ds01hub.hub.group_snapshot)
        self.hub_groups = SnapshotReader(paths.hub_groups_snapshot(self.state_dir))
        self._fair_cache: tuple[float, FairShareConfig, FairShare] | None = None
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

    #: Seconds a fair-share computation (the event log read, the decayed usage) is reused.
    fair_share_refresh = 30.0

    def fair_share(self, now: datetime | None = None) -> FairShare:
        """Everyone's fair-share factor at `now` (default: the clock); off (no effect) when
        `gpu_allocation.fairshare` is not configured or there is no event log. Reused for
        `fair_share_refresh` seconds of the clock: usage decays over days, so a lag of
        seconds changes no order, and a queue round asks once per waiter."""
        config = self.config.gpu_allocation.fairshare
        if config is None or self.eventlog is None:
            return FairShare()
        moment = (now or self.clock()).timestamp()
        cached = self._fair_cache
        fresh = cached is not None and cached[0] <= moment < cached[0] + self.fair_share_refresh
        if cached is not None and fresh and cached[1] == config:
            return cached[2]
        since = relevant_since(moment, config.half_life)
        intervals = self.eventlog.intervals(since=_moment(since), until=_moment(moment))
        fair = FairShare.compute(config, intervals, moment)
        self._fair_cache = (moment, config, fair)
        return fair

    # -- the lock and the state files ----------------------------------------------------------

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

    def _stored_claims(self) -> dict[str, Claim]:
        claims = {}
        for name, entry in self._read(self._claims_path).items():
            claim = Claim.from_dict(name, entry) if isinstance(entry, Mapping) else None
            if claim is not None:
                claims[name] = claim
        return claims

    def _stage(self, path: Path, data: Mapping) -> Path:
        """Write `data` beside `path` (replaced in `_commit`); nothing is left on failure."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            tmp.write_text(json.dumps(data, sort_keys=True))
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def _commit(
        self,
        claims: Mapping[str, Claim] | None,
        revoked: Mapping[str, Any] | None = None,
        events: Sequence[NewEvent] = (),
    ) -> None:
        """Claims, revocations and events, all or nothing: the files are staged, the events
        written in one transaction, then the files replaced (a rename needs no new space)."""
        staged: list[tuple[Path, Path]] = []
        try:
            if claims is not None:
                data = {name: claim.to_dict() for name, claim in claims.items()}
                staged.append((self._stage(self._claims_path, data), self._claims_path))
            if revoked is not None:
                staged.append((self._stage(self._revoked_path, revoked), self._revoked_path))
            if events and self.eventlog is not None:
                self.eventlog.record_many(events)
        except (OSError, EventLogError) as error:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
            raise AllocationStateError(
                f"the GPU allocation state in {self.state_dir} could not be written, so nothing "
                f"was changed: {error}"
            ) from error
        for tmp, path in staged:
            os.replace(tmp, path)

    def _log_facts(self, events: Sequence[NewEvent]) -> None:
        """Events of what already happened (a hold, an expiry, a removed ghost): they wait in
        this process when the log cannot take them now (EventLog `defer`)."""
        if events and self.eventlog is not None:
            self.eventlog.record_many(events, defer=True)

    # -- claims --------------------------------------------------------------------------------

    def _claim_live(
        self, claim: Claim, record: ContainerRecord | None, ids: set[str], now: datetime
    ) -> bool:
        if record is not None and set(record.gpus) == set(claim.slots):
            if _has_run(record, claim):
                return False  # started on the claimed slots: its labels hold from here on
            if claim.phase == "committed" and record.state != "created":
                return False  # committed for a container that has run: its labels hold
        if claim.phase == "starting":
            if claim.container_id and claim.container_id not in ids:
                return False  # its container is gone: it can never start
            return claim.expires > now.timestamp()
        alive = self._owner_alive(claim.owner)
        if alive is None:  # another host: only the TTL can tell
            return claim.expires > now.timestamp()
        if claim.phase == "committed":
            return alive
        return alive and claim.expires > now.timestamp()

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
        """The user's gpu_hold_after_stop (with their hub groups' properties), cached per
        (user, group) while `config` and the hub-groups snapshot are in force. A snapshot
        that cannot be believed gives the file's hold times (the doors refuse meanwhile)."""
        try:
            snapshot = self.hub_groups.current()
        except SnapshotError:
            snapshot = None
        if self._hold_cache[0] is not config or self._hold_cache[1] is not snapshot:
            self._hold_cache = (config, snapshot, {})
        cache = self._hold_cache[2]
        key = (record.user, record.group)
        if key not in cache:
            resolve = lenient_resolver(config, snapshot)
            cache[key] = resolve(record.user, record.group).gpu_hold_after_stop
        return cache[key]

    def _label_holdings(
        self,
        records: list[ContainerRecord],
        now: datetime,
        revoked: Mapping[str, Any],
        kept_ghosts: set[str],
    ) -> list[Holding]:
        config = self.config
        holdings = []
        for record in records:
            if not record.gpus:
                continue
            lost = set(revoked.get(record.id, {}).get("slots", ()))
            if record.running:
                # Revoked or not, a running container uses its slots until it stops.
                state, until, slots = "running", None, record.gpus
            elif record.state == "created":
                if record.id not in kept_ghosts:
                    continue  # never started: held through its claim, or while its creator lives
                # Its creator lives, or Docker would not remove it: it may start any moment.
                state, until, slots = "starting", None, record.gpus
            else:
                hold = self._hold_of(record, config)
                if record.finished_at is None or hold is None:
                    until = None  # unknown stop time, or `gpu_hold_after_stop: null`
                else:
                    until = record.finished_at + timedelta(seconds=hold)
                    if until <= now:
                        continue
                state, slots = "stopped", tuple(s for s in record.gpus if s not in lost)
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
                for slot in slots
            ]
        return holdings

    def _view(self, now: datetime, kept_ghosts: Iterable[str] = ()) -> _View:
        records = self._gpu_records()
        by_name = {r.name: r for r in records}
        ids = {r.id for r in records}
        stored = self._stored_claims()
        claims = {
            name: claim
            for name, claim in stored.items()
            if self._claim_live(claim, by_name.get(name), ids, now)
        }
        revoked = self._read(self._revoked_path)
        kept = set(kept_ghosts) | {
            r.id
            for r in records
            if r.state == "created" and r.name not in claims and self._creator_lives(r)
        }
        holdings = self._label_holdings(records, now, revoked, kept)
        for name, claim in claims.items():
            record = by_name.get(name)
            until = None if claim.phase == "committed" else _moment(claim.expires)
            holdings += [
                Holding(
                    slot,
                    claim.user,
                    name,
                    claim.holding_state(),
                    claim.priority,
                    until,
                    record.id if record else claim.container_id,
                    claim.group,
                )
                for slot in claim.slots
            ]
        ghosts = [
            r for r in records if r.state == "created" and r.name not in claims and r.id not in kept
        ]
        return _View(records, claims, stored, revoked, _strongest(holdings), ghosts)

    def _settled_view(self, now: datetime) -> tuple[_View, list[NewEvent], list[ReconcileAction]]:
        """A view in which every ghost has been removed (or, when Docker would not, still
        holds its slots), with the events and actions of the removals."""
        view = self._view(now)
        if not view.ghosts:
            return view, [], []
        actions, kept = [], []
        for ghost in view.ghosts:
            try:
                removed = self._remove(ghost.id)
            except Exception:  # noqa: BLE001 - any engine failure: the ghost keeps its slots
                removed = False
            if removed:
                actions.append(
                    ReconcileAction(
                        "removed",
                        ghost.name,
                        ghost.id,
                        ghost.user,
                        ghost.gpus,
                        "removed: never started and no spawn owns it any more (its spawn "
                        "was killed or gave up); its GPU slot(s) are free",
                    )
                )
            else:
                kept.append(ghost.id)
        events = [
            NewEvent("reconcile", a.user, container=a.container, reason=a.reason, at=now)
            for a in actions
        ]
        return self._view(now, kept), events, actions

    def _creator_lives(self, record: ContainerRecord) -> bool:
        owner = Owner.from_label(record.labels.get(CREATOR_LABEL))
        return owner is not None and self._owner_alive(owner) is not False

    def creator_label(self) -> str:
        """The `CREATOR_LABEL` value a creator puts on each container it makes (see the module
        docstring)."""
        return self._owner().label()

    def holdings(self) -> list[Holding]:
        """Every live holding: labelled containers (running, or stopped within their hold,
        minus revoked slots) and live claims; one per (container, slot), the strongest."""
        return self._view(self.clock()).holdings

    def ghosts(self) -> list[ContainerRecord]:
        """Never-started containers that no live claim owns (`reconcile` removes them)."""
        return self._view(self.clock()).ghosts

    def status(self) -> list[SlotStatus]:
        """Each inventory slot with its holders, strongest first."""
        by_slot: dict[str, list[Holding]] = {}
        for holding in self.holdings():
            by_slot.setdefault(holding.slot_id, []).append(holding)
        rows = []
        for slot in self.inventory.slots:
            holders = sorted(by_slot.get(slot.id, ()), key=lambda h: _STRENGTH[h.state])
            rows.append(
                SlotStatus(
                    slot.id,
                    slot.uuid,
                    slot.profile,
                    holders[0] if holders else None,
                    tuple(holders),
                )
            )
        return rows

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

    # -- allocate / renew / begin_start / commit / release -------------------------------------

    def allocate(self, request: GpuRequest, limits: ResolvedLimits) -> Decision:
        """Decide under the lock; on success claim the slots for `request.container` (owned
        by this process, `reservation_ttl` unless renewed) and record allocate/reclaim events.
        Raises AllocationStateError (nothing changed) when the state cannot be written."""
        with self.locked():
            now = self.clock()
            config = self.config
            view, facts, _ = self._settled_view(now)
            fair = self.fair_share(now)
            decision = self._someone_elses(view.claims.get(request.container)) or decide(
                request,
                self.inventory.slots,
                view.holdings,
                limits,
                strategy=config.gpu_allocation.strategy,
                now=now,
                preempt_running=config.policies.preempt_running,
                fair=fair,
            )
            claims = dict(view.claims)
            if decision.ok and decision.granted:
                claims[request.container] = Claim(
                    name=request.container,
                    user=request.user,
                    group=limits.group,
                    slots=decision.granted,
                    priority=request.priority if request.priority is not None else limits.priority,
                    owner=self._owner(),
                    expires=now.timestamp() + self.reservation_ttl,
                    since=now.timestamp(),
                )
            revoked = (
                self._revoked_after(decision, request, view, now) if decision.reclaimed else None
            )
            # What existed before this decision is swept first; its own intervals are live.
            self._log_facts(facts + self._sweep_events(view, now))
            changed = claims if claims != view.stored_claims or decision.granted else None
            events = self._decision_events(decision, request, limits, now, fair)
            self._commit(changed, revoked, events)
        return decision

    def _someone_elses(self, claim: Claim | None) -> Decision | None:
        """A live claim of another process on the same container: it is starting it (or a
        start it sent before it died may still land), so this request waits (`busy`)."""
        if claim is None or claim.owner == self._owner():
            return None
        return Decision(
            reason=f"{claim.name} is being started by another process (pid {claim.owner.pid} "
            f"on {claim.owner.host}, {claim.phase}); its claim on GPU slot(s) "
            f"{', '.join(claim.slots)} ends when that start is done or can no longer land",
            code="busy",
            earliest_expiry=_moment(claim.expires),
        )

    def renew(self, container_name: str) -> bool:
        """Push this process's claim for the container `reservation_ttl` further (a spawn that
        is still working: pulling an image, creating). False when it holds none any more (it
        lapsed or another process took it over): the spawn must not start on those slots."""
        with self.locked():
            now = self.clock().timestamp()
            claims = self._stored_claims()
            claim = claims.get(container_name)
            if claim is None or claim.owner != self._owner():
                return False
            if claim.phase != "committed" and claim.expires <= now:
                return False
            claims[container_name] = replace(
                claim, expires=max(claim.expires, now + self.reservation_ttl)
            )
            self._commit(claims)
            return True

    def begin_start(self, container_name: str, container_id: str) -> StartCheck:
        """Check, under the lock, that the container may start now: this process's live
        claim names exactly the container's labelled slots, none of them was reclaimed from
        it, no other container runs on one and no other spawn claims one. Then the claim
        becomes `starting` (it covers the window until Docker has started the container, and
        outlives this process for `start_grace` seconds). Call `docker start` only on `ok`."""
        with self.locked():
            now = self.clock()
            view, facts, _ = self._settled_view(now)
            self._log_facts(facts)
            check, claim = self._start_check(view, container_name, container_id)
            if not check.ok or claim is None:
                return check
            claims = dict(view.claims)
            claims[container_name] = replace(
                claim,
                phase="starting",
                since=now.timestamp(),
                container_id=container_id,
                expires=max(claim.expires, now.timestamp() + self.start_grace),
            )
            self._commit(claims)
            return check

    def _start_check(
        self, view: _View, name: str, container_id: str
    ) -> tuple[StartCheck, Claim | None]:
        record = view.record(container_id)
        if record is None:
            return StartCheck(False, "gone", f"container {name} no longer exists"), None
        slots = set(record.gpus)
        claim = view.claims.get(name)
        shown = ", ".join(record.gpus)
        if claim is None or claim.owner != self._owner():
            whose = "lapsed" if claim is None else "belongs to another process"
            return StartCheck(
                False,
                "lost",
                f"the claim on GPU slot(s) {shown} for {name} {whose} before it could start",
            ), None
        if slots != set(claim.slots):
            return StartCheck(
                False,
                "mismatch",
                f"{name} is labelled with GPU slot(s) {shown} but was granted "
                f"{', '.join(claim.slots)}",
            ), None
        lost = slots & set(view.revoked.get(record.id, {}).get("slots", ()))
        if lost:
            return StartCheck(
                False,
                "reclaimed",
                f"GPU slot(s) {', '.join(sorted(lost))} of {name} were reclaimed by a higher "
                "priority",
            ), None
        others = [
            h
            for h in view.holdings
            if h.slot_id in slots
            and h.container != name
            and h.state in ("running", "starting", "reserved")
        ]
        if others:
            preempted = tuple(
                sorted(
                    {
                        h.container_id
                        for h in others
                        if h.state == "running"
                        and h.slot_id in view.revoked.get(h.container_id, {}).get("slots", ())
                    }
                )
            )
            listing = "; ".join(describe_holding(h) for h in others)
            return StartCheck(False, "busy", f"in use: {listing}", preempted), None
        return StartCheck(True), claim

    def commit(self, container_name: str) -> None:
        """The caller's container exists with its `ds01.gpus` labels. After `begin_start` and
        a `docker start` that returned, the claim ends (the running container's labels hold).
        Otherwise (committed at create) the claim lives as long as this process does and
        ends once Docker shows the container has run on those slots."""
        with self.locked():
            claims = self._stored_claims()
            claim = claims.get(container_name)
            if claim is None:
                return
            if claim.phase == "starting":
                del claims[container_name]
            else:
                claims[container_name] = replace(claim, phase="committed")
            self._commit(claims)

    def release(self, container_name: str, reason: str = "released") -> None:
        """Drop the container's claim (spawn failed, cancelled, server deleted) and release,
        in the event log, every slot it no longer holds otherwise (a stopped container keeps
        its labelled slots for its hold). The slot is freed even if the event log cannot be
        written (the events then wait: EventLog `defer`)."""
        with self.locked():
            now = self.clock()
            claims = self._stored_claims()
            dropped = claims.pop(container_name, None)
            if dropped is not None:
                self._commit(claims)
            try:
                view = self._view(now)
            except Exception as error:
                if not engine_unreachable(error):
                    raise
                # The engine is away, and its containers with it (it stops them when it
                # stops): every open interval of this one ends now.
                self._log_facts(self._release_events(container_name, reason, now))
                return
            self._log_facts(self._sweep_events(view, now, only=container_name, reason=reason))

    def reconcile(self) -> list[ReconcileAction]:
        """Remove the ghosts (never-started containers that no live claim owns) and bring the
        event log in line with Docker; what was done, each with a `reconcile` event. Run at
        hub start (ds01-ops), on each lifecycle pass and by `ds01hub status`."""
        with self.locked():
            now = self.clock()
            view, facts, actions = self._settled_view(now)
            self._log_facts(facts + self._sweep_events(view, now))
            if view.claims != view.stored_claims:
                self._commit(view.claims)
        return actions

    def sweep(self) -> None:
        """Bring the event log in line with Docker (the culler calls this periodically)."""
        with self.locked():
            now = self.clock()
            view = self._view(now)
            self._log_facts(self._sweep_events(view, now))

    def end_hold(self, container_id: str, reason: str) -> list[str]:
        """A stopped container gives its GPU slots back now instead of at the end of its
        `gpu_hold_after_stop`: its server is gone and its user did not stop it (the Docker
        engine stopped under it; ds01hub.spawner.recovery). Recorded beside the labels as a
        reclaim is (`revoked.json`, with `reason` and no winner), so its next start asks for
        slots again; each slot's open interval gets a `release` event. A running container
        keeps its slots (so does one being restarted: its claim holds them). Returns the
        slots given back."""
        with self.locked():
            now = self.clock()
            view = self._view(now)
            mine = [
                h for h in view.holdings if h.container_id == container_id and h.state == "stopped"
            ]
            if not mine:
                return []
            present = {record.id for record in view.records}
            revoked = {cid: entry for cid, entry in view.revoked.items() if cid in present}
            entry = revoked.setdefault(container_id, {"name": mine[0].container, "slots": []})
            slots = {h.slot_id for h in mine}
            entry["slots"] = sorted(set(entry["slots"]) | slots)
            entry.update(reason=reason, at=now.isoformat())
            events = [
                event
                for event in self._release_events(mine[0].container, reason, now)
                if event.slot in slots
            ]
            self._commit(None, revoked, events)
        return sorted(slots)

    # -- events --------------------------------------------------------------------------------

    def _revoked_after(
        self, decision: Decision, request: GpuRequest, view: _View, now: datetime
    ) -> dict:
        present = {record.id for record in view.records}
        revoked = {cid: entry for cid, entry in view.revoked.items() if cid in present}
        for holding in decision.reclaimed:
            entry = revoked.setdefault(
                holding.container_id, {"name": holding.container, "slots": []}
            )
            entry["slots"] = sorted(set(entry["slots"]) | {holding.slot_id})
            entry.update(by=request.user, by_container=request.container, at=now.isoformat())
        return revoked

    @staticmethod
    def _decision_events(
        decision: Decision,
        request: GpuRequest,
        limits: ResolvedLimits,
        now: datetime,
        fair: FairShare,
    ) -> list[NewEvent]:
        priority = fair.effective(request.user, request.priority or limits.priority)
        events = [
            NewEvent(
                "reclaim",
                holding.user,
                slot=holding.slot_id,
                container=holding.container,
                group=holding.group,
                reason=f"taken by {request.user} ({request.container}, priority "
                f"{priority:g} > {fair.effective(holding.user, holding.priority):g}) "
                f"while {holding.state}",
                at=now,
            )
            for holding in decision.reclaimed
        ]
        events += [
            NewEvent(
                "allocate",
                request.user,
                slot=slot,
                container=request.container,
                group=limits.group,
                reason=f"priority {priority:g}",
                at=now,
            )
            for slot in decision.granted
        ]
        return events

    def _release_events(self, container: str, reason: str, now: datetime) -> list[NewEvent]:
        """A `release` for every open interval of `container`."""
        return [
            NewEvent(
                "release",
                interval.user,
                slot=interval.slot,
                container=interval.container,
                group=interval.group,
                reason=reason,
                at=now,
            )
            for interval in (self.eventlog.open_allocations() if self.eventlog else ())
            if interval.container == container
        ]

    def _sweep_events(
        self, view: _View, now: datetime, only: str | None = None, reason: str | None = None
    ) -> list[NewEvent]:
        """The event log's open intervals that Docker and the claims no longer back:
        stopped -> `hold`, hold passed -> `expire`, container or claim gone -> `release`
        (with `reason` when given). `only`: one container's intervals."""
        if self.eventlog is None:
            return []
        live = {(h.container, h.slot_id): h for h in view.holdings}
        labelled = {(r.name, slot) for r in view.records if r.state != "created" for slot in r.gpus}
        events = []
        for interval in self.eventlog.open_allocations():
            if only is not None and interval.container != only:
                continue
            key = (interval.container, interval.slot)
            holding = live.get(key)
            if holding is None:
                if key in labelled:
                    kind, why = "expire", "GPU hold after stop expired"
                else:
                    kind, why = "release", reason or "container removed or reservation lapsed"
            elif holding.state == "stopped" and interval.last_kind != "hold":
                until = holding.held_until
                kind = "hold"
                why = "stopped; holds the slot " + (
                    f"until {until:%Y-%m-%d %H:%M} UTC" if until else "until removed"
                )
            else:
                continue
            events.append(
                NewEvent(
                    kind,
                    interval.user,
                    slot=interval.slot,
                    container=interval.container,
                    group=interval.group,
                    reason=why,
                    at=now,
                )
            )
        return events


def _moment(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def _has_run(record: ContainerRecord, claim: Claim) -> bool:
    """Docker shows the container running, or stopped after it ran since the claim's phase
    began: the start happened."""
    if record.running:
        return True
    if record.state == "created" or record.finished_at is None:
        return False
    return record.finished_at.timestamp() > claim.since


def _strongest(holdings: list[Holding]) -> list[Holding]:
    """One holding per (container, slot): running, else starting, else reserved, else
    stopped (a restarting container's claim and its stopped labels are one holder)."""
    best: dict[tuple[str, str], Holding] = {}
    for holding in holdings:
        key = (holding.container, holding.slot_id)
        known = best.get(key)
        if known is None or _STRENGTH[holding.state] < _STRENGTH[known.state]:
            best[key] = holding
    return list(best.values())
