"""The host's one build manager (ds01hub.actions.builds): its bookkeeping, and the two host-wide
rules across doors and processes: at most `max_concurrent` builds run at once, one build per
user at a time. Two managers on one state directory are the broker and the ds01 service (the
kernel's flock tells their open files apart as it tells two processes apart); a real second
process killed with -9 shows that a dead door's slots come back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest
from harness import wait_until_async

from ds01hub.actions.builds import CANCELLED, BuildManager, HostBuildLocks
from ds01hub.actions.images import BuildEvent, ImageSpec
from ds01hub.actions.operations import OperationError


def _events(*texts: str, fail: bool = False, hold: threading.Event | None = None):
    """A build that logs `texts`, then (once `hold` is set, if given) fails or is done."""

    def run(spec):
        for text in texts:
            yield BuildEvent("log", text, 0.5)
        if hold is not None:
            hold.wait(30)
        if fail:
            raise RuntimeError("engine went away")
        yield BuildEvent("done", "built", 1.0, image_id="sha256:x", tag=spec.tag)

    return run


async def _finish(build):
    while not build.finished:
        await build.changed.wait()
    return build


class Gate:
    """Builds that run until the test lets them finish, counting how many run at once."""

    def __init__(self):
        self.running: set[str] = set()
        self.most = 0
        self.release: dict[str, threading.Event] = {}
        self.lock = threading.Lock()

    def run(self, spec):
        with self.lock:
            self.running.add(spec.user)
            self.most = max(self.most, len(self.running))
            gate = self.release.setdefault(spec.user, threading.Event())
        yield BuildEvent("log", "started", 0.1)
        gate.wait(30)
        with self.lock:
            self.running.discard(spec.user)
        yield BuildEvent("done", "built", 1.0, image_id="sha256:x", tag=spec.tag)

    def finish(self, user: str) -> None:
        with self.lock:
            self.release.setdefault(user, threading.Event()).set()


async def test_build_manager_runs_one_build_per_user_and_keeps_events_in_order(tmp_path):
    hold = threading.Event()  # ann's build runs until the test has tried a second one
    manager = BuildManager(_events("a", "b", "c", hold=hold), tmp_path, max_concurrent=1)
    build = manager.start(ImageSpec("ann", "one"))
    with pytest.raises(OperationError) as refused:
        manager.start(ImageSpec("ann", "two"))
    assert refused.value.status == 409
    other = manager.start(ImageSpec("ben", "one"))  # another user may build meanwhile (queued)
    hold.set()
    await _finish(build)
    await _finish(other)
    assert [e["text"] for e in build.events] == ["a", "b", "c", "built"]
    assert build.status == "done" and build.finished_at
    assert manager.get("ben", build.id) is None and manager.get("ann", build.id) is build
    assert build.to_dict(since=3)["events"] == [build.events[3]]
    manager.shutdown()


async def test_build_manager_reports_a_crash_as_an_error_event_and_forgets_old_builds(tmp_path):
    manager = BuildManager(_events("x", fail=True), tmp_path, keep_per_user=2)
    builds = []
    for name in ("a", "b", "c"):
        builds.append(await _finish(manager.start(ImageSpec("ann", name))))
    assert builds[-1].status == "error"
    assert builds[-1].events[-1]["text"] == "build failed: engine went away"
    assert [b.spec.name for b in manager.for_user("ann")] == ["b", "c"]
    manager.shutdown()


async def test_two_doors_share_the_hosts_build_slots(tmp_path):
    """Broker and ds01 service each take builds; 3 at once on the host: 2 run, 1 waits (and
    says so) until a slot frees."""
    gate = Gate()
    broker = BuildManager(gate.run, tmp_path, max_concurrent=2)
    service = BuildManager(gate.run, tmp_path, max_concurrent=2)
    first = broker.start(ImageSpec("ann", "one"))
    second = service.start(ImageSpec("ben", "one"))
    await wait_until_async(lambda: len(gate.running) == 2, 10, message="two builds running")
    third = broker.start(ImageSpec("cid", "one"))
    await wait_until_async(lambda: third.events, 10, message="the queued build says it waits")
    assert third.status == "queued"
    assert "waiting for a free build slot (2 builds run at once" in third.events[0]["text"]
    gate.finish("ann")
    await _finish(first)
    await wait_until_async(lambda: third.status == "running", 10, message="third runs")
    gate.finish("ben")
    gate.finish("cid")
    for build in (second, third):
        assert (await _finish(build)).status == "done"
    assert gate.most == 2
    broker.shutdown()
    service.shutdown()


async def test_one_build_per_user_holds_across_doors(tmp_path):
    gate = Gate()
    broker = BuildManager(gate.run, tmp_path)
    service = BuildManager(gate.run, tmp_path)
    build = service.start(ImageSpec("ann", "torch"))
    with pytest.raises(OperationError) as refused:
        broker.start(ImageSpec("ann", "other"))
    assert refused.value.status == 409
    assert refused.value.message == "your build of 'torch' is still running"
    assert "wait for it to finish" in refused.value.hint
    gate.finish("ann")
    await _finish(build)
    again = broker.start(ImageSpec("ann", "other"))  # once it ended, either door may build
    gate.finish("ann")
    assert (await _finish(again)).status == "done"
    broker.shutdown()
    service.shutdown()


HOLDER = """
import asyncio, sys, threading
from ds01hub.actions.builds import BuildManager
from ds01hub.actions.images import ImageSpec

def run(spec):
    print("holding", spec.user, flush=True)
    threading.Event().wait()
    yield

async def main():
    manager = BuildManager(run, sys.argv[1], max_concurrent=2)
    manager.start(ImageSpec("ann", "one"))
    manager.start(ImageSpec("ben", "one"))
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_a_killed_doors_slots_come_back(tmp_path):
    """A process that holds both slots dies by kill -9: the kernel drops its locks, the queued
    build of the other process runs, and its users may build again."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        seen = {holder.stdout.readline().split()[-1] for _ in range(2)}
        assert seen == {"ann", "ben"}
        gate = Gate()
        manager = BuildManager(gate.run, tmp_path, max_concurrent=2)
        with pytest.raises(OperationError):
            manager.start(ImageSpec("ann", "two"))  # ann's build runs in the other process
        waiting = manager.start(ImageSpec("cid", "one"))
        await wait_until_async(lambda: waiting.events, 10, message="cid's build queued")
        assert waiting.status == "queued"
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        await wait_until_async(lambda: waiting.status == "running", 10, message="cid runs")
        gate.finish("cid")
        gate.finish("ann")
        assert (await _finish(waiting)).status == "done"
        assert (await _finish(manager.start(ImageSpec("ann", "two")))).status == "done"
        manager.shutdown()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_a_slot_waiter_stops_at_shutdown(tmp_path):
    locks = HostBuildLocks(tmp_path, max_concurrent=1)
    held = locks.take_slot(threading.Event(), lambda: None)
    stop, told = threading.Event(), []
    waiter = threading.Thread(target=lambda: told.append(locks.take_slot(stop, lambda: None)))
    waiter.start()
    stop.set()
    waiter.join(10)
    assert told == [None]
    locks.release(held)


class Chatty:
    """A build that prints a line every few milliseconds until released, and notes whether
    its stream was closed (what makes Docker end a real build)."""

    def __init__(self):
        self.release = threading.Event()
        self.closed = threading.Event()

    def run(self, spec):
        try:
            while not self.release.wait(0.01):
                yield BuildEvent("log", "working", 0.5)
            yield BuildEvent("done", "built", 1.0, image_id="sha256:x", tag=spec.tag)
        finally:
            self.closed.set()


async def test_a_running_build_is_cancelled_through_the_other_door(tmp_path):
    chatty = Chatty()
    service = BuildManager(chatty.run, tmp_path)
    broker = BuildManager(_events("x"), tmp_path)  # the broker, where image-cancel arrives
    assert broker.locks.request_cancel("ann") is None  # nothing to cancel yet
    build = service.start(ImageSpec("ann", "torch"))
    await wait_until_async(lambda: build.events, 10, message="the build runs")
    assert broker.locks.request_cancel("ann") == "torch"
    await _finish(build)
    assert build.status == "error" and build.events[-1]["text"] == CANCELLED
    assert chatty.closed.is_set() and not broker.locks.building("ann")
    # the request was for that build: the next one runs to its end
    again = broker.start(ImageSpec("ann", "torch"))
    assert (await _finish(again)).status == "done"
    service.shutdown()
    broker.shutdown()


async def test_a_queued_build_is_cancelled_before_it_takes_a_slot(tmp_path):
    gate = Gate()
    broker = BuildManager(gate.run, tmp_path, max_concurrent=1)
    service = BuildManager(gate.run, tmp_path, max_concurrent=1)
    running = broker.start(ImageSpec("ben", "one"))
    await wait_until_async(lambda: gate.running, 10, message="ben's build runs")
    queued = service.start(ImageSpec("ann", "two"))
    await wait_until_async(lambda: queued.events, 10, message="ann's build waits for the slot")
    assert broker.locks.request_cancel("ann") == "two"
    await _finish(queued)
    assert queued.events[-1]["text"] == CANCELLED and "ann" not in gate.running
    gate.finish("ben")
    assert (await _finish(running)).status == "done"
    broker.shutdown()
    service.shutdown()


async def test_cancel_stops_the_users_build_and_says_when_there_is_none(tmp_path):
    chatty = Chatty()
    manager = BuildManager(chatty.run, tmp_path)
    with pytest.raises(OperationError) as none:
        await manager.cancel("ann")
    assert none.value.status == 404 and "no build of yours" in none.value.message
    build = manager.start(ImageSpec("ann", "torch"))
    await wait_until_async(lambda: build.events, 10, message="the build runs")
    assert await manager.cancel("ann", wait=30) == {"image": "torch", "stopped": True}
    await _finish(build)
    assert build.events[-1]["text"] == CANCELLED and chatty.closed.is_set()
    manager.shutdown()
