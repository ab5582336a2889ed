"""Fair-share benchmark: the GPU queue's ordering decision with 200 waiters and 10,000 events.

    .venv/bin/python bench/fairshare.py [--waiters 200] [--events 10000] [--runs 300]

The event log is a real SQLite file (`EventLog`, WAL) holding `--events` events: GPU intervals
(allocate + release) of 200 users in 5 groups over the last 30 days, a few still open. Rows:

- compute: `FairShare.compute` (decay + shares + factors) on the intervals already read;
- rank: the waiters ordered by effective priority with that `FairShare`: what each queue
  round pays while the allocator's fair-share cache is fresh (`fair_share_refresh`, 30 s);
- log read + compute + rank: `EventLog.intervals` (SQLite query + pairing), then both: the
  round that refreshes the cache (the whole ordering decision from the log);
- reclaim decision: `decide` with fair share on a full 64-slot machine (every slot held by a
  stopped container), the effective priorities of requester and holders included.

Each row: median and p99 over `--runs` runs, in milliseconds.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ds01hub.gpu.decision import GpuRequest, Holding, decide
from ds01hub.gpu.eventlog import EventLog, NewEvent
from ds01hub.gpu.fairshare import FairShare, Waiting, rank, relevant_since
from ds01hub.gpu.inventory import discover
from ds01hub.gpu.simulated_nvml import SimulatedNvml
from ds01hub.limits import SimulatedGpuSpec, parse_limits

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
USERS = [f"user{u}" for u in range(200)]
CONFIG = parse_limits(
    {
        "defaults": {"priority": 10},
        "groups": {f"group{g}": {"members": USERS[g::5], "priority": 10 + g} for g in range(5)},
        "gpu_allocation": {
            "fairshare": {"half_life": "7d", "weight": 20, "shares": {"group0": 3, "group1": 2}}
        },
    }
)
GROUP_OF = {user: f"group{i % 5}" for i, user in enumerate(USERS)}


def fill(log: EventLog, count: int, rng: random.Random) -> None:
    """`count` events: count/2 intervals over 30 days (1% still open: no release)."""
    events: list[NewEvent] = []
    for i in range(count // 2):
        user = rng.choice(USERS)
        start = NOW - timedelta(seconds=rng.uniform(0, 30 * 86400))
        length = timedelta(hours=rng.expovariate(1 / 6))
        slot, container = str(i % 64), f"c{i}"
        events.append(NewEvent("allocate", user, slot, container, GROUP_OF[user], at=start))
        if i % 100 or len(events) + 1 > count:
            end = min(start + length, NOW)
            events.append(NewEvent("release", user, slot, container, GROUP_OF[user], at=end))
    while len(events) < count:  # the open intervals' missing releases: other users' events
        events.append(NewEvent("spawn-failure", rng.choice(USERS), at=NOW))
    events.sort(key=lambda e: e.at or NOW)
    log.record_many(events)


def measure(runs: int, step: Callable[[], object]) -> tuple[float, float]:
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        step()
        times.append((time.perf_counter() - began) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.99))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waiters", type=int, default=200)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()
    rng = random.Random(17)
    settings = CONFIG.gpu_allocation.fairshare
    assert settings is not None
    now = NOW.timestamp()
    since = datetime.fromtimestamp(relevant_since(now, settings.half_life), UTC)
    users = [rng.choice(USERS) for _ in range(args.waiters)]
    waiting = [Waiting(f"w{i}", u, CONFIG.resolve(u).priority, i) for i, u in enumerate(users)]
    with tempfile.TemporaryDirectory() as tmp:
        log = EventLog(Path(tmp) / "events.db")
        fill(log, args.events, rng)
        stored = len(log.events())
        intervals = log.intervals(since=since, until=NOW)

        fair = FairShare.compute(settings, intervals, now)

        def compute() -> object:
            return FairShare.compute(settings, intervals, now)

        def cached() -> object:
            return rank(waiting, fair)

        def read() -> object:
            found = log.intervals(since=since, until=NOW)
            return rank(waiting, FairShare.compute(settings, found, now))

        slots = discover(
            SimulatedNvml([SimulatedGpuSpec()] * 8 + [SimulatedGpuSpec(mig=("1g.10gb",) * 7)] * 8),
            simulated=True,
        ).slots
        holdings = [
            Holding(s.id, USERS[i % 200], f"h{i}", "stopped", 10, NOW + timedelta(hours=1))
            for i, s in enumerate(slots)
        ]
        light = min(USERS, key=lambda u: fair.users[u].usage if u in fair.users else 0)
        request = GpuRequest(light, "new", 1)
        limits = CONFIG.resolve(light)

        def reclaim() -> object:
            return decide(request, slots, holdings, limits, now=NOW, fair=fair)

        rows = [
            ("fair share from the intervals (compute)", measure(args.runs, compute)),
            (f"order {args.waiters} waiters (rank)", measure(args.runs, cached)),
            (f"log read + compute + rank {args.waiters}", measure(args.runs, read)),
            ("reclaim decision, 64 held slots", measure(args.runs, reclaim)),
        ]
        ranked = cached()
        decision = reclaim()
    print(
        f"{stored} events in the log ({len(intervals)} GPU intervals within "
        f"{settings.half_life / 86400:g}-day half-life's horizon, "
        f"{len({i.user for i in intervals})} users), {args.waiters} waiters, {args.runs} runs"
    )
    print(f"{'row':<42} {'median ms':>10} {'p99 ms':>10}")
    for name, (median, p99) in rows:
        print(f"{name:<42} {median:>10.2f} {p99:>10.2f}")
    top = ranked[0]
    outcome = f"granted {','.join(decision.granted)}" if decision.ok else "refused"
    print(
        f"first served: {top[0].user} (priority {top[0].priority}, effective {top[1]:.2f}); "
        f"reclaim by {light}: {outcome}"
    )


if __name__ == "__main__":
    main()
