"""Exclusivity on the real engine: eight processes run the spawner's protocol against one
state directory for about forty seconds (allocate, create a labelled container, renew during
a simulated pull, check, start, then stop, restart within the hold, or delete), two of them
at a higher priority that reclaims stopped holders; the test kills random ones with SIGKILL
at random points (inside `docker create` and `docker start` too) and starts them again.
Docker's own event stream then says when every container started and died: no slot may
ever have been run by two containers at once. Every few kills, and at the end, the running
containers are checked directly; at the end nothing may be held that nothing backs, and once
everything stopped and the holds passed, nothing may be held at all.

Containers are tiny (static busybox, `docker import`ed) and carry this run's own label, the
only ones the allocator sees."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import signal
import threading
import time
import uuid

import docker.errors
import pytest
from harness.cli import busybox_image

from ds01hub import labels
from ds01hub.gpu.allocator import CREATOR_LABEL, GpuAllocator, docker_lister
from ds01hub.gpu.decision import GpuRequest
from ds01hub.gpu.eventlog import EventLog
from ds01hub.gpu.inventory import load_inventory
from ds01hub.limits import parse_limits

pytestmark = pytest.mark.docker

WORKERS = 8
DURATION = 40.0
RUN_LABEL = "ds01.test.torture"
TTL, GRACE, HOLD = 5.0, 3.0, 3.0
LIMITS = parse_limits(
    {
        "defaults": {"max_gpus": 1, "max_gpus_per_container": 1, "gpu_hold_after_stop": "3s"},
        "groups": {"staff": {"members": ["boss6", "boss7"], "priority": 90}},
        "gpu_allocation": {"simulate": {"gpus": 4, "seed": "torture"}},
    }
)


def _user(index: int) -> str:
    return f"boss{index}" if index >= 6 else f"user{index}"


def _allocator(client, run_id: str, state_dir, log_path) -> GpuAllocator:
    return GpuAllocator(
        client,
        load_inventory(LIMITS.gpu_allocation),
        state_dir,
        EventLog(log_path),
        limits=LIMITS,
        reservation_ttl=TTL,
        start_grace=GRACE,
        container_lister=docker_lister(client, [f"{RUN_LABEL}={run_id}"]),
    )


def _worker(index: int, run_id: str, state_dir, log_path, image: str, counters) -> None:
    """One server of one user, started and stopped over and over, as the spawner does."""
    client = docker.from_env(timeout=120)
    allocator = _allocator(client, run_id, state_dir, log_path)
    user = _user(index)
    name = labels.container_name(user, f"t{run_id}")
    rng = random.Random()
    while True:
        try:
            _round(client, allocator, rng, index, user, name, image, run_id, counters)
        except docker.errors.APIError:  # a name taken by a late create, a busy engine: again
            time.sleep(0.05)


def _round(client, allocator, rng, index, user, name, image, run_id, counters) -> None:
    container = _inspect(client, name)
    if container is not None and container["State"]["Running"]:
        time.sleep(rng.uniform(0, 0.5))  # the server is used a while
        if rng.random() < 0.6:
            client.api.stop(container["Id"], timeout=1)  # kept: holds its slot for HOLD
        else:
            client.api.remove_container(container["Id"], force=True)
            allocator.release(name, "server deleted")
        return
    decision = allocator.allocate(GpuRequest(user, name, 1), LIMITS.resolve(user))
    counters[index * 3] += 1
    if not decision.granted:
        time.sleep(rng.uniform(0.05, 0.3))  # waiting in the queue
        return
    if container is not None:
        slots = labels.parse_slot_list(container["Config"]["Labels"].get(labels.GPUS))
        if slots != decision.granted or set(slots) & set(allocator.revoked(container["Id"])):
            client.api.remove_container(container["Id"])  # re-created with the new slots
            container = None
    for _ in range(rng.randrange(3)):  # an image pull: the claim is renewed meanwhile
        time.sleep(rng.uniform(0, 0.3))
        allocator.renew(name)
    created_here = container is None
    if created_here:
        own = labels.container_labels(
            user=user,
            project=f"t{run_id}",
            group="staff" if index >= 6 else None,
            priority=90 if index >= 6 else 10,
            gpus=decision.granted,
        )
        container_labels = {
            **allocator.trust.sign(own | {CREATOR_LABEL: allocator.creator_label()}, name),
            "ds01.test": "1",
            RUN_LABEL: run_id,
        }
        container_id = client.api.create_container(
            image, ["sleep", "20"], name=name, labels=container_labels
        )["Id"]
    else:
        container_id = container["Id"]
    check = allocator.begin_start(name, container_id)
    if not check.ok:
        counters[index * 3 + 2] += 1
        if created_here:
            client.api.remove_container(container_id, force=True)
        allocator.release(name, f"not started: {check.code}")
        return
    client.api.start(container_id)
    allocator.commit(name)
    counters[index * 3 + 1] += 1


def _inspect(client, name: str) -> dict | None:
    try:
        return client.api.inspect_container(name)
    except docker.errors.NotFound:
        return None


def _running_by_slot(client, label: str) -> dict[str, list[str]]:
    by_slot: dict[str, list[str]] = {}
    for entry in client.api.containers(filters={"label": label, "status": "running"}):
        for slot in labels.parse_slot_list(entry["Labels"].get(labels.GPUS)):
            by_slot.setdefault(slot, []).append(entry["Names"][0])
    return by_slot


class EventRecorder:
    """Docker's event stream for this run, read live from before the first worker starts
    (the engine keeps only its last 256 events for `--since`)."""

    def __init__(self, label: str):
        self.events: list[dict] = []
        self._stream = docker.from_env(timeout=None).api.events(
            filters={"label": label, "type": "container", "event": ["start", "die"]},
            decode=True,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with contextlib.suppress(Exception):  # the stream ends when closed
            for event in self._stream:
                self.events.append(event)

    def close(self) -> None:
        self._stream.close()
        self._thread.join(10)

    def runs_by_slot(self) -> dict[str, list[tuple]]:
        """Slot -> (started, died or None, container id), in nanoseconds."""
        runs: list[dict] = []
        for event in self.events:
            when = event["timeNano"]
            if event["Action"] == "start":
                slots = labels.parse_slot_list(event["Actor"]["Attributes"].get(labels.GPUS))
                runs.append({"id": event["id"], "slots": slots, "start": when, "die": None})
                continue
            for run in runs:
                if run["id"] == event["id"] and run["die"] is None and run["start"] <= when:
                    run["die"] = when
        by_slot: dict[str, list[tuple]] = {}
        for run in runs:
            for slot in run["slots"]:
                by_slot.setdefault(slot, []).append((run["start"], run["die"], run["id"]))
        return by_slot


def _overlaps(by_slot: dict[str, list[tuple]]) -> list[tuple]:
    found = []
    for slot, runs in by_slot.items():
        runs.sort()
        for (_, die_a, id_a), (start_b, _, id_b) in zip(runs, runs[1:], strict=False):
            if id_a != id_b and (die_a is None or start_b < die_a):
                found.append((slot, id_a[:12], id_b[:12]))
    return found


def _wait(condition, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def test_eight_processes_killed_at_random_never_share_a_slot_nor_leak(tmp_path, docker_client):
    image = busybox_image(docker_client)
    run_id = uuid.uuid4().hex[:8]
    label = f"{RUN_LABEL}={run_id}"
    state_dir, log_path = tmp_path / "state", tmp_path / "events.db"
    context = multiprocessing.get_context("spawn")
    counters = context.Array("i", WORKERS * 3)  # per worker: allocations, starts, refusals

    def start(index: int):
        process = context.Process(
            target=_worker,
            args=(index, run_id, state_dir, log_path, image, counters),
            daemon=True,
        )
        process.start()
        return process

    recorder = EventRecorder(label)
    workers = {index: start(index) for index in range(WORKERS)}
    rng = random.Random(run_id)
    began = time.monotonic()
    kills = 0
    try:
        while time.monotonic() < began + DURATION:
            time.sleep(rng.uniform(0.2, 0.8))
            victim = rng.randrange(WORKERS)
            os.kill(workers[victim].pid, signal.SIGKILL)
            workers[victim].join(30)
            kills += 1
            workers[victim] = start(victim)
            if kills % 5 == 0:
                doubles = {s: n for s, n in _running_by_slot(docker_client, label).items()}
                assert all(len(names) == 1 for names in doubles.values()), doubles
        for process in workers.values():
            process.kill()
        for process in workers.values():
            process.join(30)

        starts = sum(counters[i * 3 + 1] for i in range(WORKERS))
        assert starts >= WORKERS and kills >= 10, (starts, kills)
        # every start a worker counted is in the stream (and those of killed ones too)
        assert _wait(lambda: sum(map(len, recorder.runs_by_slot().values())) >= starts)
        runs = recorder.runs_by_slot()
        assert _overlaps(runs) == [], runs
        totals = [sum(counters[i * 3 + k] for i in range(WORKERS)) for k in range(3)]
        print(
            f"torture: {totals[0]} allocations, {totals[1]} starts, {totals[2]} refused at the "
            f"check, {kills} kill -9, {sum(map(len, runs.values()))} runs on slots"
        )

        allocator = _allocator(docker_client, run_id, state_dir, log_path)
        # All owners are dead: only checked starts keep a claim, for GRACE at most.
        assert _wait(lambda: {h.state for h in allocator.holdings()} <= {"running", "stopped"})
        # A create sent by a killed worker may land late: reconcile until none is left.
        assert _wait(lambda: not allocator.reconcile() and allocator.ghosts() == [])
        for entry in docker_client.api.containers(filters={"label": label}):
            # A remove sent by a worker just before its kill -9 may still land now.
            with contextlib.suppress(docker.errors.NotFound):
                docker_client.api.stop(entry["Id"], timeout=1)
        assert _wait(lambda: allocator.holdings() == [], timeout=HOLD + 30)
        allocator.sweep()
        assert EventLog(log_path).open_allocations() == []
    finally:
        recorder.close()
        for process in workers.values():
            if process.is_alive():
                process.kill()
                process.join(30)
        for entry in docker_client.api.containers(all=True, filters={"label": label}):
            with contextlib.suppress(docker.errors.NotFound):
                docker_client.api.remove_container(entry["Id"], force=True)
