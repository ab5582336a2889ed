"""The SQLite event log: intervals, GPU-hours per user and group, several writers at once."""

import multiprocessing
import sqlite3
from datetime import UTC, datetime, timedelta

import pytest

from ds01hub.gpu.eventlog import EventLog

T0 = datetime(2026, 1, 10, 8, 0, tzinfo=UTC)


def h(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def test_gpu_hours_per_user_and_group_with_holds_counted(tmp_path):
    log = EventLog(tmp_path / "events.db")
    log.record("allocate", "alice", slot="0", container="a", group="students", at=h(0))
    log.record("hold", "alice", slot="0", container="a", group="students", at=h(2))
    log.record("expire", "alice", slot="0", container="a", group="students", at=h(3))
    log.record("allocate", "bob", slot="1", container="b", group="staff", at=h(1))
    log.record("allocate", "bob", slot="2:0", container="b", group="staff", at=h(1))
    log.record("release", "bob", slot="1", container="b", group="staff", at=h(5))
    log.record("reclaim", "bob", slot="2:0", container="b", group="staff", at=h(2))
    assert log.gpu_hours(until=h(10)) == {"alice": 3.0, "bob": 5.0}
    assert log.gpu_hours(by="group", until=h(10)) == {"students": 3.0, "staff": 5.0}
    # clipped to a window
    assert log.gpu_hours(since=h(2), until=h(4)) == {"alice": 1.0, "bob": 2.0}


def test_open_intervals_count_up_to_until_and_restart_continues_one(tmp_path):
    log = EventLog(tmp_path / "events.db")
    log.record("allocate", "carol", slot="0", container="c", at=h(0))
    log.record("hold", "carol", slot="0", container="c", at=h(1))
    log.record("allocate", "carol", slot="0", container="c", at=h(2))  # restarted within hold
    assert log.gpu_hours(until=h(4)) == {"carol": 4.0}
    (interval,) = log.open_allocations()
    assert (interval.container, interval.slot, interval.since) == ("c", "0", h(0))
    assert interval.last_kind == "allocate"
    log.record("release", "carol", slot="0", container="c", at=h(4))
    assert log.open_allocations() == []
    assert log.gpu_hours(by="group", until=h(8)) == {"(no group)": 4.0}


def test_events_filter_and_limit(tmp_path):
    log = EventLog(tmp_path / "events.db")
    for i in range(5):
        log.record("allocate", f"u{i}", slot=str(i), container=f"c{i}", at=h(i))
    log.record("cull", "u1", container="c1", reason="idle 12h", at=h(6))
    assert [e.user for e in log.events(since=h(3))] == ["u3", "u4", "u1"]
    assert [e.kind for e in log.events(user="u1")] == ["allocate", "cull"]
    assert [e.user for e in log.events(limit=2)] == ["u4", "u1"]
    cull = log.events(kind="cull")[0]
    assert cull.reason == "idle 12h" and cull.at == h(6) and cull.slot is None
    assert cull.to_dict()["at"] == h(6).isoformat()


def test_unknown_kind_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown event kind 'grab'"):
        EventLog(tmp_path / "e.db").record("grab", "x")


def test_wal_mode(tmp_path):
    EventLog(tmp_path / "e.db")
    mode = sqlite3.connect(tmp_path / "e.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def _writer(path: str, worker: int, count: int) -> None:
    log = EventLog(path)
    for i in range(count):
        log.record("allocate", f"w{worker}", slot=str(i), container=f"w{worker}-{i}")


def test_several_processes_write_at_once_without_losing_events(tmp_path):
    """Fresh processes ("spawn"), not forks: a fork of the test process copies whatever lock
    another thread of it holds at that moment (threads left by earlier tests: an executor in
    SQLite, a logging handler), and the child then waits on it for ever."""
    path = str(tmp_path / "events.db")
    EventLog(path)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_writer, args=(path, w, 50)) for w in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0, f"writer {worker.name}: exit code {worker.exitcode}"
    log = EventLog(path)
    assert len(log.events()) == 200
    assert len(log.open_allocations()) == 200
