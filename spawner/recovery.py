"""What the hub does when the Docker engine goes away and comes back (dockerd stopped,
restarted or upgraded under a running hub; docs/architecture.md, "Engine restart").

One `EngineRecovery` per hub context follows the engine with a `ds01hub.engine.EngineWatcher`
and knows the hub's DS01Spawners (each registers itself when it starts or is polled):

- A container of a running server dies, for any cause: that server is polled at once
  (`poll_and_notify`), so the hub stops its route and record instead of reporting a dead server
  as ready until its next periodic poll.
- The event stream ends (the engine is stopping or restarting): the containers of running and
  starting servers, and those that died in the last `SHUTDOWN_WINDOW` seconds, are noted as
  *casualties*, and running servers are polled at once. While the engine is unreachable
  `DS01Spawner.poll` reports them stopped (`stopped_status`): without live-restore, dockerd
  stops every container when it stops. Queued spawns get a round at once (they fail with the
  engine's message); a spawn waiting for Jupyter sees it through its own poll.
- The engine answers again: each casualty that is not running gives its GPU slots back at once
  (`GpuAllocator.end_hold`, a `release` event naming the outage): its server is gone and its
  user did not stop it, so nothing is held for a server that does not exist. The container is
  kept (its next start re-creates it on fresh slots). The queue runs a round; one log line
  says what happened.

A casualty list lives in the hub's memory: if the hub itself restarts while the engine is
away, those containers' holds run their ordinary course (`gpu_hold_after_stop`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor
from typing import Any

from ds01hub.engine import EngineState, EngineWatcher, Outage, short_error

__all__ = ["SHUTDOWN_WINDOW", "EngineRecovery"]

#: dockerd stops its containers for up to its shutdown timeout (15 s by default) before it
#: exits and the event stream ends: deaths this recent count as the engine's doing.
SHUTDOWN_WINDOW = 30.0


class EngineRecovery:
    """See the module docstring. Every method but `track`'s watcher runs on the hub's loop."""

    def __init__(
        self,
        client: Any,
        allocator: Any,
        queue: Any,
        executor: Executor,
        *,
        extra_labels: tuple[str, ...] = (),
        log: logging.Logger | None = None,
        fresh_client: Callable[[], Any],
        engine_name: str = "the Docker engine",
    ):
        self.client = client
        self.allocator = allocator
        self.queue = queue
        self.executor = executor
        self.extra_labels = extra_labels
        self.log = log or logging.getLogger("ds01hub.spawner")
        self.state = EngineState(engine_name, self.log, connect=fresh_client)
        self.spawners: weakref.WeakSet = weakref.WeakSet()
        self.casualties: dict[str, str] = {}  # container id -> name
        self._deaths: dict[str, tuple[str, float]] = {}  # id -> (name, monotonic time)
        self._disrupted_at: float | None = None  # monotonic: last stream end or outage
        self._watcher: EngineWatcher | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()

    # -- what spawners call --------------------------------------------------------------------

    def track(self, spawner: Any) -> None:
        """Answer for `spawner` from now on; the first call starts watching the engine."""
        self.spawners.add(spawner)
        if self._watcher is None:
            self._loop = asyncio.get_running_loop()
            self._watcher = EngineWatcher(
                self.client,
                self.state,
                on_die=self._on_loop(self._died),
                on_stream_end=self._stream_end_seen,
                on_back=self._on_loop(self._back),
                extra_labels=self.extra_labels,
            ).start()

    def stopped_status(self, spawner: Any, error: BaseException) -> str | None:
        """`DS01Spawner.poll`'s answer while the engine is unreachable: stopped (and noted as
        a casualty), since dockerd stops its containers when it stops; still running (None)
        where live-restore keeps them."""
        self.state.lost(error)
        self._disrupted_at = time.monotonic()
        if self.state.live_restore:
            return None
        self.note_casualty(spawner)
        return f"{self.state.name} is unreachable ({short_error(error)}); it stopped the container"

    def note_casualty(self, spawner: Any) -> None:
        """The spawner's container went down with the engine: its hold ends once it is back."""
        if spawner.object_id:
            self.casualties[spawner.object_id] = spawner.object_name

    def disrupted_since(self, began: float) -> bool:
        """Whether the engine went away (or its stream ended) after `began` (monotonic)."""
        return not self.state.up or (self._disrupted_at is not None and self._disrupted_at >= began)

    def went_away_since(self, began: float) -> bool:
        """Whether a container that just stopped was stopped by its engine (blocking). A
        stopping dockerd first closes its socket, then stops its containers, answering on
        connections already open until it exits: so a fresh connection asks. Behind systemd's
        socket it waits for the new dockerd, by when the event stream has ended."""
        if self.disrupted_since(began):
            return True
        with contextlib.suppress(Exception):  # an engine that answers an error is still there
            self.state.probe()
        return self.disrupted_since(began)

    # -- what the watcher reports --------------------------------------------------------------

    def _on_loop(self, handler: Callable[..., Coroutine]) -> Callable[..., None]:
        """A thread-safe callback that runs `handler` as a task on the hub's loop."""

        def schedule(*args: Any) -> None:
            def start() -> None:
                task = asyncio.ensure_future(handler(*args))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

            self._loop.call_soon_threadsafe(start)

        return schedule

    def _stream_end_seen(self) -> None:
        """On the watcher's thread: record the moment now (`went_away_since` reads it from
        another thread before the loop gets to `_stream_ended`)."""
        self._disrupted_at = time.monotonic()
        self._on_loop(self._stream_ended)()

    def _active(self) -> list[Any]:
        """Spawners whose server is running or starting."""
        return [s for s in list(self.spawners) if s.ready or s.pending == "spawn"]

    async def _poll(self, spawner: Any) -> None:
        try:
            await spawner.poll_and_notify()
        except Exception:
            self.log.exception("ds01: polling %s failed", spawner._log_name)

    async def _died(self, container_id: str) -> None:
        now = time.monotonic()
        self._deaths = {k: v for k, v in self._deaths.items() if now - v[1] <= SHUTDOWN_WINDOW}
        for spawner in self._active():
            if spawner.object_id == container_id:
                self._deaths[container_id] = (spawner.object_name, now)
                if spawner.ready:
                    await self._poll(spawner)

    async def _stream_ended(self) -> None:
        now = time.monotonic()
        for container_id, (name, at) in self._deaths.items():
            if now - at <= SHUTDOWN_WINDOW:
                self.casualties[container_id] = name
        self._deaths.clear()
        active = self._active()
        for spawner in active:
            self.note_casualty(spawner)
        self.queue.notify()
        await asyncio.gather(*(self._poll(s) for s in active if s.ready))

    async def _back(self, outage: Outage | None) -> None:
        casualties, self.casualties = self.casualties, {}
        when = (
            f"at {outage.since:%Y-%m-%d %H:%M:%S} UTC for {outage.seconds:.0f}s"
            if outage is not None
            else "(restarted)"
        )
        reason = f"the Docker engine stopped {when}; the server stopped with it"
        loop = asyncio.get_running_loop()
        released = []
        for container_id, name in casualties.items():
            try:
                slots = await loop.run_in_executor(
                    self.executor, self.allocator.end_hold, container_id, reason
                )
            except Exception:
                self.log.exception("ds01: giving back the GPU hold of %s failed", name)
                continue
            if slots:
                released.append(f"{name} (slot {', '.join(slots)})")
        self.queue.notify()
        await asyncio.gather(*(self._poll(s) for s in self._active() if s.ready))
        self.log.warning(
            "ds01: %s answers again; %d container(s) stopped with it; GPU holds given back: %s",
            self.state.name,
            len(casualties),
            ", ".join(released) or "none",
        )
