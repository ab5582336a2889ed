"""A simulated Docker engine and simulated processes for the allocator's race tests and its
property test: the real `GpuAllocator` (real lock, real state files, real event log) plays
several processes in one, against containers that obey the Docker rules exclusivity rests on.

`FakeEngine` keeps Docker's rules that matter here: names are unique; a running container
cannot be removed without force; a removed container cannot start; a start or create may land
after its caller died (`land` runs a call that was sent earlier). It records every interval in
which a container ran, per slot, so a test can check that no two ever overlapped.
`Processes` gives each simulated process an `Owner` and says which are dead.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ds01hub import labels
from ds01hub.gpu.allocator import CREATOR_LABEL, GpuAllocator, Owner
from ds01hub.gpu.eventlog import EventLog, EventLogError
from ds01hub.gpu.inventory import Inventory
from harness.inspect_docs import TRUST

EPOCH = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class Clock:
    """A clock that moves only when told."""

    def __init__(self, now: datetime = EPOCH):
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def _docker_time(moment: datetime | None) -> str:
    return moment.isoformat().replace("+00:00", "Z") if moment else "0001-01-01T00:00:00Z"


@dataclass
class Container:
    id: str
    name: str
    labels: dict[str, str]
    status: str = "created"
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def slots(self) -> tuple[str, ...]:
        return labels.parse_slot_list(self.labels.get(labels.GPUS))

    @property
    def running(self) -> bool:
        return self.status == "running"

    def document(self) -> dict:
        return {
            "Id": self.id,
            "Name": f"/{self.name}",
            "Config": {"Labels": dict(self.labels), "Image": "img"},
            "State": {
                "Status": self.status,
                "Running": self.running,
                "StartedAt": _docker_time(self.started_at),
                "FinishedAt": _docker_time(self.finished_at),
            },
        }


@dataclass
class FakeEngine:
    clock: Clock
    containers: dict[str, Container] = field(default_factory=dict)
    #: (slot, container id, started, stopped or None while running)
    intervals: list[list] = field(default_factory=list)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    def list(self) -> list[dict]:
        return [c.document() for c in self.containers.values()]

    def by_name(self, name: str) -> Container | None:
        return next((c for c in self.containers.values() if c.name == name), None)

    def create(
        self,
        name: str,
        user: str,
        slots: tuple[str, ...],
        priority: int = 10,
        owner: Owner | None = None,
    ) -> str:
        """`docker create` with the spawner's signed labels (`owner`: its creator, as the
        spawner labels it); a name in use raises NameError."""
        if self.by_name(name) is not None:
            raise NameError(f"name {name} in use")
        container_labels = labels.container_labels(
            user=user,
            project=name,
            group=None,
            priority=priority,
            gpus=slots,
            created_at=self.clock.now,
        )
        if owner is not None:
            container_labels[CREATOR_LABEL] = owner.label()
        container_labels = TRUST.sign(container_labels, name)
        container_id = f"c{next(self._ids):04d}"
        self.containers[container_id] = Container(container_id, name, container_labels)
        return container_id

    def start(self, container_id: str) -> bool:
        """`docker start`: False when the container is gone; a running one stays running."""
        container = self.containers.get(container_id)
        if container is None:
            return False
        if not container.running:
            container.status = "running"
            container.started_at = self.clock.now
            for slot in container.slots:
                self.intervals.append([slot, container_id, self.clock.now, None])
        return True

    def stop(self, container_id: str) -> None:
        container = self.containers.get(container_id)
        if container is None or not container.running:
            return
        container.status = "exited"
        container.finished_at = self.clock.now
        for interval in self.intervals:
            if interval[1] == container_id and interval[3] is None:
                interval[3] = self.clock.now

    def remove(self, container_id: str, force: bool = False) -> bool:
        """True when gone; False (Docker's 409) for a running container without force."""
        container = self.containers.get(container_id)
        if container is None:
            return True
        if container.running and not force:
            return False
        self.stop(container_id)
        del self.containers[container_id]
        return True

    def running_holders(self) -> dict[str, list[str]]:
        """Slot -> names of the containers running on it now."""
        holders: dict[str, list[str]] = {}
        for container in self.containers.values():
            if container.running:
                for slot in container.slots:
                    holders.setdefault(slot, []).append(container.name)
        return holders

    def overlaps(self) -> list[tuple]:
        """Pairs of run intervals of different containers that share a slot and overlap (a
        start at the very moment of the other's stop counts: the check is strict)."""
        found = []
        by_slot: dict[str, list[list]] = {}
        for interval in self.intervals:
            by_slot.setdefault(interval[0], []).append(interval)
        for slot, runs in by_slot.items():
            for a, b in itertools.combinations(runs, 2):
                a_end = a[3] or datetime.max.replace(tzinfo=UTC)
                b_end = b[3] or datetime.max.replace(tzinfo=UTC)
                if a[1] != b[1] and a[2] < b_end and b[2] < a_end:
                    found.append((slot, a[1], b[1]))
        return found


class Processes:
    """Simulated processes: an Owner per pid, and the set of those killed."""

    def __init__(self):
        self.dead: set[int] = set()

    @staticmethod
    def owner(pid: int) -> Owner:
        return Owner("simulated-host", "simulated-boot", pid, pid * 7)

    def alive(self, owner: Owner) -> bool:
        return owner.pid not in self.dead

    def kill(self, pid: int) -> None:
        self.dead.add(pid)


def allocator_for(
    pid: int,
    engine: FakeEngine,
    processes: Processes,
    inventory: Inventory,
    state_dir: Path,
    eventlog: EventLog | None,
    limits,
    *,
    ttl: float = 60.0,
    grace: float = 30.0,
) -> GpuAllocator:
    """The allocator as process `pid` has it (all share the state directory and engine)."""
    return GpuAllocator(
        None,
        inventory,
        state_dir,
        eventlog,
        engine.clock,
        limits=limits,
        reservation_ttl=ttl,
        start_grace=grace,
        container_lister=engine.list,
        container_remover=lambda container_id: engine.remove(container_id),
        owner=lambda: Processes.owner(pid),
        owner_alive=processes.alive,
        trust=TRUST,
    )


def fill_event_log(log: EventLog) -> None:
    """SQLite's own 'database or disk is full' for this thread's connection: no more pages,
    and the last one filled with ever smaller events until not even an empty one fits."""
    with log._connect() as db:
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages}")
    for size in (2000, 200, 20, 0):
        while True:
            try:
                log.record("cull", "filler", slot="s", container="c", reason="x" * size)
            except EventLogError:
                break


def unfill_event_log(log: EventLog) -> None:
    with log._connect() as db:
        db.execute("PRAGMA max_page_count = 1000000")
