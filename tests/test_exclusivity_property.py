"""Exclusivity as a property: a hypothesis state machine drives the real `GpuAllocator` (lock,
state files, event log) through every step of the spawner's protocol for five servers on two
GPUs, interleaved with everything that can happen between two steps: a spawn killed (its
process dies: its claim goes with it), a `docker create` or `docker start` that lands after its
sender died, a long image pull (the clock moves; a live spawn renews or does not), a stop, a
delete, a restart within the hold, a reclaim by a higher priority, a hold that expires, a
cancelled spawn, a reconcile. After every step: no two containers ever ran on one slot at the
same time (`FakeEngine` records every run interval), and every holding the allocator reports
is backed by something live (nothing leaks). When the example ends, everything is killed and
stopped, time passes, and nothing may be held any more.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from harness.allocation_fakes import Clock, FakeEngine, Processes, allocator_for
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from ds01hub.gpu.allocator import CREATOR_LABEL, GpuAllocator, Owner
from ds01hub.gpu.decision import GpuRequest
from ds01hub.gpu.eventlog import EventLog
from ds01hub.gpu.inventory import discover
from ds01hub.gpu.simulated_nvml import SimulatedNvml
from ds01hub.limits import SimulatedGpuSpec, parse_limits

TTL, GRACE, HOLD = 4.0, 6.0, 10.0
#: server (container) name -> user; "boss" is a higher priority (reclaims stopped holders)
SERVERS = {"s0": "ann", "s1": "ben", "s2": "cat", "s3": "dan", "sb": "boss"}
LIMITS = parse_limits(
    {
        "defaults": {"max_gpus": 1, "max_gpus_per_container": 1, "gpu_hold_after_stop": "10s"},
        "groups": {"staff": {"members": ["boss"], "priority": 90}},
    }
)


@dataclass
class Spawn:
    """One spawn in flight, as the spawner runs it (process `pid`)."""

    pid: int
    name: str
    slots: tuple[str, ...]
    container_id: str = ""
    created_here: bool = False
    phase: str = "allocated"  # allocated -> created -> starting (start sent) -> done
    claim_until: float = 0.0  # the model's own idea of the claim's expiry (epoch seconds)


@dataclass
class InFlight:
    """A Docker call sent by a spawn, not yet acted on by the engine."""

    kind: str  # "create" | "start"
    name: str
    slots: tuple[str, ...] = ()
    container_id: str = ""
    pid: int = 0


@dataclass
class Dead:
    """A killed spawn whose checked start may still land: its claim is backed until then."""

    name: str
    until: float
    container_id: str


class Exclusivity(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="ds01-excl-"))
        self.clock = Clock()
        self.engine = FakeEngine(self.clock)
        self.processes = Processes()
        self.log = EventLog(self.directory / "events.db")
        self.inventory = discover(SimulatedNvml([SimulatedGpuSpec()] * 2), simulated=True)
        self.pids = itertools.count(1)
        self.spawns: dict[str, Spawn] = {}
        self.in_flight: list[InFlight] = []
        self.dead: list[Dead] = []
        self.allocators: dict[int, GpuAllocator] = {}

    def at(self, pid: int) -> GpuAllocator:
        if pid not in self.allocators:
            self.allocators[pid] = allocator_for(
                pid,
                self.engine,
                self.processes,
                self.inventory,
                self.directory / "state",
                self.log,
                LIMITS,
                ttl=TTL,
                grace=GRACE,
            )
        return self.allocators[pid]

    def now(self) -> float:
        return self.clock.now.timestamp()

    def end(self, name: str) -> None:
        self.spawns.pop(name, None)

    def undo(self, spawn: Spawn) -> None:
        """What the spawner does when a spawn fails or is cancelled."""
        if spawn.container_id:
            if spawn.created_here:
                self.engine.remove(spawn.container_id, force=True)
            else:
                self.engine.stop(spawn.container_id)
        self.at(spawn.pid).release(spawn.name, "spawn failed")
        self.end(spawn.name)

    # -- the spawn protocol -------------------------------------------------------------------

    @initialize()
    def a_busy_machine(self):
        """Every example starts with s0 running on a slot and s1 stopped, holding the other."""
        for name in ("s0", "s1"):
            pid = next(self.pids)
            user = SERVERS[name]
            decision = self.at(pid).allocate(GpuRequest(user, name, 1), LIMITS.resolve(user))
            container_id = self.engine.create(name, user, decision.granted)
            assert self.at(pid).begin_start(name, container_id).ok
            assert self.engine.start(container_id)
            self.at(pid).commit(name)
        self.clock.advance(1)
        self.engine.stop(self.engine.by_name("s1").id)

    def idle_servers(self) -> list[str]:
        """Servers a user may start now: no spawn in flight, no running container."""
        return [
            name
            for name in sorted(SERVERS)
            if name not in self.spawns
            and not ((c := self.engine.by_name(name)) is not None and c.running)
        ]

    @precondition(lambda self: bool(self.idle_servers()))
    @rule(data=st.data())
    def allocate(self, data):
        """A user starts the server (a restart too: its container may exist, stopped)."""
        name = data.draw(st.sampled_from(self.idle_servers()))
        pid = next(self.pids)
        user = SERVERS[name]
        decision = self.at(pid).allocate(GpuRequest(user, name, 1), LIMITS.resolve(user))
        # never taken from a spawn whose claim lives (a stalled one that let it lapse: yes)
        claimed = {s.name for s in self.spawns.values() if s.claim_until > self.now()}
        assert not [h for h in decision.reclaimed if h.container in claimed], decision
        if decision.ok and decision.granted:
            self.spawns[name] = Spawn(pid, name, decision.granted, claim_until=self.now() + TTL)

    def movable(self) -> list[Spawn]:
        """Spawns whose next step their own process can take now."""
        return sorted(
            (s for s in self.spawns.values() if s.phase in ("allocated", "created", "starting")),
            key=lambda s: s.name,
        )

    @precondition(lambda self: bool(self.movable()))
    @rule(data=st.data(), late=st.booleans())
    def step(self, data, late):
        """The next step of one spawn: create (or reuse), check and start, or commit.
        `late`: the create or start is sent and lands later (maybe after its sender died)."""
        spawn = data.draw(st.sampled_from(self.movable()))
        {"allocated": self.create, "created": self.check_and_start, "starting": self.commit}[
            spawn.phase
        ](spawn, late)

    def create(self, spawn: Spawn, late: bool) -> None:
        """Reuse the stopped container when its slots are still its own, else (re-)create."""
        existing = self.engine.by_name(spawn.name)
        if existing is not None:
            reclaimed = set(existing.slots) & set(self.at(spawn.pid).revoked(existing.id))
            if existing.slots == spawn.slots and not reclaimed:
                spawn.container_id, spawn.phase = existing.id, "created"
                return
            if not self.engine.remove(existing.id):
                self.undo(spawn)
                return
        if late:
            self.in_flight.append(InFlight("create", spawn.name, spawn.slots, pid=spawn.pid))
            spawn.phase = "create sent"
            return
        spawn.container_id = self.engine.create(
            spawn.name, SERVERS[spawn.name], spawn.slots, owner=Processes.owner(spawn.pid)
        )
        spawn.created_here, spawn.phase = True, "created"

    def check_and_start(self, spawn: Spawn, late: bool) -> None:
        check = self.at(spawn.pid).begin_start(spawn.name, spawn.container_id)
        if not check.ok:
            self.undo(spawn)
            return
        spawn.claim_until = max(spawn.claim_until, self.now() + GRACE)
        if late:
            self.in_flight.append(InFlight("start", spawn.name, container_id=spawn.container_id))
            spawn.phase = "starting"
            return
        assert self.engine.start(spawn.container_id)
        self.at(spawn.pid).commit(spawn.name)
        self.end(spawn.name)

    def commit(self, spawn: Spawn, late: bool) -> None:
        """The spawner's start call returned (only once the engine acted on it)."""
        if any(f.kind == "start" and f.container_id == spawn.container_id for f in self.in_flight):
            return
        self.at(spawn.pid).commit(spawn.name)
        self.end(spawn.name)

    @precondition(lambda self: bool(self.in_flight))
    @rule(data=st.data())
    def land(self, data):
        """Docker acts on a call sent earlier (its sender may be dead by now)."""
        call = self.in_flight.pop(data.draw(st.integers(0, len(self.in_flight) - 1)))
        if call.kind == "start":
            self.engine.start(call.container_id)
            return
        if self.engine.by_name(call.name) is not None:
            return  # the name is taken: Docker refuses the create
        owner = Processes.owner(call.pid)
        container_id = self.engine.create(call.name, SERVERS[call.name], call.slots, owner=owner)
        spawn = self.spawns.get(call.name)
        if spawn is not None and spawn.pid == call.pid and spawn.phase == "create sent":
            spawn.container_id, spawn.created_here, spawn.phase = container_id, True, "created"

    @precondition(lambda self: bool(self.spawns))
    @rule(data=st.data())
    def renew(self, data):
        spawn = self._pick(data)
        if self.at(spawn.pid).renew(spawn.name):
            spawn.claim_until = max(spawn.claim_until, self.now() + TTL)

    @precondition(lambda self: bool(self.spawns))
    @rule(data=st.data(), killed=st.booleans())
    def interrupt(self, data, killed):
        """`killed`: the spawn's process dies (the hub, or a CLI): nothing of it acts again,
        but what it sent to Docker may still land. Else the user stops the pending spawn and
        the spawner undoes it (a start call, once sent, is awaited first: such a spawn is
        not cancelled here)."""
        spawn = self._pick(data)
        if killed:
            self.processes.kill(spawn.pid)
            if spawn.phase == "starting":
                self.dead.append(Dead(spawn.name, spawn.claim_until, spawn.container_id))
            self.end(spawn.name)
        elif spawn.phase not in ("starting", "create sent"):
            self.undo(spawn)

    # -- the world around it ------------------------------------------------------------------

    @rule(seconds=st.sampled_from([0.5, 1.0, 3.0, 5.0, HOLD + 1]))
    def time_passes(self, seconds):
        """An image pull, a wait, or long enough for a hold to expire."""
        self.clock.advance(seconds)

    def containers_at_rest(self, running: bool | None = None) -> list[str]:
        """Names of containers no spawn is working on (`running` narrows)."""
        return sorted(
            c.name
            for c in self.engine.containers.values()
            if c.name not in self.spawns and (running is None or c.running == running)
        )

    @precondition(lambda self: bool(self.containers_at_rest()))
    @rule(data=st.data(), remove=st.booleans())
    def stop_or_delete(self, data, remove):
        """The user stops the server (the container stays, holding its slot), or deletes it
        (the container is removed, its claim released)."""
        name = data.draw(st.sampled_from(self.containers_at_rest()))
        container = self.engine.by_name(name)
        if remove:
            self.engine.remove(container.id, force=True)
            self.at(0).release(name, "server deleted")
        else:
            self.engine.stop(container.id)

    @precondition(lambda self: any(c.status == "created" for c in self.engine.containers.values()))
    @rule()
    def reconcile(self):
        self.at(0).reconcile()

    def _pick(self, data) -> Spawn:
        return data.draw(st.sampled_from(sorted(self.spawns.values(), key=lambda s: s.name)))

    # -- what must hold -----------------------------------------------------------------------

    @invariant()
    def never_two_on_one_slot(self):
        assert self.engine.overlaps() == [], self.engine.overlaps()
        assert all(len(names) == 1 for names in self.engine.running_holders().values())

    @invariant()
    def nothing_is_held_that_nothing_backs(self):
        now = self.now()
        for holding in self.at(0).holdings():
            assert self._backed(holding, now), (holding, self.spawns, self.dead)

    def _backed(self, holding, now: float) -> bool:
        container = self.engine.by_name(holding.container)
        if holding.state == "running":
            return container is not None and container.running
        if holding.state == "stopped":
            finished = container.finished_at if container else None
            return finished is not None and finished + timedelta(seconds=HOLD) > self.clock.now
        spawn = self.spawns.get(holding.container)
        if spawn is not None and spawn.claim_until > now:
            return True
        if container is not None and container.status == "created":  # its creator lives
            creator = Owner.from_label(container.labels.get(CREATOR_LABEL))
            if creator is not None and creator.pid not in self.processes.dead:
                return True
        return any(d.name == holding.container and d.until > now for d in self.dead)

    def teardown(self):
        try:
            for spawn in list(self.spawns.values()):
                self.processes.kill(spawn.pid)
            self.in_flight.clear()
            for container in list(self.engine.containers.values()):
                self.engine.stop(container.id)
            self.clock.advance(HOLD + GRACE + TTL + 1)
            self.at(0).reconcile()
            assert self.at(0).holdings() == []
            assert not [c for c in self.engine.containers.values() if c.status == "created"]
            assert self.log.open_allocations() == []
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


Exclusivity.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestExclusivity = Exclusivity.TestCase
