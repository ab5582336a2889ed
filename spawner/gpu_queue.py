"""The hub's wait queue for GPUs: concurrent spawns ask in priority order, then arrival order.

The priority is the effective one (`gpu.fairshare.rank`): the configured priority plus the
fair-share term when `gpu_allocation.fairshare` is on, recomputed at the start of every round
(usage decays and grants change it), so a user who used little recently goes before one of
the same configured priority who used much.

Arrival is when a request first asked (seconds since the epoch, `acquire(arrival=...)`): a
spawn that waited `queue_first_wait`, was stored as a queued request and is served again (by
the same hub or after its restart) keeps its place before everyone who asked later. Equal
arrivals keep the order in which they joined.

All spawns of one hub run in one process (one asyncio loop), so one `GpuQueue` per hub orders
them. Every attempt to allocate goes through the queue, also the first one, so a newcomer never
overtakes someone who waits: a dispatcher runs *rounds* in which each waiter, highest priority
first (then earliest), tries the allocator once. A waiter that gets slots, or a refusal that
waiting cannot fix (quota, bad request), leaves the queue; one refused as `busy` stays.

Rounds run when a waiter joins, when something is released (`notify`: a stop, a delete) and
every `recheck_interval` seconds while anyone waits, because holds of stopped containers expire
by time and other processes (the culler, the CLI broker's hub calls) free slots too.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ds01hub.errors import Ds01hubError
from ds01hub.gpu.decision import Decision
from ds01hub.gpu.fairshare import FairShare, Waiting, rank

__all__ = ["GpuQueue", "GpuWaitTimeout", "QueueStatus"]


class GpuWaitTimeout(Ds01hubError, TimeoutError):
    """No slot became free in time; `decision` is the last refusal (who holds what)."""

    def __init__(self, waited: float, decision: Decision | None):
        self.waited = waited
        self.decision = decision
        reason = decision.reason if decision else "no attempt finished"
        super().__init__(f"no GPU became free within {waited:.0f}s: {reason}", status=503)


@dataclass(frozen=True)
class QueueStatus:
    """Where a waiter stands, for its progress events."""

    position: int
    waiting: int
    decision: Decision


@dataclass(eq=False)
class _Waiter:
    waiting: Waiting
    attempt: Callable[[], Awaitable[Decision]] = field(compare=False)
    abandon: Callable[[Decision], Awaitable[None]] = field(compare=False)
    on_wait: Callable[[QueueStatus], None] = field(compare=False)
    future: asyncio.Future = field(compare=False)
    last: Decision | None = None

    @property
    def key(self) -> str:
        return self.waiting.key


async def _no_fair_share() -> FairShare:
    return FairShare()


class GpuQueue:
    """See the module docstring. `acquire` is the only way in."""

    def __init__(
        self,
        recheck_interval: float = 5.0,
        fair_share: Callable[[], Awaitable[FairShare]] = _no_fair_share,
    ):
        """`fair_share` gives everyone's factor now (the allocator's, read off the loop)."""
        self.recheck_interval = recheck_interval
        self._fair_share = fair_share
        self._fair = FairShare()
        self._waiters: list[_Waiter] = []
        self._wake = asyncio.Event()
        self._dispatcher: asyncio.Task | None = None

    def __len__(self) -> int:
        return len(self._waiters)

    def keys(self) -> list[str]:
        """Waiting keys (container names) in the order they will be served."""
        return [w.key for w in self._ordered()]

    def _ordered(self) -> list[_Waiter]:
        by_waiting = {id(w.waiting): w for w in self._waiters}
        ranked = rank([w.waiting for w in self._waiters], self._fair)
        return [by_waiting[id(waiting)] for waiting, _ in ranked]

    def notify(self) -> None:
        """Something was released: run a round now."""
        self._wake.set()

    async def acquire(
        self,
        key: str,
        priority: int,
        attempt: Callable[[], Awaitable[Decision]],
        *,
        user: str,
        timeout: float | None,
        abandon: Callable[[Decision], Awaitable[None]],
        on_wait: Callable[[QueueStatus], None] = lambda status: None,
        arrival: float | None = None,
    ) -> Decision:
        """Wait for a decision that is not `busy`; `attempt` runs the allocator once.
        `user`'s fair share adjusts `priority`. Raises GpuWaitTimeout after `timeout` seconds
        (None: wait until granted or cancelled); `abandon` undoes a grant that arrives after
        the waiter gave up (timeout or cancellation). `arrival`: when the request first asked
        (epoch seconds; default now), which orders it among equal priorities."""
        waiter = _Waiter(
            Waiting(key, user, priority, time.time() if arrival is None else arrival),
            attempt,
            abandon,
            on_wait,
            asyncio.get_running_loop().create_future(),
        )
        self._waiters.append(waiter)
        self._ensure_dispatcher()
        self.notify()
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.future), timeout)
        except TimeoutError:
            raise GpuWaitTimeout(timeout, waiter.last) from None
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            if not waiter.future.done():
                waiter.future.cancel()

    def _ensure_dispatcher(self) -> None:
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch())

    async def _dispatch(self) -> None:
        while self._waiters:
            self._wake.clear()
            await self._round()
            if not self._waiters:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.recheck_interval)

    async def _round(self) -> None:
        try:
            self._fair = await self._fair_share()
        except Exception:  # an unreadable log orders by configured priority, never stops spawns
            self._fair = FairShare()
        for waiter in self._ordered():
            if waiter.future.done():
                continue
            try:
                decision = await waiter.attempt()
            except Exception as error:  # the allocator failed: that spawn fails, not the queue
                if not waiter.future.done():
                    waiter.future.set_exception(error)
                continue
            if waiter.future.done():  # gave up while this attempt ran
                if decision.ok and decision.granted:
                    await waiter.abandon(decision)
                continue
            if decision.code == "busy":
                waiter.last = decision
            else:
                self._waiters.remove(waiter)
                waiter.future.set_result(decision)
        ordered = self._ordered()
        for position, waiter in enumerate(ordered, 1):
            if waiter.last is not None and not waiter.future.done():
                waiter.on_wait(QueueStatus(position, len(ordered), waiter.last))
