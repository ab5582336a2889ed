"""Exclusivity: no two containers ever run on one GPU slot (docs/architecture.md states the
invariant). One deterministic test per known race, on the real `GpuAllocator` (lock, state
files, event log) with a simulated engine and simulated processes
(tests/harness/allocation_fakes.py), then a hypothesis state machine that interleaves every step of
every spawn with kills, late creates and starts, pulls, reclaims and expiries. The real-engine
torture with kill -9 is tests/test_allocation_torture.py."""

from __future__ import annotations

import signal
import subprocess
import time
from dataclasses import replace

import pytest
from harness.allocation_fakes import (
    Clock,
    FakeEngine,
    Processes,
    allocator_for,
    fill_event_log,
    unfill_event_log,
)

from ds01hub.gpu.allocator import AllocationStateError, GpuAllocator, Owner
from ds01hub.gpu.decision import GpuRequest
from ds01hub.gpu.eventlog import EventLog
from ds01hub.gpu.inventory import discover
from ds01hub.gpu.simulated_nvml import SimulatedNvml
from ds01hub.limits import SimulatedGpuSpec, parse_limits


def limits_doc(preempt_running: bool = False, hold: str = "1h") -> dict:
    return {
        "defaults": {"max_gpus": 2, "max_gpus_per_container": 2, "gpu_hold_after_stop": hold},
        "groups": {"staff": {"members": ["boss"], "priority": 90}},
        "policies": {"preempt_running": preempt_running},
    }


class World:
    """One machine: `gpus` whole simulated GPUs, a simulated engine, simulated processes."""

    def __init__(self, tmp_path, gpus=1, ttl=60.0, grace=30.0, **limits):
        self.clock = Clock()
        self.engine = FakeEngine(self.clock)
        self.processes = Processes()
        self.log = EventLog(tmp_path / "events.db")
        self.inventory = discover(SimulatedNvml([SimulatedGpuSpec()] * gpus), simulated=True)
        self.limits = parse_limits(limits_doc(**limits))
        self.state_dir = tmp_path / "state"
        self.ttl, self.grace = ttl, grace
        self._allocators: dict[int, GpuAllocator] = {}

    def at(self, pid: int) -> GpuAllocator:
        """The allocator of simulated process `pid`."""
        if pid not in self._allocators:
            self._allocators[pid] = allocator_for(
                pid,
                self.engine,
                self.processes,
                self.inventory,
                self.state_dir,
                self.log,
                self.limits,
                ttl=self.ttl,
                grace=self.grace,
            )
        return self._allocators[pid]

    def allocate(self, pid: int, user: str, name: str, count: int = 1):
        return self.at(pid).allocate(GpuRequest(user, name, count), self.limits.resolve(user))

    def spawn(self, pid: int, user: str, name: str) -> str:
        """The spawner's whole path: allocate, create, check, start, commit."""
        decision = self.allocate(pid, user, name)
        assert decision.ok, decision.reason
        container_id = self.engine.create(name, user, decision.granted)
        check = self.at(pid).begin_start(name, container_id)
        assert check.ok, check.reason
        assert self.engine.start(container_id)
        self.at(pid).commit(name)
        return container_id

    def holders(self) -> dict[str, set[tuple[str, str]]]:
        rows = self.at(0).status()
        return {r.slot_id: {(h.container, h.state) for h in r.holders} for r in rows}


# -- 1. a slot given twice during a restart ---------------------------------------------------


def test_a_restart_within_the_hold_is_never_reclaimed_from_under_it(tmp_path):
    world = World(tmp_path)
    alice = world.spawn(1, "alice", "a")
    world.engine.stop(alice)
    world.clock.advance(60)
    # alice restarts: her own held slot is granted to her claim ...
    assert world.allocate(1, "alice", "a").granted == ("0",)
    assert world.holders() == {"0": {("a", "reserved")}}
    # ... and a higher priority cannot take it while she starts (her claim is not "stopped")
    boss = world.allocate(2, "boss", "b")
    assert boss.code == "busy" and not boss.reclaimed
    assert "slot 0: alice (a, reserved" in boss.reason
    assert world.at(1).begin_start("a", alice).ok
    assert world.engine.start(alice)
    world.at(1).commit("a")
    assert world.allocate(2, "boss", "b").code == "busy"
    assert world.engine.overlaps() == []


def test_a_container_whose_slot_was_reclaimed_never_starts_on_it(tmp_path):
    world = World(tmp_path)
    alice = world.spawn(1, "alice", "a")
    world.engine.stop(alice)
    boss = world.allocate(2, "boss", "b")
    assert boss.granted == ("0",) and [h.container for h in boss.reclaimed] == ["a"]
    world.processes.kill(2)  # the boss's spawn dies before it creates anything
    # alice asks again: slot 0 is free, so it is granted ... to a NEW container of hers
    assert world.allocate(1, "alice", "a").granted == ("0",)
    check = world.at(1).begin_start("a", alice)  # the old one (its device request) may not start
    assert (check.ok, check.code) == (False, "reclaimed")
    assert "reclaimed by a higher priority" in check.reason
    world.engine.remove(alice)
    fresh = world.engine.create("a", "alice", ("0",))
    assert world.at(1).begin_start("a", fresh).ok


# -- 2. a claim that expires while its owner lives --------------------------------------------


def test_a_claim_renewed_during_a_long_pull_keeps_the_slot(tmp_path):
    world = World(tmp_path, ttl=4)
    assert world.allocate(1, "alice", "a").granted == ("0",)
    for _ in range(8):  # an 8 s pull with a 4 s TTL, renewed every second
        world.clock.advance(1)
        assert world.at(1).renew("a")
    assert world.allocate(2, "bob", "b").code == "busy"
    container = world.engine.create("a", "alice", ("0",))
    assert world.at(1).begin_start("a", container).ok


def test_a_claim_that_lapsed_is_refused_at_start_and_the_slot_goes_once(tmp_path):
    world = World(tmp_path, ttl=4)
    assert world.allocate(1, "alice", "a").granted == ("0",)
    world.clock.advance(5)  # the spawn stalled past its TTL without renewing
    assert not world.at(1).renew("a")
    bob = world.spawn(2, "bob", "b")
    late = world.engine.create("a", "alice", ("0",))
    check = world.at(1).begin_start("a", late)  # a container nothing claims: removed on sight
    assert (check.ok, check.code) == (False, "gone") and late not in world.engine.containers
    assert world.engine.containers[bob].running and world.engine.overlaps() == []


def test_a_claim_dies_with_its_owner_long_before_its_ttl(tmp_path):
    world = World(tmp_path, ttl=3600)
    assert world.allocate(1, "alice", "a").granted == ("0",)
    world.processes.kill(1)
    assert world.allocate(2, "bob", "b").granted == ("0",)


def test_a_reused_pid_or_a_zombie_is_not_the_owner():
    me = Owner.current()
    assert me.alive() is True
    assert replace(me, started=(me.started or 0) + 1).alive() is False  # same pid, other process
    assert replace(me, boot="another-boot").alive() is False  # the machine rebooted since
    assert replace(me, host="elsewhere").alive() is None  # cannot tell: the TTL decides
    child = subprocess.Popen(["sleep", "60"])
    owner = Owner.of(child.pid)
    assert owner.alive() is True
    child.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 30
    while owner.alive() and time.monotonic() < deadline:  # a zombie until reaped
        time.sleep(0.01)
    assert owner.alive() is False
    child.wait(10)
    assert owner.alive() is False


# -- 3. a late create (and a late start) ------------------------------------------------------


def test_a_create_that_lands_after_its_owner_died_never_starts_and_is_removed(tmp_path):
    world = World(tmp_path)
    assert world.allocate(1, "pat", "late").granted == ("0",)
    world.processes.kill(1)  # killed inside `docker create`
    quinn = world.spawn(2, "quinn", "q")  # pat's claim died with pat
    ghost = world.engine.create("late", "pat", ("0",))  # pat's create lands now
    assert world.holders() == {"0": {("q", "running")}}  # the ghost holds nothing
    assert world.at(3).ghosts()[0].id == ghost
    [removed] = world.at(3).reconcile()
    assert (removed.container, removed.slots) == ("late", ("0",))
    assert ghost not in world.engine.containers and quinn in world.engine.containers
    assert [e.container for e in world.log.events(kind="reconcile")] == ["late"]


def test_a_ghost_is_removed_before_its_slot_is_granted_so_a_late_start_finds_nothing(tmp_path):
    world = World(tmp_path, ttl=5, grace=10)
    assert world.allocate(1, "pat", "p").granted == ("0",)
    container = world.engine.create("p", "pat", ("0",))
    assert world.at(1).begin_start("p", container).ok
    world.processes.kill(1)  # its `docker start` is in flight
    assert world.allocate(2, "quinn", "q").code == "busy"  # the checked start outlives pat
    world.clock.advance(11)  # ... for start_grace; the start has not landed
    assert world.allocate(2, "quinn", "q").granted == ("0",)
    assert container not in world.engine.containers  # removed first, never forced
    assert not world.engine.start(container)  # the late start finds nothing


def test_a_start_that_landed_first_keeps_its_slot(tmp_path):
    world = World(tmp_path, ttl=5, grace=10)
    assert world.allocate(1, "pat", "p").granted == ("0",)
    container = world.engine.create("p", "pat", ("0",))
    assert world.at(1).begin_start("p", container).ok
    world.processes.kill(1)
    assert world.engine.start(container)  # landed after pat died
    world.clock.advance(11)
    assert world.allocate(2, "quinn", "q").code == "busy"
    assert world.holders() == {"0": {("p", "running")}}


def test_a_restart_whose_start_is_in_flight_keeps_its_slot_after_its_sender_died(tmp_path):
    world = World(tmp_path, ttl=5, grace=10)
    alice = world.spawn(1, "alice", "a")
    world.engine.stop(alice)
    world.clock.advance(1)
    assert world.allocate(2, "alice", "a").granted == ("0",)  # a restart, in another process
    assert world.at(2).begin_start("a", alice).ok
    world.processes.kill(2)  # its `docker start` is in flight
    boss = world.allocate(3, "boss", "b")
    assert boss.code == "busy" and not boss.reclaimed  # the start may still land
    assert world.engine.start(alice)  # it lands
    world.clock.advance(11)
    assert world.allocate(3, "boss", "b").code == "busy"  # running now
    assert world.engine.overlaps() == []


def test_a_start_in_flight_is_not_overwritten_by_a_new_spawn_of_the_same_container(tmp_path):
    world = World(tmp_path, ttl=5, grace=10)
    assert world.allocate(1, "alice", "a").granted == ("0",)
    container = world.engine.create("a", "alice", ("0",))
    assert world.at(1).begin_start("a", container).ok
    world.processes.kill(1)  # the hub died with the start in flight; it restarts
    again = world.allocate(2, "alice", "a")
    assert again.code == "busy" and "being started by another process" in again.reason
    assert world.engine.start(container)  # the start lands: the labels hold, the claim ends
    assert world.allocate(2, "alice", "a").granted == ("0",)


def test_the_window_between_check_and_start_belongs_to_the_starter(tmp_path):
    world = World(tmp_path)
    assert world.allocate(1, "alice", "a").granted == ("0",)
    container = world.engine.create("a", "alice", ("0",))
    assert world.at(1).begin_start("a", container).ok
    assert world.holders() == {"0": {("a", "starting")}}
    for pid, user in ((2, "bob"), (3, "boss")):  # not even a higher priority takes it
        decision = world.allocate(pid, user, user)
        assert decision.code == "busy" and not decision.reclaimed


def test_begin_start_refuses_what_is_not_the_containers_alone(tmp_path):
    world = World(tmp_path, gpus=2)
    assert world.allocate(1, "alice", "a").granted == ("0",)
    wrong = world.engine.create("a", "alice", ("1",))
    check = world.at(1).begin_start("a", wrong)
    assert (check.ok, check.code) == (False, "mismatch")
    assert world.at(2).begin_start("a", wrong).code == "lost"  # another process's claim
    world.engine.remove(wrong)
    assert world.at(1).begin_start("a", wrong).code == "gone"


def test_a_preempted_running_container_is_stopped_before_the_winner_starts(tmp_path):
    world = World(tmp_path, preempt_running=True)
    alice = world.spawn(1, "alice", "a")
    boss = world.allocate(2, "boss", "b")
    assert boss.granted == ("0",) and boss.reclaimed[0].state == "running"
    container = world.engine.create("b", "boss", ("0",), priority=90)
    check = world.at(2).begin_start("b", container)
    assert (check.ok, check.code, check.stop_first) == (False, "busy", (alice,))
    row = world.at(0).status()[0]
    assert row.conflict  # alice still runs on it: shown, never hidden
    world.engine.stop(alice)
    assert world.at(2).begin_start("b", container).ok
    assert world.engine.start(container) and world.engine.overlaps() == []


# -- 4. ghosts: a spawn killed between create and start ---------------------------------------


def test_a_spawn_killed_between_create_and_start_holds_nothing_and_is_reconciled(tmp_path):
    world = World(tmp_path)
    assert world.allocate(1, "alice", "a").granted == ("0",)
    container = world.engine.create("a", "alice", ("0",))
    assert world.holders() == {"0": {("a", "reserved")}}
    world.processes.kill(1)
    assert world.holders() == {"0": set()}  # not held for gpu_hold_after_stop
    assert [a.container for a in world.at(2).reconcile()] == ["a"]
    assert container not in world.engine.containers
    assert world.log.open_allocations() == []  # its GPU interval is closed
    assert world.log.gpu_hours(until=world.clock.now) == {}


def test_a_container_another_live_process_is_creating_is_held_not_removed(tmp_path):
    """Another hub's spawn (its claim lives in another state directory) is between create and
    start: its `ds01.owner` label keeps it from being taken for a ghost while that process
    lives."""
    world = World(tmp_path)
    theirs = world.engine.create("t", "tom", ("0",), owner=Processes.owner(7))
    assert world.holders() == {"0": {("t", "starting")}}
    assert world.at(1).reconcile() == [] and world.allocate(1, "bob", "b").code == "busy"
    world.processes.kill(7)
    assert [a.container for a in world.at(1).reconcile()] == ["t"]
    assert theirs not in world.engine.containers


# -- conflicts are shown ----------------------------------------------------------------------


def test_a_slot_with_two_holders_is_a_conflict_in_status(tmp_path):
    world = World(tmp_path)
    first = world.engine.create("x", "xena", ("0",))
    second = world.engine.create("y", "yann", ("0",))
    world.engine.start(first)
    world.engine.start(second)  # started behind the allocator's back
    [row] = world.at(0).status()
    assert row.conflict and {h.container for h in row.holders} == {"x", "y"}
    data = row.to_dict()
    assert data["conflict"] is True and len(data["holders"]) == 2


def test_one_container_restarting_is_one_holder_not_a_conflict(tmp_path):
    world = World(tmp_path)
    alice = world.spawn(1, "alice", "a")
    world.engine.stop(alice)
    world.allocate(1, "alice", "a")
    [row] = world.at(0).status()
    assert not row.conflict and [h.state for h in row.holders] == ["reserved"]


# -- 7. a full disk ---------------------------------------------------------------------------


def test_an_allocation_that_cannot_be_recorded_changes_nothing(tmp_path):
    world = World(tmp_path)
    fill_event_log(world.log)
    before = (world.state_dir / "reservations.json").exists()
    with pytest.raises(AllocationStateError) as raised:
        world.allocate(1, "alice", "a")
    message = str(raised.value)
    assert "database or disk is full" in message and "cannot rollback" not in message
    assert "nothing was changed" in message and str(world.state_dir) in message
    assert world.holders() == {"0": set()}
    assert before == (world.state_dir / "reservations.json").exists()
    assert world.log.events(kind="allocate") == []


def test_a_release_frees_the_slot_even_when_its_event_must_wait(tmp_path):
    world = World(tmp_path)
    assert world.allocate(1, "alice", "a").granted == ("0",)
    fill_event_log(world.log)
    world.at(1).release("a", "spawn failed")
    assert world.holders() == {"0": set()}
    health = world.log.health()
    assert health["unwritten"] == 1 and "full" in health["last_error"]
    unfill_event_log(world.log)
    world.log.record("cull", "someone")  # the next write that can, writes the waiting one too
    kinds = [(e.kind, e.container) for e in world.log.events() if e.user != "filler"]
    assert kinds == [("allocate", "a"), ("release", "a"), ("cull", None)]
    assert world.log.health()["unwritten"] == 0 and world.log.open_allocations() == []
