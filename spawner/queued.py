"""Queued spawn requests: a user's "wait for a GPU" that outlives the spawn and the hub.

A spawn with the `queue` option that finds no free GPU within `DS01Spawner.queue_first_wait`
is not failed for want of a slot: its request (user, server, container, options, priority,
groups, when) is written to `queued.json` in the allocator's state directory and the spawn
ends saying so (its position). The hub's `QueuedStarter` puts every stored request into the
hub-wide `GpuQueue` (no timeout: ordered with live spawns by effective priority, then arrival)
and, when the allocator grants it slots (a claim owned by the hub process), asks the hub's REST
API to start that server; the spawn finds its own claim and gets the same slots.

Why the state directory and not JupyterHub's spawner state: the request must be read by the
hub at start before any spawner runs, ordered across all users at once, and kept when the
spawn that made it failed (JupyterHub saves a spawner's state only around a successful start
or a stop); the state directory already holds the allocator's claims, owned by the same
service user, written atomically (temporary file + rename) under a lock file.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["QueueFileError", "QueueLimitError", "QueuedRequest", "QueuedStarter", "QueuedStore"]

#: Entries a queue file may hold at most (a file that grew past this is refused, not parsed).
MAX_ENTRIES = 10_000
MAX_FILE_BYTES = 8 << 20


class QueueFileError(RuntimeError):
    """`queued.json` is unreadable or malformed; the message names the file and the fix."""


class QueueLimitError(ValueError):
    """The user already has the most queued requests allowed (`max_queued_per_user`)."""


@dataclass(frozen=True)
class QueuedRequest:
    user: str
    server: str  # JupyterHub's server name ("" = the default server)
    container: str
    options: dict[str, Any]  # user_options to start with (without `queue`)
    priority: int
    groups: tuple[str, ...] = ()
    since: float = field(default_factory=time.time)

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
        return cls(
            data["user"],
            data["server"],
            data["container"],
            data["options"],
            priority,
            tuple(groups),
            float(since),
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "groups": list(self.groups)}


class QueuedStore:
    """`queued.json`: the requests in arrival order, changed under `queued.lock`."""

    def __init__(self, state_dir: str | os.PathLike):
        self.path = Path(state_dir) / "queued.json"
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
        temporary = self.path.with_suffix(".tmp")
        with open(temporary, "w") as handle:
            json.dump([r.to_dict() for r in requests], handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)

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

    def remove(self, container: str) -> bool:
        with self._locked():
            stored = self.load()
            kept = [e for e in stored if e.container != container]
            if len(kept) != len(stored):
                self._save(kept)
            return len(kept) != len(stored)


Serve = Callable[[QueuedRequest], Awaitable[None]]


class QueuedStarter:
    """One task per stored request: `serve(request)` waits in the hub's GPU queue and starts
    the server (or fails for good, saying why in the event log). The request stays stored
    until `serve` returns, so a hub stopped meanwhile finds it again (`resume`)."""

    def __init__(self, store: QueuedStore, serve: Serve, log: Any):
        self.store = store
        self._serve = serve
        self._log = log
        self._tasks: dict[str, asyncio.Task] = {}

    def waiting(self, container: str) -> bool:
        task = self._tasks.get(container)
        return task is not None and not task.done()

    def resume(self) -> int:
        """Start a task for every stored request (at hub start); how many."""
        try:
            stored = self.store.load()
        except QueueFileError as error:
            self._log.error("ds01: queued spawn requests not resumed: %s", error)
            return 0
        for request in stored:
            self.follow(request)
        return len(stored)

    def follow(self, request: QueuedRequest) -> None:
        if not self.waiting(request.container):
            task = asyncio.get_running_loop().create_task(self._run(request))
            self._tasks[request.container] = task

    def stop_waiting(self, container: str) -> bool:
        """Cancel the request's task (on the event loop); `store.remove` forgets it."""
        task = self._tasks.pop(container, None)
        if task is None or task.done():
            return False
        task.cancel()
        return True

    async def _run(self, request: QueuedRequest) -> None:
        try:
            await self._serve(request)
        except asyncio.CancelledError:
            raise
        except Exception:
            self._log.exception("ds01: queued request for %s failed", request.container)
        self.store.remove(request.container)
