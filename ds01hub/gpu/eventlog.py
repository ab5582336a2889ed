"""The allocation event log: an embedded SQLite file that several processes append to.

Docker labels say who holds what *now*; this log says what happened (allocate, hold, release,
expire, reclaim, cull, spawn-failure: who, which slot, when, why) so that admins get
GPU-hours per user and group and the admin page a history. SQLite in WAL mode lets the hub,
the broker and the culler write concurrently; each thread (and each forked process) uses its
own connection, so an `EventLog` is safe to share between threads and to use after fork.

A GPU interval opens at `allocate` and closes at `release`, `expire` or `reclaim` of the same
(container, slot); `hold` (the container stopped but keeps the slot) does not close it: a held
GPU is unavailable to others, so it counts as used. `reconcile` (a container adopted, a
never-started one removed, an unknown one stopped) moves no interval.

Write errors (a full disk, an unwritable file) raise `EventLogError` naming the file and
SQLite's own message. A caller whose state change must happen whatever the log says (a release:
a slot is never kept because its event could not be written) passes `defer=True`: the events
wait in this process, in order, and are written before the next event that can be; `health()`
says how many wait and why (the admin page and the metrics show it).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ds01hub.errors import Ds01hubError

__all__ = [
    "KINDS",
    "Event",
    "EventLog",
    "EventLogError",
    "Interval",
    "NewEvent",
    "OpenAllocation",
]

KINDS = (
    "allocate",
    "hold",
    "release",
    "expire",
    "reclaim",
    "cull",
    "spawn-failure",
    "reconcile",
    "limits-expired",  # a user's override or group property limits passed their date
)
OPENS = "allocate"
CLOSES = frozenset({"release", "expire", "reclaim"})
NO_GROUP = "(no group)"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    user TEXT NOT NULL,
    grp TEXT,
    slot TEXT,
    container TEXT,
    reason TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS events_ts ON events (ts);
CREATE INDEX IF NOT EXISTS events_user ON events (user, ts);
-- The GPU intervals not yet closed, kept in step with `events` in the same transaction so
-- that finding them never scans the history.
CREATE TABLE IF NOT EXISTS open_allocations (
    container TEXT NOT NULL,
    slot TEXT NOT NULL,
    user TEXT NOT NULL,
    grp TEXT,
    since REAL NOT NULL,
    last_kind TEXT NOT NULL,
    PRIMARY KEY (container, slot)
);
"""


@dataclass(frozen=True)
class Event:
    id: int
    at: datetime
    kind: str
    user: str
    group: str | None
    slot: str | None
    container: str | None
    reason: str

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "at": self.at.isoformat(),
            "kind": self.kind,
            "user": self.user,
            "group": self.group,
            "slot": self.slot,
            "container": self.container,
            "reason": self.reason,
        }


class EventLogError(Ds01hubError, RuntimeError):
    """An event could not be written; the message names the file and SQLite's reason."""

    status = 500  # the host's failure, not the caller's


@dataclass(frozen=True)
class NewEvent:
    """One event to append (`record_many`); `at` None means now."""

    kind: str
    user: str
    slot: str | None = None
    container: str | None = None
    group: str | None = None
    reason: str = ""
    at: datetime | None = None


@dataclass(frozen=True)
class Interval:
    """One container's time on one slot, from its allocate to its release (or a clip)."""

    user: str
    group: str | None
    slot: str
    container: str
    begin: datetime
    end: datetime

    @property
    def hours(self) -> float:
        return (self.end - self.begin).total_seconds() / 3600.0

    def key(self, by: str) -> str:
        """Its user, or its group (`(no group)` for none)."""
        return self.user if by == "user" else (self.group or NO_GROUP)


@dataclass(frozen=True)
class OpenAllocation:
    container: str
    slot: str
    user: str
    group: str | None
    since: datetime
    last_kind: str


def _epoch(moment: datetime | None) -> float | None:
    return None if moment is None else _seconds(moment)


def _seconds(moment: datetime) -> float:
    """Epoch seconds; a naive datetime is UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _moment(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def _fix_for(error: sqlite3.Error, path: Path) -> str:
    """What an admin does about a write error."""
    text = str(error).lower()
    if "full" in text:
        return f"free space on the file system of {path.parent} (events wait until then)"
    if "readonly" in text or "read-only" in text:
        return f"make {path} and {path.parent} writable by this process"
    if "locked" in text or "busy" in text:
        return "another process holds the log too long; retry"
    return f"check {path} (sqlite3 {path} 'PRAGMA integrity_check')"


class EventLog:
    """Append-only accounting log in one SQLite file (created with its directory on first use)."""

    #: Events a process keeps waiting for a writable log (`defer=True`) before it drops the
    #: oldest: a log that stays broken must not grow the hub's memory without end.
    MAX_DEFERRED = 10_000

    def __init__(self, path: str | os.PathLike, timeout: float = 30.0):
        self.path = Path(path)
        self.timeout = timeout
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._connections: dict[tuple[int, int], sqlite3.Connection] = {}
        self._deferred: list[tuple] = []
        self._deferred_lock = threading.Lock()
        self.write_errors = 0
        self.dropped = 0
        self.last_error: str | None = None
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection, kept open: closing the last connection makes SQLite
        checkpoint the WAL, milliseconds per event. A forked child opens its own."""
        key = (os.getpid(), threading.get_ident())
        db = self._connections.get(key)
        if db is None:
            db = sqlite3.connect(
                self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
            )
            db.execute("PRAGMA synchronous = NORMAL")
            self._connections[key] = db
        yield db

    def close(self) -> None:
        """Close this thread's connection (others close when their threads' objects go)."""
        db = self._connections.pop((os.getpid(), threading.get_ident()), None)
        if db is not None:
            db.close()

    def record(
        self,
        kind: str,
        user: str,
        slot: str | None = None,
        container: str | None = None,
        group: str | None = None,
        reason: str = "",
        at: datetime | None = None,
    ) -> None:
        """Append one event; allocate/hold/release/expire/reclaim also move the open intervals."""
        self.record_many([NewEvent(kind, user, slot, container, group, reason, at)])

    def record_many(self, events: Iterable[NewEvent], *, defer: bool = False) -> None:
        """Append `events` in one transaction: all are written or none. Events deferred
        earlier by this process go first. With `defer`, a write error keeps the events
        waiting (see the module docstring) instead of raising."""
        rows = [self._row(event) for event in events]
        with self._deferred_lock:
            pending = [*self._deferred, *rows]
            if not pending:
                return
            try:
                self._write(pending)
            except EventLogError:
                if not defer:
                    raise
                self._deferred = pending[-self.MAX_DEFERRED :]
                self.dropped += len(pending) - len(self._deferred)
                return
            self._deferred = []

    @staticmethod
    def _row(event: NewEvent) -> tuple:
        if event.kind not in KINDS:
            raise ValueError(f"unknown event kind {event.kind!r}; use one of {', '.join(KINDS)}")
        ts = _epoch(event.at) if event.at is not None else time.time()
        return (ts, event.kind, event.user, event.group, event.slot, event.container, event.reason)

    def _write(self, rows: list[tuple]) -> None:
        """One transaction. SQLite rolls a transaction back by itself on some errors (a full
        disk among them), so ROLLBACK runs only while one is open and its own failure never
        hides the error that matters."""
        try:
            with self._connect() as db:
                db.execute("BEGIN IMMEDIATE")
                try:
                    for ts, kind, user, group, slot, container, reason in rows:
                        db.execute(
                            "INSERT INTO events (ts, kind, user, grp, slot, container, reason)"
                            " VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (ts, kind, user, group, slot, container, reason),
                        )
                        if slot is not None and container is not None:
                            self._move_interval(db, kind, user, group, slot, container, ts)
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            db.execute("ROLLBACK")
                    raise
        except sqlite3.Error as error:
            self.write_errors += 1
            self.last_error = f"{error} ({self.path})"
            raise EventLogError(
                f"cannot write the event log {self.path}: {error}; {_fix_for(error, self.path)}"
            ) from error

    def health(self) -> dict:
        """This process's write trouble: events waiting to be written, events dropped
        because too many waited, write errors so far and the last one, and the free space
        of the log's file system (None when unknown)."""
        try:
            stat = os.statvfs(self.path.parent)
            free: int | None = stat.f_bavail * stat.f_frsize
        except OSError:
            free = None
        return {
            "unwritten": len(self._deferred),
            "dropped": self.dropped,
            "write_errors": self.write_errors,
            "last_error": self.last_error,
            "free_bytes": free,
        }

    @staticmethod
    def _move_interval(
        db: sqlite3.Connection,
        kind: str,
        user: str,
        group: str | None,
        slot: str,
        container: str,
        ts: float,
    ) -> None:
        if kind == OPENS:
            # A restart within the hold re-allocates an open interval: it continues.
            db.execute(
                "INSERT INTO open_allocations (container, slot, user, grp, since, last_kind)"
                " VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (container, slot) DO UPDATE SET last_kind = excluded.last_kind",
                (container, slot, user, group, ts, kind),
            )
        elif kind == "hold":
            db.execute(
                "UPDATE open_allocations SET last_kind = ? WHERE container = ? AND slot = ?",
                (kind, container, slot),
            )
        elif kind in CLOSES:
            db.execute(
                "DELETE FROM open_allocations WHERE container = ? AND slot = ?", (container, slot)
            )

    def events(
        self,
        since: datetime | None = None,
        *,
        user: str | None = None,
        kind: str | None = None,
        limit: int | None = None,
    ) -> list[Event]:
        """Events oldest first (the newest `limit` when given)."""
        clauses: list[str] = []
        params: list[object] = []
        if since is not None:
            clauses.append("ts >= ?")
            params.append(_seconds(since))
        if user is not None:
            clauses.append("user = ?")
            params.append(user)
        if kind is not None:
            clauses.append("kind = ?")
            params.append(kind)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        query = f"SELECT id, ts, kind, user, grp, slot, container, reason FROM events {where}"
        if limit is not None:
            query = f"SELECT * FROM ({query} ORDER BY id DESC LIMIT ?) ORDER BY id"
            params.append(int(limit))
        else:
            query += " ORDER BY id"
        with self._connect() as db:
            rows = db.execute(query, params).fetchall()
        return [Event(r[0], _moment(r[1]), r[2], r[3], r[4], r[5], r[6], r[7]) for r in rows]

    def open_allocations(self) -> list[OpenAllocation]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT container, slot, user, grp, since, last_kind FROM open_allocations"
            ).fetchall()
        return [OpenAllocation(r[0], r[1], r[2], r[3], _moment(r[4]), r[5]) for r in rows]

    def intervals(
        self, since: datetime | None = None, until: datetime | None = None
    ) -> list[Interval]:
        """Every GPU interval (allocate to release/expire/reclaim of one container's slot)
        that overlaps [since, until], clipped to it; open ones end at `until` (default now).
        GPU-hours and the admin page's charts are sums over these."""
        start = _seconds(since) if since is not None else float("-inf")
        end = _seconds(until) if until is not None else time.time()
        with self._connect() as db:
            rows = db.execute(
                "SELECT ts, kind, user, grp, slot, container FROM events"
                " WHERE slot IS NOT NULL AND container IS NOT NULL AND ts <= ?"
                " AND kind IN ('allocate', 'release', 'expire', 'reclaim') ORDER BY ts, id",
                (end,),
            ).fetchall()
        opened: dict[tuple[str, str], tuple[float, str, str | None]] = {}
        found: list[Interval] = []

        def add(key: tuple[str, str], opening: tuple[float, str, str | None], finish: float):
            begin, user, group = opening
            begin, finish = max(begin, start), min(finish, end)
            if finish > begin:
                found.append(Interval(user, group, key[1], key[0], _moment(begin), _moment(finish)))

        for ts, kind, user, grp, slot, container in rows:
            interval = (container, slot)
            if kind == OPENS:
                opened.setdefault(interval, (ts, user, grp))
            elif interval in opened:
                add(interval, opened.pop(interval), ts)
        for interval, opening in opened.items():
            add(interval, opening, end)
        return found

    def gpu_hours(
        self,
        by: str = "user",
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> dict[str, float]:
        """Slot-hours per user or group (`(no group)` for none), intervals clipped to
        [since, until]; intervals still open count up to `until` (default: now)."""
        if by not in ("user", "group"):
            raise ValueError("by must be 'user' or 'group'")
        totals: dict[str, float] = {}
        for interval in self.intervals(since, until):
            key = interval.key(by)
            totals[key] = totals.get(key, 0.0) + interval.hours
        return totals
