"""A user's aggregate caps checked and their container started as one step (issue 17).

The check at spawn (`ds01hub.aggregate.aggregate_refusal`) sums the user's running containers'
limits; two spawns of one user that check before either starts would both pass it. So the
check is made again right before `docker start`, and check plus start run under a per-user
lock: an exclusive `flock` on `state_dir/aggregate/<escaped user>.lock`.

Why a per-user flock and not the allocator's lock: the allocator's lock is one for the whole
host (every user's GPU decisions) and is held for file reads and writes only; holding it
across a `docker start` would make every user's spawns and GPU decisions wait for one user's
start. The cap is per user, so a per-user lock is all the invariant needs, and an flock (one
per open file, also between two spawns of one process) is released by the kernel when its
holder dies, also by `kill -9`: nothing is ever left locked. The lock is taken without
blocking a thread (tried again every `POLL` seconds, at most `timeout`): the hub's few worker
threads stay free for the holder's own Docker calls.

What counts under the lock: `ds01hub.aggregate.counts_toward_caps` (running ones, and created
ones whose creator died, whose start may still land). The same lock guards the user's cgroup
parent (`ds01hub.host.cgroups`): the spawner writes it (creating it if needed) inside `start`,
and `remove_unused_parent` removes it only when the user has no container left, both under
the lock, so a removal never takes the parent from under a start.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ds01hub import labels
from ds01hub.aggregate import ContainerUse, aggregate_refusal, counts_toward_caps
from ds01hub.errors import Ds01hubError
from ds01hub.gpu.allocator import Owner
from ds01hub.host.cgroups import remove_parent
from ds01hub.limits import AggregateLimits

__all__ = [
    "AggregateRefused",
    "UserLockTimeout",
    "counted_uses",
    "lock_path",
    "refusal_now",
    "remove_unused_parent",
    "start_within_caps",
    "user_lock",
]

#: How often a busy lock is tried again, in seconds.
POLL = 0.02
#: How long a start waits for the user's other start by default, in seconds.
LOCK_TIMEOUT = 120.0

T = TypeVar("T")


class AggregateRefused(Ds01hubError):
    """The start would take the user past their aggregate caps (the message says which)."""

    status = 409


class UserLockTimeout(Ds01hubError):
    """Another start of the same user held the lock too long."""

    status = 503


def lock_path(state_dir: str | Path, user: str) -> Path:
    """The user's lock file (the name escaped: no user name can leave the folder)."""
    return Path(state_dir) / "aggregate" / f"{labels.escape_name(user)}.lock"


@contextlib.asynccontextmanager
async def user_lock(
    state_dir: str | Path,
    user: str,
    *,
    timeout: float = LOCK_TIMEOUT,
    on_wait: Callable[[], None] | None = None,
) -> AsyncIterator[None]:
    """Hold `user`'s lock (see the module docstring); `on_wait` is called once when the lock is
    busy (a spawn says why it waits). UserLockTimeout after `timeout` seconds."""
    path = lock_path(state_dir, user)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        await _acquire(fd, user, timeout, on_wait)
        yield
    finally:
        os.close(fd)  # releases the flock


async def _acquire(fd: int, user: str, timeout: float, on_wait: Callable[[], None] | None) -> None:
    deadline = time.monotonic() + timeout
    told = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        if time.monotonic() >= deadline:
            raise UserLockTimeout(
                f"another start of {user}'s containers has not finished in {timeout:.0f}s",
                hint="try again in a minute; if it persists an admin checks the hub's log",
            )
        if not told and on_wait is not None:
            on_wait()
        told = True
        await asyncio.sleep(POLL)


def counted_uses(
    api: Any, records: Sequence[labels.ContainerRecord], exclude: str
) -> list[ContainerUse]:
    """The limits, as Docker has them, of the user's containers that count against their caps
    (`records`: the user's verified containers; `exclude`: the container being started)."""
    uses = []
    for record in records:
        if record.name == exclude or not _counts(record):
            continue
        host = api.inspect_container(record.id)["HostConfig"]
        uses.append(ContainerUse.from_host_config(record.name, host))
    return uses


def _counts(record: labels.ContainerRecord) -> bool:
    owner = Owner.from_label(record.labels.get(labels.CREATOR))
    return counts_toward_caps(record.state, owner.alive() if owner is not None else None)


def refusal_now(
    api: Any,
    user: str,
    cap: AggregateLimits,
    records: Callable[[], Sequence[labels.ContainerRecord]],
    container: tuple[str, str],
) -> str | None:
    """Why starting `container` (name, id) now breaks `cap`, from Docker's state, or None."""
    name, container_id = container
    running = counted_uses(api, records(), exclude=name)
    new = ContainerUse.from_host_config(name, api.inspect_container(container_id)["HostConfig"])
    return aggregate_refusal(user, cap, running, new)


async def start_within_caps(
    state_dir: str | Path,
    user: str,
    cap: AggregateLimits | None,
    api: Any,
    records: Callable[[], Sequence[labels.ContainerRecord]],
    container: tuple[str, str],
    start: Callable[[], Awaitable[T]],
    *,
    blocking: Callable[..., Awaitable[Any]] = asyncio.to_thread,
    on_wait: Callable[[], None] | None = None,
    timeout: float = LOCK_TIMEOUT,
) -> T:
    """Check `cap` and run `start` (the `docker start` of `container`, a (name, id) pair) under
    the user's lock; AggregateRefused (nothing started) when the caps do not allow it now.
    `blocking` runs the Docker reads off the event loop (the spawner passes its executor's).
    Without a cap, `start` runs at once."""
    if cap is None:
        return await start()
    async with user_lock(state_dir, user, timeout=timeout, on_wait=on_wait):
        refusal = await blocking(refusal_now, api, user, cap, records, container)
        if refusal:
            raise AggregateRefused(refusal)
        return await start()


async def remove_unused_parent(
    state_dir: str | Path,
    user: str,
    records: Callable[[], Sequence[labels.ContainerRecord]],
    root: str | Path,
    parent: str,
    *,
    blocking: Callable[..., Awaitable[Any]] = asyncio.to_thread,
) -> list[Path]:
    """Remove the user's cgroup `parent` under `root` when `records()` (the user's containers,
    any state) is empty: their last container is gone. Under the user's lock, so a start of a
    container made meanwhile either came first (then it is in `records`) or writes the parent
    again before its `docker start`. Returns the directories removed."""
    async with user_lock(state_dir, user):
        if await blocking(records):
            return []
        return await blocking(remove_parent, root, parent)
