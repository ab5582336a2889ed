"""Image builds: one manager for the host, whichever door a build comes through.

The users' `image-create` (through the broker) and the notebook's image wizard (through the
ds01 service) both build with a `BuildManager`, and two rules hold for the whole host, across
those processes:

- at most `max_concurrent` builds run at once (all users, all doors); the others wait, queued;
- one build per user at a time, whichever door started it: another is refused (409) with the
  name of the one still running.

Both rules are kernel file locks (`flock`) on files in `<state_dir>/builds/` (the hub's state
directory, which every ds01hub process reads): `user-<name>.lock` for the whole life of a
user's build, one of `slot-<i>.lock` while it runs. Why locks and not one process that owns the
builds: each service keeps its own Docker client and needs no API of the other (the broker
serves SSH users while the ds01 service is down, and the other way round), and the kernel
drops a lock when its holder dies, kill -9 included, so a crashed service never leaves a slot
or a user's build taken. Both services default to `MAX_CONCURRENT_BUILDS`; a process
configured with more slots than the others may use those too.

A user cancels their build (`image-cancel`, or Ctrl-C during `image-create`) through either
door: `request_cancel` leaves `cancel-<user>` in the same directory, which the process running
the build checks while it waits for a slot and at each line of output; it then stops reading
Docker's build stream (the engine ends a build whose client went away).

Docker's build API is blocking: each build runs in a worker thread and hands its events back to
the event loop, where waiting streams are woken.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ds01hub.actions import images
from ds01hub.actions.operations import OperationError
from ds01hub.labels import escape_name
from ds01hub.units import utcnow

#: Builds running at once on the host unless a service is configured otherwise.
MAX_CONCURRENT_BUILDS = 2
#: How often a queued build looks for a free slot (builds take minutes).
SLOT_POLL_SECONDS = 0.25
#: The last event's text of a build its user cancelled.
CANCELLED = "the build was cancelled"


@dataclass
class Build:
    """One image build and its events so far (kept in memory by the process that runs it)."""

    id: str
    user: str
    spec: images.ImageSpec
    status: str = "queued"  # queued | running | done | error
    events: list[dict] = field(default_factory=list)
    created_at: str = field(default_factory=lambda: utcnow().isoformat(timespec="seconds"))
    finished_at: str | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def finished(self) -> bool:
        return self.status in ("done", "error")

    @property
    def progress(self) -> float:
        return self.events[-1].get("progress", 0.0) if self.events else 0.0

    def to_dict(self, since: int | None = None) -> dict:
        data = {
            "id": self.id,
            "name": self.spec.name,
            "tag": self.spec.tag,
            "template": self.spec.template,
            "pip_packages": list(self.spec.pip_packages),
            "apt_packages": list(self.spec.apt_packages),
            "status": self.status,
            "progress": self.progress,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "event_count": len(self.events),
        }
        if since is not None:
            data["events"] = self.events[max(0, since) :]
        return data

    async def follow(self, since: int = 0) -> AsyncIterator[dict]:
        """The build's events from `since` on, as they come, until it has ended (the NDJSON
        streams of both doors)."""
        sent = max(0, since)
        while True:
            waiter = self.changed
            for event in self.events[sent:]:
                yield event
            sent = len(self.events)
            if self.finished:
                return
            await waiter.wait()


class HostBuildLocks:
    """The host-wide rules as flock files in `<state_dir>/builds/` (see the module docstring)."""

    def __init__(self, state_dir: str | os.PathLike, max_concurrent: int = MAX_CONCURRENT_BUILDS):
        self.directory = Path(state_dir) / "builds"
        self.max_concurrent = max(1, max_concurrent)

    def _open(self, name: str) -> int:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        return os.open(self.directory / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    @staticmethod
    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def claim_user(self, user: str, image: str) -> int:
        """Hold the user's build lock (a descriptor to `release`), or OperationError 409 naming
        the build that holds it, in this process or another."""
        fd = self._open(self._user_lock(user))
        if not self._try_lock(fd):
            running = os.pread(fd, 256, 0).decode(errors="replace").strip()
            os.close(fd)
            what = f"your build of {running!r}" if running else "another build of yours"
            raise OperationError(
                f"{what} is still running",
                hint="wait for it to finish (image-list, or the image builder, shows it), then "
                "start the next one",
                status=409,
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, image.encode(), 0)
        return fd

    def request_cancel(self, user: str) -> str | None:
        """Ask the user's running build to stop, in whichever process runs it: the name of the
        image it builds, or None when no build of the user runs on the host."""
        fd = self._open(self._user_lock(user))
        try:
            if self._try_lock(fd):
                return None  # nobody holds it: no build (closing the descriptor frees it)
            running = os.pread(fd, 256, 0).decode(errors="replace").strip()
        finally:
            os.close(fd)
        (self.directory / self._cancel_file(user)).write_text(running)
        return running or "your build"

    def cancel_requested(self, user: str, since: float) -> bool:
        """Whether the user asked (`request_cancel`) at or after `since` (`time.time()`) for
        their build to stop: an older request was for an earlier build."""
        try:
            return (self.directory / self._cancel_file(user)).stat().st_mtime >= since
        except OSError:
            return False

    def building(self, user: str) -> bool:
        """Whether a build of the user runs (or waits for a slot) anywhere on the host."""
        fd = self._open(self._user_lock(user))
        try:
            return not self._try_lock(fd)
        finally:
            os.close(fd)

    @staticmethod
    def _user_lock(user: str) -> str:
        return f"user-{escape_name(user)}.lock"

    @staticmethod
    def _cancel_file(user: str) -> str:
        return f"cancel-{escape_name(user)}"

    def take_slot(
        self,
        stop: threading.Event,
        waiting: Callable[[], None],
        cancelled: Callable[[], bool] = lambda: False,
    ) -> int | None:
        """Wait for one of the host's build slots (a descriptor to `release`), calling
        `waiting` once if none is free; None once `stop` is set or `cancelled()` says so.
        Blocking: call it from a worker thread."""
        told = False
        while not stop.is_set() and not cancelled():
            for index in range(self.max_concurrent):
                fd = self._open(f"slot-{index}.lock")
                if self._try_lock(fd):
                    return fd
                os.close(fd)
            if not told:
                waiting()
                told = True
            stop.wait(SLOT_POLL_SECONDS)
        return None

    @staticmethod
    def release(fd: int | None) -> None:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)  # closing the last descriptor drops the flock


#: What follows a successful build (`ds01hub.actions.registry.publisher` on a cluster): its
#: own events, ending with the build's `done` or an `error`.
Publisher = Callable[[images.ImageSpec, images.BuildEvent], Iterable[images.BuildEvent]]


def docker_builder(
    docker: Any,
    base_image: str,
    ca_bundle: str = "",
    memory_limit: int = 0,
    who: str = "",
    publish: Publisher | None = None,
) -> Callable[[images.ImageSpec], Iterable[images.BuildEvent]]:
    """The build both doors run: the admin's base image (never the user's choice), the site's
    CA bundle, a memory cap per build step. `who` names the setting to fix when no base image
    is configured (e.g. `Broker.base_image`). `publish`: the step after a build that
    succeeded (a cluster's push to its registry); None on one host."""

    def run(spec: images.ImageSpec) -> Iterable[images.BuildEvent]:
        if not base_image:
            raise images.ImageError(
                "no base image is configured for image builds",
                hint=f"an admin sets {who or 'base_image'} (the lab's single-user image)",
            )
        events = images.build_image(
            docker,
            spec,
            base_image,
            ca_bundle=Path(ca_bundle) if ca_bundle else None,
            memory_limit=memory_limit or None,
        )
        return events if publish is None else _then(events, spec, publish)

    return run


def _then(
    events: Iterable[images.BuildEvent], spec: images.ImageSpec, publish: Publisher
) -> Iterator[images.BuildEvent]:
    """The build's events, its `done` replaced by what `publish` makes of it."""
    for event in events:
        if event.kind == "done":
            yield from publish(spec, event)
            return
        yield event


class BuildManager:
    """Starts, runs and remembers builds under the host's rules (`HostBuildLocks`)."""

    def __init__(
        self,
        run_build: Callable[[images.ImageSpec], Iterable[images.BuildEvent]],
        state_dir: str | os.PathLike,
        max_concurrent: int = MAX_CONCURRENT_BUILDS,
        max_events: int = 5000,
        keep_per_user: int = 10,
    ):
        self._run_build = run_build
        self.locks = HostBuildLocks(state_dir, max_concurrent)
        self._keep_per_user = keep_per_user
        # queued builds wait for a host slot inside a worker: one worker per possible slot
        self._pool = ThreadPoolExecutor(
            max_workers=self.locks.max_concurrent, thread_name_prefix="ds01-build"
        )
        self._stop = threading.Event()
        self._max_events = max_events
        self.builds: dict[str, Build] = {}

    def for_user(self, user: str) -> list[Build]:
        return [b for b in self.builds.values() if b.user == user]

    def get(self, user: str, build_id: str) -> Build | None:
        build = self.builds.get(build_id)
        return build if build is not None and build.user == user else None

    def start(self, spec: images.ImageSpec) -> Build:
        """Queue `spec`'s build, or OperationError 409 while another build of the user runs
        anywhere on the host."""
        user_lock = self.locks.claim_user(spec.user, spec.name)
        self._forget_old(spec.user)
        build = Build(id=uuid.uuid4().hex, user=spec.user, spec=spec)
        self.builds[build.id] = build
        loop = asyncio.get_running_loop()
        loop.run_in_executor(self._pool, self._work, build, user_lock, loop)
        return build

    async def cancel(self, user: str, wait: float = 30.0) -> dict[str, Any]:
        """Stop the user's build, whichever door (process) started it; wait (up to `wait`
        seconds) until it has ended: ``{image, stopped}``. A build stops at its next line of
        output or within a slot poll. OperationError 404 when no build of the user runs."""
        name = await asyncio.to_thread(self.locks.request_cancel, user)
        if name is None:
            raise OperationError(
                "no build of yours is running",
                hint="image-list shows your images; image-create starts a build",
                status=404,
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while await asyncio.to_thread(self.locks.building, user):
            if loop.time() > deadline:
                return {"image": name, "stopped": False}
            await asyncio.sleep(0.1)
        return {"image": name, "stopped": True}

    def _forget_old(self, user: str) -> None:
        """Forget all but the newest finished builds of ``user``: memory stays bounded."""
        finished = [b for b in self.for_user(user) if b.finished]
        for build in finished[: max(0, len(finished) - self._keep_per_user + 1)]:
            del self.builds[build.id]

    def _work(self, build: Build, user_lock: int, loop: asyncio.AbstractEventLoop) -> None:
        slot, final = None, None
        started = time.time()

        def cancelled() -> bool:
            return self.locks.cancel_requested(build.user, started)

        try:
            slot = self.locks.take_slot(self._stop, lambda: self._queued(build, loop), cancelled)
            if slot is None:
                if cancelled():
                    final = images.BuildEvent("error", CANCELLED)
                return  # else shutting down: the process is going away with its builds
            loop.call_soon_threadsafe(self._set_status, build, "running")
            final = self._stream(build, loop, cancelled)
        except Exception as error:  # the build must end with an event, whatever went wrong
            text = str(error) if isinstance(error, images.ImageError) else f"build failed: {error}"
            final = images.BuildEvent("error", text)
        finally:
            # free the slot and the user's lock before anyone hears that the build ended, so
            # whoever starts the next one on hearing it finds them free
            self.locks.release(slot)
            self.locks.release(user_lock)
            if final is not None:
                loop.call_soon_threadsafe(self._add_event, build, final.to_dict())
            loop.call_soon_threadsafe(self._finish, build)

    def _stream(
        self, build: Build, loop: asyncio.AbstractEventLoop, cancelled: Callable[[], bool]
    ) -> images.BuildEvent | None:
        """Relay the build's events; the final one (done / error) is returned, to be told once
        the locks are free. A cancel closes the stream, and with it Docker's build."""
        events = iter(self._run_build(build.spec))
        try:
            for event in events:
                if cancelled():
                    return images.BuildEvent("error", CANCELLED, event.progress)
                if event.kind in ("done", "error"):
                    return event
                loop.call_soon_threadsafe(self._add_event, build, event.to_dict())
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()
        return None

    def _queued(self, build: Build, loop: asyncio.AbstractEventLoop) -> None:
        n = self.locks.max_concurrent
        text = f"waiting for a free build slot ({n} build{'s' * (n != 1)} run at once on this host)"
        event = images.BuildEvent("log", text).to_dict()
        loop.call_soon_threadsafe(self._add_event, build, event)

    def _set_status(self, build: Build, status: str) -> None:
        build.status = status
        self._wake(build)

    def _add_event(self, build: Build, event: dict) -> None:
        if len(build.events) < self._max_events or event["kind"] in ("done", "error"):
            build.events.append(event)
        if event["kind"] in ("done", "error"):
            build.status = event["kind"]
        self._wake(build)

    def _finish(self, build: Build) -> None:
        if not build.finished:
            build.status = "error"
            build.events.append({"kind": "error", "text": "the build ended without a result"})
        build.finished_at = utcnow().isoformat(timespec="seconds")
        self._wake(build)

    @staticmethod
    def _wake(build: Build) -> None:
        build.changed.set()
        build.changed = asyncio.Event()

    def shutdown(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
