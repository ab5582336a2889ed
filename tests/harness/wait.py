"""Bounded waits: how a test waits for something another process (or task) will do.

A test that sleeps a fixed time and then asserts races the write it expects: on a loaded
machine the write comes later and the test fails. These poll a predicate until it holds, up to
a deadline, and then fail with a message that says what was awaited (and, when ``message`` is a
callable, whatever it adds: a hub log, the last value seen).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

Message = str | Callable[[], str]


class WaitTimeout(AssertionError):
    """What a test waited for did not happen within its bound."""


def _timed_out(timeout: float, message: Message, last: object) -> WaitTimeout:
    text = message() if callable(message) else message
    return WaitTimeout(f"not within {timeout:g}s: {text or 'condition'} (last value: {last!r})")


def wait_until(
    predicate: Callable[[], T], timeout: float, interval: float = 0.2, message: Message = ""
) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns a truthy value, and return
    that value; after ``timeout`` seconds raise `WaitTimeout` with ``message`` (a string, or a
    callable evaluated only then, e.g. ``hub.log``). The predicate runs at least once, and once
    more at the deadline, so a slow machine never loses the last chance."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(timeout, message, value)
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


async def wait_until_async(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float,
    interval: float = 0.05,
    message: Message = "",
) -> T:
    """`wait_until` inside an event loop: the same contract, sleeping with ``asyncio.sleep`` so
    the tasks being waited for run; ``predicate`` may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(timeout, message, value)
        await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))
