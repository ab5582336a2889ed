"""The hub side of queued spawn requests (`ds01hub.gpu.queued` stores them): one asyncio task
per request waits in the hub's GPU queue and starts the server (`spawner._serve_queued`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from ds01hub.gpu.queued import QueuedRequest, QueuedStore, QueueFileError

__all__ = ["QueuedStarter"]

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
