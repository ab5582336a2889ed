"""Allocator benchmark: one decision with 1,000 managed containers and 64 GPU slots.

    .venv/bin/python bench/allocator.py [--decisions 2000] [--cycles 150]

Machine: a SIMULATED inventory of 64 slots (8 whole GPUs + 8 GPUs in 7 MIG 1g.10gb each).
Containers: a recorded snapshot of 1,000 managed-container inspect documents (running,
stopped within their hold, stopped past it, CPU-only), served by `container_lister` instead of
the Docker engine, so the figures measure ds01hub's code (parsing labels, holds, the lock, the
reservation file, the event log), not dockerd. Rows, side by side in one run:

- decide (pure): `allocator.decide` on holdings already built from the 1,000 records;
- allocate (full path): `GpuAllocator.allocate` = parse 1,000 documents + holds + flock +
  claim write, without and with the SQLite event log;
- begin_start: the check before `docker start` (listing, claim, revocations, other holders
  of the slots, under the lock; the claim turned `starting`);
- allocations/s through the real lock and reservation file: 1 process, then 8 processes at
  once (each cycle: allocate one slot, then release it).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ds01hub import labels
from ds01hub.gpu.allocator import GpuAllocator
from ds01hub.gpu.decision import GpuRequest, decide
from ds01hub.gpu.eventlog import EventLog
from ds01hub.gpu.inventory import Inventory, discover
from ds01hub.gpu.simulated_nvml import SimulatedNvml
from ds01hub.limits import SimulatedGpuSpec, parse_limits
from ds01hub.provenance import Provenance

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
#: The recorded snapshot's deployment key: its documents model real (signed) containers.
TRUST = Provenance("bench", bytes(range(32)))
LIMITS = parse_limits(
    {
        "defaults": {"max_gpus": 2, "gpu_hold_after_stop": "2h", "priority": 10},
        "groups": {
            f"group{g}": {"members": [f"user{u}" for u in range(g, 200, 5)], "priority": 10 + g}
            for g in range(5)
        },
    }
)


def inventory() -> Inventory:
    gpus = [SimulatedGpuSpec() for _ in range(8)]
    gpus += [SimulatedGpuSpec(mig=("1g.10gb",) * 7) for _ in range(8)]
    return discover(SimulatedNvml(gpus, "bench"), simulated=True)


def snapshot(slots: list[str]) -> list[dict]:
    """1,000 inspect documents: 40 running + 8 recently stopped holding slots (16 free),
    300 stopped past their hold with stale GPU labels, the rest CPU-only."""
    docs = []
    held = iter(slots[:48])
    for i in range(1000):
        user = f"user{i % 200}"
        if i < 40:
            gpus, state, finished = [next(held)], "running", None
        elif i < 48:
            gpus, state, finished = [next(held)], "exited", NOW - timedelta(minutes=30)
        elif i < 348:
            gpus, state, finished = [slots[i % 64]], "exited", NOW - timedelta(days=2)
        else:
            gpus, state = [], "running" if i % 2 else "exited"
            finished = None if state == "running" else NOW - timedelta(hours=1)
        docs.append(
            {
                "Id": f"{i:064x}",
                "Name": f"/p{i}._.{user}",
                "Config": {
                    "Labels": TRUST.sign(
                        labels.container_labels(
                            user=user, project=f"p{i}", group=None, priority=10, gpus=gpus
                        ),
                        f"p{i}._.{user}",
                    ),
                    "Image": "ds01hub/singleuser",
                },
                "State": {
                    "Status": state,
                    "FinishedAt": finished.isoformat() if finished else "0001-01-01T00:00:00Z",
                },
            }
        )
    return docs


def make_allocator(state_dir: Path, docs: list[dict], eventlog: EventLog | None) -> GpuAllocator:
    return GpuAllocator(
        None,
        inventory(),
        state_dir,
        eventlog,
        clock=lambda: NOW,
        limits=LIMITS,
        container_lister=lambda: docs,
        trust=TRUST,
    )


def percentiles(samples_ns: list[int]) -> tuple[float, float]:
    ordered = sorted(samples_ns)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return statistics.median(ordered) / 1000, p99 / 1000


def bench_decide(docs: list[dict], n: int) -> tuple[float, float]:
    allocator = make_allocator(Path(tempfile.mkdtemp()), docs, None)
    holdings = allocator.holdings()
    slots = allocator.inventory.slots
    limits = LIMITS.resolve("newcomer")
    samples = []
    for i in range(n):
        request = GpuRequest("newcomer", f"c{i}", 1)
        start = time.perf_counter_ns()
        decision = decide(request, slots, holdings, limits, now=NOW)
        samples.append(time.perf_counter_ns() - start)
        assert decision.ok
    return percentiles(samples)


def bench_allocate(docs: list[dict], n: int, with_log: bool) -> tuple[float, float]:
    state_dir = Path(tempfile.mkdtemp())
    log = EventLog(state_dir / "events.db") if with_log else None
    allocator = make_allocator(state_dir, docs, log)
    limits = LIMITS.resolve("newcomer")
    samples = []
    for i in range(n):
        request = GpuRequest("newcomer", f"c{i}", 1)
        start = time.perf_counter_ns()
        decision = allocator.allocate(request, limits)
        samples.append(time.perf_counter_ns() - start)
        assert decision.ok, decision.reason
        allocator.release(request.container, "bench")
    return percentiles(samples)


def bench_begin_start(docs: list[dict], n: int) -> tuple[float, float]:
    state_dir = Path(tempfile.mkdtemp())
    allocator = make_allocator(state_dir, docs, EventLog(state_dir / "events.db"))
    limits = LIMITS.resolve("newcomer")
    samples = []
    for i in range(n):
        name = f"c{i}._.newcomer"
        decision = allocator.allocate(GpuRequest("newcomer", name, 1), limits)
        docs.append(_created(name, decision.granted))
        start = time.perf_counter_ns()
        check = allocator.begin_start(name, docs[-1]["Id"])
        samples.append(time.perf_counter_ns() - start)
        assert check.ok, check.reason
        docs.pop()
        allocator.release(name, "bench")
    return percentiles(samples)


def _created(name: str, slots: tuple[str, ...]) -> dict:
    """The inspect document of a container just created for `slots`, not started."""
    return {
        "Id": f"new-{name}",
        "Name": f"/{name}",
        "Config": {
            "Labels": labels.container_labels(
                user="newcomer", project=name, group=None, priority=10, gpus=slots
            ),
            "Image": "ds01hub/singleuser",
        },
        "State": {"Status": "created", "FinishedAt": "0001-01-01T00:00:00Z"},
    }


def _worker(state_dir: str, worker: int, cycles: int, start_at: float, out) -> None:
    docs = snapshot([s.id for s in inventory().slots])
    allocator = make_allocator(Path(state_dir), docs, EventLog(Path(state_dir) / "events.db"))
    user = f"bench{worker}"
    limits = LIMITS.resolve(user)
    while time.time() < start_at:
        time.sleep(0.001)
    granted = 0
    begin = time.perf_counter()
    for i in range(cycles):
        name = f"w{worker}-{i}"
        decision = allocator.allocate(GpuRequest(user, name, 1), limits)
        granted += bool(decision.granted)
        allocator.release(name, "bench")
    out.put((granted, cycles, begin, time.perf_counter()))


def bench_processes(processes: int, cycles: int) -> tuple[float, int, int]:
    """Allocations per second over all processes (wall time from first start to last end)."""
    state_dir = tempfile.mkdtemp()
    EventLog(Path(state_dir) / "events.db")
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    start_at = time.time() + 1.0
    workers = [
        context.Process(target=_worker, args=(state_dir, w, cycles, start_at, out))
        for w in range(processes)
    ]
    for worker in workers:
        worker.start()
    results = [out.get(timeout=600) for _ in workers]
    for worker in workers:
        worker.join()
    granted = sum(r[0] for r in results)
    total = sum(r[1] for r in results)
    wall = max(r[3] for r in results) - min(r[2] for r in results)
    return granted / wall, granted, total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=2000, help="timed decisions per row")
    parser.add_argument("--cycles", type=int, default=150, help="allocate+release per process")
    args = parser.parse_args()
    docs = snapshot([s.id for s in inventory().slots])
    print(
        f"1,000 managed containers (recorded snapshot), 64 SIMULATED slots, "
        f"{os.cpu_count()} CPU(s), Python {sys.version.split()[0]}"
    )
    rows = [
        ("decide (pure)", *bench_decide(docs, args.decisions)),
        ("allocate, full path, no event log", *bench_allocate(docs, args.decisions // 4, False)),
        (
            "allocate, full path + SQLite event log",
            *bench_allocate(docs, args.decisions // 4, True),
        ),
        ("begin_start (check before docker start)", *bench_begin_start(docs, args.decisions // 4)),
    ]
    print(f"\n{'per decision':<42}{'median':>12}{'p99':>12}")
    for name, median, p99 in rows:
        print(f"{name:<42}{median:>10.1f}us{p99:>10.1f}us")
    print(f"\n{'throughput (allocate + release cycles)':<42}{'alloc/s':>12}{'granted':>12}")
    for processes in (1, 8):
        rate, granted, total = bench_processes(processes, args.cycles)
        label = f"{processes} process{'es' if processes > 1 else ''}, shared lock + state"
        print(f"{label:<42}{rate:>12.0f}{f'{granted}/{total}':>12}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
