"""Admin-page history benchmark: the charts and usage tables per page load, with and without
the cache.

    .venv/bin/python bench/admin_charts.py [--events 20000] [--runs 30] [--baseline main]

The event log is a real SQLite file (`EventLog`, WAL) holding `--events` events: GPU intervals
(allocate + release) of 200 users in 5 groups on 64 slots over the last 8 weeks, 1% still
open (held now). Rows, each one page load's `history` (the charts: GPU-hours per user and
group per week for 8 weeks, each slot's last 24 hours; the usage tables: GPU-hours per user and
group this week and in all):

- `--baseline` (a git ref, default main): that ref's code path, side by side in this run:
  its `ds01hub/services/ops/charts.py` (read from git) on one read of the log, and the four
  `EventLog.gpu_hours` reads of its usage tables;
- no cache: this checkout's functions, the log read and summed on every load;
- cache, log unchanged: a reload a minute later with no write since (what most of the
  page's 60-second auto-refreshes are): the finished intervals' sums are kept;
- cache, after a write: one event written before each load, so the log is read again.

Each row: median and p99 over `--runs` loads, in milliseconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType

from ds01hub.gpu.eventlog import EventLog, NewEvent
from ds01hub.services.ops.admin_page import CHART_WEEKS, ChartCache, history, week_start

NOW = datetime(2026, 3, 4, 12, 0, tzinfo=UTC)
USERS = [f"user{u}" for u in range(200)]
SLOTS = [str(s) for s in range(64)]
REPO = Path(__file__).resolve().parent.parent


def fill(log: EventLog, count: int, rng: random.Random) -> None:
    """`count` events: count/2 intervals over 8 weeks (1% still open: no release)."""
    events: list[NewEvent] = []
    for i in range(count // 2):
        user = rng.choice(USERS)
        group = f"group{USERS.index(user) % 5}"
        start = NOW - timedelta(seconds=rng.uniform(0, CHART_WEEKS * 7 * 86400))
        slot, container = SLOTS[i % len(SLOTS)], f"c{i}"
        events.append(NewEvent("allocate", user, slot, container, group, at=start))
        if i % 100:
            end = min(start + timedelta(hours=rng.expovariate(1 / 6)), NOW)
            events.append(NewEvent("release", user, slot, container, group, at=end))
    events.sort(key=lambda e: e.at or NOW)
    log.record_many(events)


def baseline_charts(ref: str) -> ModuleType | None:
    """`ref`'s charts module, loaded from git (None when git or the ref is not there)."""
    try:
        source = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{ref}:ds01hub/services/ops/charts.py"],
            capture_output=True,
            check=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    spec = importlib.util.spec_from_loader(f"baseline_charts_{ref}", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, f"{ref}:charts.py", "exec"), module.__dict__)  # noqa: S102
    return module


def baseline_load(charts: ModuleType, log: EventLog, now: datetime) -> dict:
    """What `overview` did on the baseline ref: one read of the log for the charts (its
    functions), four for the usage tables."""
    starts = charts.week_starts(now, CHART_WEEKS)
    intervals = log.intervals(since=min(starts[0], now - timedelta(hours=25)), until=now)
    usage = {
        by: (log.gpu_hours(by=by, since=week_start(now), until=now), log.gpu_hours(by=by))
        for by in ("user", "group")
    }
    return {
        "user": charts.weekly_hours(intervals, "user", starts, now),
        "group": charts.weekly_hours(intervals, "group", starts, now),
        "slots": charts.slot_day(intervals, SLOTS, now),
        "usage": usage,
    }


def measure(runs: int, step: Callable[[int], object]) -> tuple[float, float]:
    times = []
    for run in range(runs):
        began = time.perf_counter()
        step(run)
        times.append((time.perf_counter() - began) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.99))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--baseline", default="main", help="git ref of today's code path")
    args = parser.parse_args()
    rng = random.Random(5)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        log = EventLog(Path(tmp) / "events.db")
        fill(log, args.events, rng)
        old = baseline_charts(args.baseline)
        minute = timedelta(minutes=1)
        if old is not None:
            load = lambda run: baseline_load(old, log, NOW + run * minute)  # noqa: E731
            rows.append((f"{args.baseline}: read + sum every load", measure(args.runs, load)))
        else:
            print(f"(no baseline: git ref {args.baseline!r} not found)", file=sys.stderr)

        def fresh(run: int) -> object:
            return history(log, SLOTS, NOW + run * minute)

        cache = ChartCache()
        history(log, SLOTS, NOW, cache)  # the first load after a start reads the log

        def unchanged(run: int) -> object:
            return history(log, SLOTS, NOW + (run + 1) * minute, cache)

        writes = ChartCache()

        def after_write(run: int) -> object:
            at = NOW + (run + 1) * minute
            log.record("spawn-failure", "user0", at=at)  # any write re-reads the log
            return history(log, SLOTS, at, writes)

        rows += [
            ("no cache: read + sum every load", measure(args.runs, fresh)),
            ("cache, log unchanged (a reload)", measure(args.runs, unchanged)),
            ("cache, after a write (re-read)", measure(args.runs, after_write)),
        ]
        intervals = len(log.intervals(until=NOW))
        assert cache.reads == 1 and writes.reads == args.runs
    print(
        f"{args.events} events ({intervals} GPU intervals, {len(USERS)} users, {len(SLOTS)} "
        f"slots, {CHART_WEEKS} weeks), {args.runs} page loads per row"
    )
    print(f"{'row':<40} {'median ms':>10} {'p99 ms':>10}")
    for name, (median, p99) in rows:
        print(f"{name:<40} {median:>10.2f} {p99:>10.2f}")


if __name__ == "__main__":
    main()
