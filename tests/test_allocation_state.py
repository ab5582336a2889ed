"""Allocation state: holdings from Docker documents, reservations under the lock, reclaim,
the event log sweep; and, on the real Docker engine, several processes allocating at once."""

import json
import multiprocessing
import os
import signal
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from harness.inspect_docs import TRUST

from ds01hub import labels
from ds01hub.gpu.allocator import GpuAllocator, docker_lister
from ds01hub.gpu.decision import GpuRequest
from ds01hub.gpu.eventlog import EventLog
from ds01hub.gpu.inventory import discover, load_inventory
from ds01hub.gpu.simulated_nvml import SimulatedNvml
from ds01hub.limits import SimulatedGpuSpec, parse_limits

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
LIMITS = parse_limits(
    {
        "defaults": {"max_gpus": 8, "max_gpus_per_container": 4, "gpu_hold_after_stop": "1h"},
        "groups": {
            "staff": {"members": ["boss"], "priority": 90, "gpu_hold_after_stop": "4h"},
            "forever": {"members": ["keeper"], "gpu_hold_after_stop": None},
        },
    }
)


def doc(name, user, gpus, state="running", finished=None, group=None, priority=10, cid=None, **kw):
    """An inspect document as the Docker engine returns it (signed: a real managed one)."""
    container_labels = labels.container_labels(
        user=user, project=name, group=group, priority=priority, gpus=gpus, **kw
    )
    return {
        "Id": cid or f"id-{name}",
        "Name": f"/{name}",
        "Config": {"Labels": TRUST.sign(container_labels, name), "Image": "img"},
        "State": {
            "Status": state,
            "FinishedAt": finished.isoformat() if finished else "0001-01-01T00:00:00Z",
        },
    }


class Machine:
    """A simulated 3-GPU machine (GPU 2 in three MIG slots) with a controllable container list
    and clock."""

    def __init__(self, tmp_path, docs=()):
        self.docs = list(docs)
        self.now = NOW
        self.log = EventLog(tmp_path / "events.db")
        nvml = SimulatedNvml(
            [SimulatedGpuSpec(), SimulatedGpuSpec(), SimulatedGpuSpec(mig=("2g.20gb",) * 3)]
        )
        self.allocator = GpuAllocator(
            None,
            discover(nvml, simulated=True),
            tmp_path / "state",
            self.log,
            clock=lambda: self.now,
            limits=LIMITS,
            reservation_ttl=60,
            container_lister=lambda: list(self.docs),
            trust=TRUST,
        )

    def limits(self, user):
        return LIMITS.resolve(user)

    def allocate(self, user, container, count=1, **kw):
        request = GpuRequest(user=user, container=container, count=count, **kw)
        return self.allocator.allocate(request, self.limits(user))


def by_slot(allocator):
    return {(h.slot_id): (h.user, h.container, h.state) for h in allocator.holdings()}


def test_holdings_from_labels_follow_docker_state_and_the_users_hold(tmp_path):
    machine = Machine(
        tmp_path,
        [
            doc("run", "alice", ["0"]),
            doc("recent", "bob", ["1"], "exited", NOW - timedelta(minutes=30)),
            doc("old", "carol", ["2:0"], "exited", NOW - timedelta(hours=2)),
            doc("staff", "boss", ["2:1"], "exited", NOW - timedelta(hours=2), group="staff"),
            doc("kept", "keeper", ["2:2"], "exited", NOW - timedelta(days=30), group="forever"),
            doc("cpu", "dave", []),
        ],
    )
    machine.docs.append({"Id": "x", "Name": "/theirs", "Config": {"Labels": {"ds01.gpus": "0"}}})
    holdings = {h.slot_id: h for h in machine.allocator.holdings()}
    assert set(holdings) == {"0", "1", "2:1", "2:2"}  # carol's 1h hold ran out
    assert holdings["0"].state == "running" and holdings["0"].held_until is None
    assert holdings["1"].held_until == NOW + timedelta(minutes=30)
    assert holdings["2:1"].held_until == NOW + timedelta(hours=2)  # staff hold 4h
    assert holdings["2:2"].state == "stopped" and holdings["2:2"].held_until is None


def test_a_never_started_container_holds_only_through_its_claim(tmp_path):
    created = doc("new", "erin", ["0"], state="created")
    machine = Machine(tmp_path, [created])
    assert machine.allocator.holdings() == []  # nobody is spawning it: a ghost
    assert [r.name for r in machine.allocator.ghosts()] == ["new"]
    machine.allocate("erin", "new")  # a spawn of it (this process) claims the slot
    (holding,) = machine.allocator.holdings()
    assert (holding.container, holding.state) == ("new", "reserved")


def test_a_claim_holds_until_the_container_has_run_then_the_labels_do(tmp_path):
    machine = Machine(tmp_path)
    first = machine.allocate("alice", "a._.alice")
    assert first.granted == ("0",)
    assert by_slot(machine.allocator) == {"0": ("alice", "a._.alice", "reserved")}
    second = machine.allocate("bob", "b._.bob")
    assert second.granted == ("1",)  # the claim kept bob off slot 0
    machine.docs.append(doc("a._.alice", "alice", ["0"]))  # created and started elsewhere
    machine.allocator.commit("a._.alice")
    assert by_slot(machine.allocator)["0"] == ("alice", "a._.alice", "running")
    machine.allocate("carol", "c", count=0)  # any write drops claims that have ended
    reservations = json.loads((tmp_path / "state" / "reservations.json").read_text())
    assert set(reservations) == {"b._.bob"}


def test_reservations_lapse_after_their_ttl(tmp_path):
    machine = Machine(tmp_path)
    machine.allocate("alice", "a")
    machine.now += timedelta(seconds=61)
    assert machine.allocator.holdings() == []
    assert machine.allocate("bob", "b").granted == ("0",)


def _allocate_then_die(state_dir, log_path):
    nvml = SimulatedNvml([SimulatedGpuSpec()])
    allocator = GpuAllocator(
        None,
        discover(nvml, simulated=True),
        state_dir,
        EventLog(log_path),
        limits=LIMITS,
        reservation_ttl=3600,
        container_lister=list,
    )
    decision = allocator.allocate(GpuRequest("victim", "v", 1), LIMITS.resolve("victim"))
    assert decision.granted == ("0",)
    os.kill(os.getpid(), signal.SIGKILL)  # killed mid-spawn: never creates nor commits


def test_a_process_killed_mid_allocation_leaks_nothing(tmp_path):
    state_dir, log_path = tmp_path / "state", tmp_path / "events.db"
    child = multiprocessing.get_context("fork").Process(
        target=_allocate_then_die, args=(state_dir, log_path)
    )
    child.start()
    child.join(30)
    assert child.exitcode == -signal.SIGKILL
    assert "v" in json.loads((state_dir / "reservations.json").read_text())  # it did reserve
    nvml = SimulatedNvml([SimulatedGpuSpec()])
    allocator = GpuAllocator(
        None,
        discover(nvml, simulated=True),
        state_dir,
        EventLog(log_path),
        limits=LIMITS,
        container_lister=list,
    )
    assert allocator.holdings() == []  # its pid is gone, long before the 1h TTL
    decision = allocator.allocate(GpuRequest("next", "n", 1), LIMITS.resolve("next"))
    assert decision.granted == ("0",)
    kinds = [(e.kind, e.user, e.reason) for e in EventLog(log_path).events()]
    assert ("release", "victim", "container removed or reservation lapsed") in kinds


def test_priority_reclaim_revokes_the_stopped_containers_slot(tmp_path):
    machine = Machine(
        tmp_path,
        [
            doc("a", "alice", ["0"], "exited", NOW - timedelta(minutes=10), cid="id-a"),
            doc("b", "bob", ["1"]),
            doc("c", "carol", ["2:0", "2:1", "2:2"]),
        ],
    )
    decision = machine.allocate("boss", "boss-box")
    assert decision.granted == ("0",)
    assert [(h.user, h.container) for h in decision.reclaimed] == [("alice", "a")]
    assert machine.allocator.revoked("a") == ["0"] == machine.allocator.revoked("id-a")
    entry = machine.allocator.revocations()["id-a"]
    assert (entry["name"], entry["by"], entry["by_container"]) == ("a", "boss", "boss-box")
    machine.docs.append(doc("boss-box", "boss", ["0"], group="staff", priority=90))
    machine.allocator.commit("boss-box")
    assert by_slot(machine.allocator)["0"] == ("boss", "boss-box", "running")  # not alice's
    (reclaim,) = machine.log.events(kind="reclaim")
    assert (reclaim.user, reclaim.slot, reclaim.container) == ("alice", "0", "a")
    assert "taken by boss" in reclaim.reason and "priority 90 > 10" in reclaim.reason
    # alice restarting gets told there is nothing for her (all running) and why
    again = machine.allocate("alice", "a")
    assert again.code == "busy" and "slot 0: boss" in again.reason
    # the revocation goes with the container
    machine.docs = [d for d in machine.docs if d["Id"] != "id-a"]
    machine.allocate("bob", "b2", count=0)
    machine.allocate("boss", "other", count=0)
    assert machine.allocator.revoked("a") == ["0"]  # pruned only on the next reclaim


def test_sweep_logs_hold_expire_and_release(tmp_path):
    machine = Machine(tmp_path)
    machine.allocate("alice", "a")
    machine.docs.append(doc("a", "alice", ["0"], "exited", NOW + timedelta(seconds=1)))  # ran
    machine.allocator.commit("a")
    machine.allocator.sweep()
    machine.now += timedelta(hours=2)
    machine.allocator.sweep()
    machine.allocate("bob", "b")
    machine.allocator.release("b", "spawn failed: image missing")
    kinds = [(e.kind, e.user, e.slot) for e in machine.log.events()]
    assert kinds == [
        ("allocate", "alice", "0"),
        ("hold", "alice", "0"),
        ("expire", "alice", "0"),
        ("allocate", "bob", "0"),
        ("release", "bob", "0"),
    ]
    assert machine.log.events(kind="release")[0].reason == "spawn failed: image missing"
    assert machine.log.gpu_hours(until=machine.now) == {"alice": 2.0}


def test_status_lists_every_slot_with_its_holder(tmp_path):
    machine = Machine(tmp_path, [doc("a", "alice", ["2:1"])])
    rows = {row.slot_id: row.to_dict() for row in machine.allocator.status()}
    assert list(rows) == ["0", "1", "2:0", "2:1", "2:2"]
    assert rows["2:1"]["user"] == "alice" and rows["2:1"]["state"] == "running"
    assert rows["0"]["user"] is None and rows["2:1"]["profile"] == "2g.20gb"


# -- real Docker: several processes at once on a simulated 8-GPU machine ----------------------

EIGHT_GPUS = parse_limits(
    {
        "defaults": {"max_gpus": 2, "gpu_hold_after_stop": "1h"},
        "gpu_allocation": {"simulate": {"gpus": 8, "seed": "concurrency-test"}},
    }
)


def _spawn_worker(state_dir, log_path, run_id, worker, image, results):
    import docker
    from docker.types import DeviceRequest

    client = docker.from_env()
    inventory = load_inventory(EIGHT_GPUS.gpu_allocation)
    allocator = GpuAllocator(
        client,
        inventory,
        state_dir,
        EventLog(log_path),
        limits=EIGHT_GPUS,
        container_lister=docker_lister(client, [f"ds01.test.run={run_id}"]),
    )
    user = f"user{worker}"
    for project in ("p1", "p2"):
        name = f"{labels.container_name(user, project)}-{run_id}"
        decision = allocator.allocate(GpuRequest(user, name, 1), EIGHT_GPUS.resolve(user))
        if not decision.granted:
            results.put((worker, name, None, decision.code))
            continue
        uuids = [inventory.slot(s).uuid for s in decision.granted]
        container_labels = labels.container_labels(
            user=user,
            project=project,
            group=None,
            priority=10,
            gpus=decision.granted,
            gpu_uuids=uuids,
            image=image,
        )
        container_labels = allocator.trust.sign(container_labels, name)
        container_labels.update({"ds01.test": "1", "ds01.test.run": run_id})
        client.containers.run(
            image,
            ["sleep", "300"],
            name=name,
            labels=container_labels,
            detach=True,
            device_requests=[DeviceRequest(device_ids=uuids, capabilities=[["gpu"]])],
        )
        allocator.commit(name)
        results.put((worker, name, decision.granted, "ok"))


@pytest.mark.docker
def test_concurrent_processes_never_hand_out_a_slot_twice(tmp_path, docker_client, base_image):
    run_id = uuid.uuid4().hex[:10]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [
        context.Process(
            target=_spawn_worker,
            args=(tmp_path / "state", tmp_path / "events.db", run_id, w, base_image, results),
        )
        for w in range(6)
    ]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(240)
            assert worker.exitcode == 0
        outcomes = [results.get(timeout=5) for _ in range(12)]
        containers = docker_client.containers.list(
            all=True, filters={"label": f"ds01.test.run={run_id}"}
        )
        from_labels = [
            slot for c in containers for slot in labels.parse_slot_list(c.labels[labels.GPUS])
        ]
        # 12 requests for one slot each on 8 slots: exactly 8 granted, none twice
        assert sorted(from_labels) == [str(i) for i in range(8)]
        granted = [o for o in outcomes if o[3] == "ok"]
        assert len(granted) == 8 and {o[3] for o in outcomes} <= {"ok", "busy"}
        assert len(containers) == 8
        for container in containers:  # the device request carries the slot's UUID
            requests = container.attrs["HostConfig"]["DeviceRequests"]
            assert requests[0]["DeviceIDs"] == container.labels[labels.GPU_UUIDS].split(",")
        assert not json.loads((tmp_path / "state" / "reservations.json").read_text())
        assert len(EventLog(tmp_path / "events.db").events(kind="allocate")) == 8
    finally:
        for container in docker_client.containers.list(
            all=True, filters={"label": f"ds01.test.run={run_id}"}
        ):
            container.remove(force=True)
