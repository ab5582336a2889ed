"""Aggregate caps on the real engine: six processes start, stop and delete containers of ONE
user through the spawner's own gate (`ds01hub.host.aggregate_gate.start_within_caps`: the
user's lock, the check from Docker's state, `docker start`), each container 1 CPU and 64 MiB
under a cap of 2.5 CPUs and 160 MiB (so at most two at once); the test kills random ones with
SIGKILL at random points (inside the lock and `docker start` too) and starts them again.
Docker's own event stream then says when every container started and died: never may more
than two have run at once. Containers are tiny (static busybox) and carry this run's label."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import random
import signal
import time
import uuid

import docker.errors
import pytest
from harness.cli import busybox_image
from test_allocation_torture import EventRecorder

from ds01hub import labels, provenance
from ds01hub.gpu.allocator import Owner
from ds01hub.host.aggregate_gate import AggregateRefused, start_within_caps
from ds01hub.limits import AggregateLimits

pytestmark = pytest.mark.docker

WORKERS = 6
DURATION = 25.0
USER = "alice"
RUN_LABEL = "ds01.test.aggregate-torture"
CAP = AggregateLimits(cpus=2.5, memory=160 << 20)
MOST_AT_ONCE = 2  # each container: 1 CPU, 64 MiB


def _records(client, trust, run_id: str):
    def records() -> list[labels.ContainerRecord]:
        wanted = trust.label_filters([f"{labels.USER}={USER}", f"{RUN_LABEL}={run_id}"])
        entries = client.api.containers(all=True, filters={"label": wanted})
        parsed = (labels.ContainerRecord.from_docker(entry, trust) for entry in entries)
        return [r for r in parsed if r is not None]

    return records


def _worker(index: int, run_id: str, state_dir, image: str, counters) -> None:
    """One server of the user, started and stopped over and over, as the spawner does."""
    client = docker.from_env(timeout=120)
    trust = provenance.load(state_dir)
    records = _records(client, trust, run_id)
    name = labels.container_name(USER, f"w{index}-{run_id}")
    rng = random.Random()
    while True:
        try:
            _round(client, trust, records, rng, index, name, image, run_id, state_dir, counters)
        except docker.errors.APIError:  # a name taken by a late create, a busy engine: again
            time.sleep(0.05)


def _round(client, trust, records, rng, index, name, image, run_id, state_dir, counters) -> None:
    container = _inspect(client, name)
    if container is not None and container["State"]["Running"]:
        time.sleep(rng.uniform(0, 0.4))  # the server is used a while
        if rng.random() < 0.6:
            client.api.stop(container["Id"], timeout=0)
        else:
            client.api.remove_container(container["Id"], force=True)
        return
    if container is None:
        own = labels.container_labels(
            user=USER, project=f"w{index}-{run_id}", group=None, priority=10
        )
        signed = trust.sign(own | {labels.CREATOR: Owner.current().label()}, name)
        container_id = client.api.create_container(
            image,
            ["sleep", "30"],
            name=name,
            labels={**signed, "ds01.test": "1", RUN_LABEL: run_id},
            host_config=client.api.create_host_config(nano_cpus=10**9, mem_limit="64m"),
        )["Id"]
    else:
        container_id = container["Id"]

    async def start() -> None:
        await asyncio.to_thread(client.api.start, container_id)

    try:
        asyncio.run(
            start_within_caps(
                state_dir, USER, CAP, client.api, records, (name, container_id), start
            )
        )
        counters[index * 2] += 1
    except AggregateRefused:
        counters[index * 2 + 1] += 1
        time.sleep(rng.uniform(0.05, 0.3))  # waiting for one of the others to stop


def _inspect(client, name: str) -> dict | None:
    try:
        return client.api.inspect_container(name)
    except docker.errors.NotFound:
        return None


def _most_at_once(recorder: EventRecorder) -> tuple[int, list]:
    """The most containers that ran at one moment, from the start and die events."""
    changes = []
    for event in recorder.events:
        changes.append((event["timeNano"], 1 if event["Action"] == "start" else -1, event["id"]))
    changes.sort(key=lambda change: (change[0], change[1]))  # a die before a start at a tie
    running: set[str] = set()
    most, when = 0, []
    for _, step, container_id in changes:
        if step > 0:
            running.add(container_id)
        else:
            running.discard(container_id)
        if len(running) > most:
            most, when = len(running), sorted(c[:12] for c in running)
    return most, when


def test_six_processes_of_one_user_killed_at_random_never_exceed_the_caps(tmp_path, docker_client):
    image = busybox_image(docker_client)
    run_id = uuid.uuid4().hex[:8]
    label = f"{RUN_LABEL}={run_id}"
    state_dir = tmp_path / "state"
    provenance.load(state_dir)  # the deployment's key, made once before the workers read it
    context = multiprocessing.get_context("spawn")
    counters = context.Array("i", WORKERS * 2)  # per worker: starts, refusals

    def start(index: int):
        process = context.Process(
            target=_worker, args=(index, run_id, state_dir, image, counters), daemon=True
        )
        process.start()
        return process

    def running_now() -> list[str]:
        found = docker_client.api.containers(filters={"label": label, "status": "running"})
        return [entry["Names"][0] for entry in found]

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
            assert len(running_now()) <= MOST_AT_ONCE
        for process in workers.values():
            process.kill()
        for process in workers.values():
            process.join(30)
        starts = sum(counters[i * 2] for i in range(WORKERS))
        refusals = sum(counters[i * 2 + 1] for i in range(WORKERS))
        assert starts >= WORKERS and refusals > 0 and kills >= 10, (starts, refusals, kills)
        # every start a worker counted is in the stream (and those of killed ones too)
        deadline = time.monotonic() + 60
        while sum(e["Action"] == "start" for e in recorder.events) < starts:
            assert time.monotonic() < deadline, "the engine's start events did not arrive"
            time.sleep(0.2)
        most, which = _most_at_once(recorder)
        print(
            f"aggregate torture: {starts} starts, {refusals} refused by the caps, {kills} "
            f"kill -9, at most {most} running at once"
        )
        assert most <= MOST_AT_ONCE, which
        assert len(running_now()) <= MOST_AT_ONCE
    finally:
        recorder.close()
        for process in workers.values():
            if process.is_alive():
                process.kill()
                process.join(30)
        for entry in docker_client.api.containers(all=True, filters={"label": label}):
            with contextlib.suppress(docker.errors.NotFound):
                docker_client.api.remove_container(entry["Id"], force=True)
