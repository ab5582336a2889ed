"""Queued spawn requests, stored: a user's "wait for a GPU" that outlives the spawn and the hub.

A spawn with the `queue` option that finds no free GPU within `DS01Spawner.queue_first_wait`
is not failed for want of a slot: its request (user, server, container, options, priority,
groups, when) is written to `queued.json` in the allocator's state directory and the spawn
ends saying so. The hub's `QueuedStarter` (`ds01hub.spawner.queued`) puts every stored
request into the hub-wide `GpuQueue` (no timeout: ordered with live spawns by effective
priority, then arrival) and, when the allocator grants it slots (a claim owned by the hub
process), asks the hub's REST API to start that server; the spawn finds its own claim and gets
the same slots. The hub notes each request's position and estimate here (`note`), which
`container-list` shows.

Why the state directory and not JupyterHub's spawner state: the request must be read by the
hub at start before any spawner runs, ordered across all users at once, and kept when the
spawn that made it failed (JupyterHub saves a spawner's state only around a successful start
or a stop); the state directory already holds the allocator's claims, owned by the same
service user, written atomically (temporary file + rename) under a lock file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ds01hub.errors import Ds01hubError

__all__ = ["QueueFileError", "QueueLimitError", "QueuedRequest", "QueuedStore"]

#: Entries a queue file may hold at most (a file that grew past this is refused, not parsed).
MAX_ENTRIES = 10_000
MAX_FILE_BYTES = 8 << 20
#: How long the hub's pages show "your queued server started" after it did.
NOTICE_SECONDS = 86400.0


class QueueFileError(Ds01hubError):
    """`queued.json` is unreadable or malformed; the message names the file and the fix."""

    status = 503


class QueueLimitError(Ds01hubError):
    """The user already has the most queued requests allowed (`max_queued_per_user`)."""

    status = 429


@dataclass(frozen=True)
class QueuedRequest:
    user: str
    server: str  # JupyterHub's server name ("" = the default server)
    container: str
    options: dict[str, Any]  # user_options to start with (without `queue`)
    priority: int
    groups: tuple[str, ...] = ()
    # When the spawn first asked for a GPU: its place in the hub's GPU queue (by priority, then
    # this), kept across hub restarts.
    since: float = field(default_factory=time.time)
    # Where it stands, as the hub's GPU queue last said (None until it did): `container-list`.
    position: int | None = None
    waiting: int | None = None
    estimate: float | None = None  # epoch of the earliest hold expiry; None: no estimate

    @classmethod
    def from_dict(cls, data: Any) -> QueuedRequest:
        """Strict: every field of its type, or ValueError."""
        if not isinstance(data, dict):
            raise ValueError("an entry is not an object")
        text = ("user", "server", "container")
        if any(not isinstance(data.get(key), str) for key in text) or not data["user"]:
            raise ValueError("user, server and container must be strings")
        if not isinstance(data.get("options"), dict):
            raise ValueError("options must be an object")
        priority, since, groups = data.get("priority"), data.get("since"), data.get("groups", [])
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError("priority must be a whole number")
        if isinstance(since, bool) or not isinstance(since, int | float):
            raise ValueError("since must be a number")
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise ValueError("groups must be a list of strings")
        status = [data.get(key) for key in ("position", "waiting", "estimate")]
        if any(
            v is not None and (isinstance(v, bool) or not isinstance(v, int | float))
            for v in status
        ):
            raise ValueError("position, waiting and estimate must be numbers or null")
        position, waiting, estimate = status
        return cls(
            data["user"],
            data["server"],
            data["container"],
            data["options"],
            priority,
            tuple(groups),
            float(since),
            None if position is None else int(position),
            None if waiting is None else int(waiting),
            None if estimate is None else float(estimate),
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "groups": list(self.groups)}


class QueuedStore:
    """`queued.json`: the requests in arrival order, changed under `queued.lock`."""

    def __init__(self, state_dir: str | os.PathLike):
        self.path = Path(state_dir) / "queued.json"
        self.notices_path = Path(state_dir) / "queued-notices.json"
        self._lock_path = Path(state_dir) / "queued.lock"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self._lock_path, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def load(self) -> list[QueuedRequest]:
        """All stored requests, oldest first (none when the file does not exist)."""
        fix = f"fix or remove {self.path} (the requests in it are lost)"
        try:
            if self.path.stat().st_size > MAX_FILE_BYTES:
                raise QueueFileError(f"{self.path} is over {MAX_FILE_BYTES} bytes; {fix}")
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise QueueFileError(f"cannot read {self.path}: {error}; {fix}") from None
        if not isinstance(data, list) or len(data) > MAX_ENTRIES:
            raise QueueFileError(f"{self.path} is not a list of requests; {fix}")
        try:
            return [QueuedRequest.from_dict(entry) for entry in data]
        except ValueError as error:
            raise QueueFileError(f"{self.path}: {error}; {fix}") from None

    def _save(self, requests: list[QueuedRequest]) -> None:
        _write_json(self.path, [r.to_dict() for r in requests])

    def add(self, request: QueuedRequest, limit: int | None) -> QueuedRequest:
        """Store `request`; one for the same container keeps its place (and its `since`).
        QueueLimitError when the user has `limit` other requests queued."""
        with self._locked():
            stored = self.load()
            for entry in stored:
                if entry.container == request.container:
                    return entry
            mine = [e for e in stored if e.user == request.user]
            if limit is not None and len(mine) >= limit:
                listing = ", ".join(e.server or "(default)" for e in mine)
                raise QueueLimitError(
                    f"{request.user} already has {len(mine)} queued request(s) (at most "
                    f"{limit}, DS01Spawner.max_queued_per_user): {listing}. Cancel one (stop "
                    "that server) before queueing another."
                )
            self._save([*stored, request])
            return request

    def note(self, container: str, position: int, waiting: int, estimate: float | None) -> None:
        """The hub's GPU queue says where the request stands (written only when it moved)."""
        with self._locked():
            stored = self.load()
            changed = [
                replace(e, position=position, waiting=waiting, estimate=estimate)
                if e.container == container
                else e
                for e in stored
            ]
            if changed != stored:
                self._save(changed)

    def of_user(self, user: str) -> list[QueuedRequest]:
        """`user`'s requests (none when the file is unreadable: the hub logs that)."""
        try:
            return [r for r in self.load() if r.user == user]
        except QueueFileError:
            return []

    def remove(self, container: str, started_at: float | None = None) -> bool:
        """Forget the request; `started_at`: its server started then, which the user's hub
        pages say for `NOTICE_SECONDS` (`notices`)."""
        with self._locked():
            stored = self.load()
            kept = [e for e in stored if e.container != container]
            if len(kept) == len(stored):
                return False
            self._save(kept)
            if started_at is not None:
                [gone] = [e for e in stored if e.container == container]
                notices = [n for n in self._notices() if n["at"] > started_at - NOTICE_SECONDS]
                notice = {"user": gone.user, "server": gone.server, "since": gone.since}
                _write_json(self.notices_path, [*notices, {**notice, "at": started_at}])
            return True

    def _notices(self) -> list[dict[str, Any]]:
        try:
            data = json.loads(self.notices_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return []
        if not isinstance(data, list):
            return []
        number = (int, float)
        wanted: dict[str, type | tuple[type, ...]] = {
            "user": str,
            "server": str,
            "since": number,
            "at": number,
        }
        return [
            n
            for n in data
            if isinstance(n, dict) and all(isinstance(n.get(k), t) for k, t in wanted.items())
        ]

    def notices(self, user: str, now: float) -> list[str]:
        """'your server q, queued 12 min, started at 2026-03-01 14:00 UTC' lines, recent ones."""
        lines = []
        for notice in self._notices():
            if notice["user"] == user and now - NOTICE_SECONDS < notice["at"] <= now:
                waited = max(0, int(notice["at"] - notice["since"])) // 60
                at = datetime.fromtimestamp(notice["at"], UTC)
                name = notice["server"] or "(default)"
                lines.append(
                    f"Your queued server {name} got its GPU and started at "
                    f"{at:%Y-%m-%d %H:%M} UTC after waiting {waited} min."
                )
        return lines


def _write_json(path: Path, data: Any) -> None:
    """Replace `path` whole (temporary file, fsync, rename)."""
    temporary = path.with_suffix(".tmp")
    with open(temporary, "w") as handle:
        json.dump(data, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
