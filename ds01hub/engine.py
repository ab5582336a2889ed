"""The Docker engine going away and coming back (dockerd stopped, restarted or upgraded under a
running hub).

Docker is the source of truth (DESIGN.md): while the engine is unreachable nothing about
containers can be known or changed. Every long-running ds01 process recognises that state the
same way (`engine_unreachable`), says once that the engine went away and once that it came back
(`EngineState`), and keeps serving what it can. The hub also follows the engine
(`EngineWatcher`: its event stream while it is up, a ping every second while it is down) so that
it acts at once: see `ds01hub.spawner.recovery` and docs/architecture.md, "Engine restart".
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ds01hub import labels
from ds01hub.units import utcnow

__all__ = [
    "EngineState",
    "EngineWatcher",
    "Outage",
    "engine_unreachable",
    "engine_url",
    "short_error",
]

#: Longest error text quoted in a log line or a message (docker-py nests its causes).
MAX_ERROR_CHARS = 200


def engine_unreachable(error: BaseException) -> bool:
    """True when `error` (from docker-py) means the engine did not answer at all: its socket is
    missing, refuses or dropped the connection. An engine that answered with an error, or a
    slow one (a timeout), is not unreachable."""
    import requests
    import urllib3
    from docker.errors import DockerException

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, requests.exceptions.Timeout):
            return False
        if isinstance(
            current, requests.exceptions.ConnectionError | urllib3.exceptions.ProtocolError
        ):
            return True  # refused, missing socket, or a connection (a stream) cut off
        if isinstance(current, DockerException) and "fetching server API version" in str(current):
            return True  # docker.from_env() / version="auto" against a stopped engine
        current = current.__cause__ or current.__context__
    return False


def engine_url(configured: str | None = None) -> str:
    """Where the engine is, for messages: `configured`, else $DOCKER_HOST, else Docker's
    default socket (docker-py shows unix sockets as `http+docker://localhost`)."""
    return configured or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def short_error(error: BaseException | str) -> str:
    """An error as one bounded line (for logs, pages and users' messages)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


@dataclass(frozen=True)
class Outage:
    """One period during which the engine did not answer."""

    since: datetime
    until: datetime | None
    error: str

    @property
    def seconds(self) -> float | None:
        return None if self.until is None else (self.until - self.since).total_seconds()

    def describe(self, engine: str) -> str:
        start = f"{self.since:%Y-%m-%d %H:%M:%S} UTC"
        if self.until is None:
            return f"{engine} has been unreachable since {start}: {self.error}"
        return f"{engine} was unreachable from {start} for {self.seconds:.0f}s: {self.error}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat(),
            "until": self.until.isoformat() if self.until else None,
            "error": self.error,
        }


class EngineState:
    """Whether the engine answers, as last seen; each change is logged once (a warning when it
    goes, a line when it is back), never once per failed call. Thread-safe.

    `connect` makes a new docker-py client: `probe` asks on a new connection, because a
    stopping dockerd closes its socket first but answers on connections already open until it
    exits. With `ping_interval`, an outage starts a daemon thread that probes that often until
    the engine is back, so that "back" is said when it happens."""

    def __init__(
        self,
        name: str = "the Docker engine",
        log: logging.Logger | None = None,
        clock: Callable[[], datetime] = utcnow,
        *,
        connect: Callable[[], Any] | None = None,
        ping_interval: float | None = None,
    ):
        self.name = name
        self.log = log or logging.getLogger("ds01hub.engine")
        self.clock = clock
        self.connect = connect
        self.ping_interval = ping_interval
        self.live_restore = False  # from `docker info` while up: containers outlive dockerd
        self.current: Outage | None = None
        self.last: Outage | None = None
        self._lock = threading.Lock()

    @property
    def up(self) -> bool:
        return self.current is None

    def lost(self, error: BaseException | str) -> bool:
        """Record that the engine did not answer; True when this is news (it was up)."""
        with self._lock:
            if self.current is not None:
                return False
            self.current = Outage(self.clock(), None, short_error(error))
        self.log.warning("%s is unreachable: %s", self.name, self.current.error)
        if self.ping_interval is not None:
            pinger = threading.Thread(target=self._probe_until_back, name="ds01-ping", daemon=True)
            pinger.start()
        return True

    def _probe_until_back(self) -> None:
        while not self.up:
            time.sleep(self.ping_interval)
            with contextlib.suppress(Exception):  # a slow engine: ask again
                self.probe()

    def back(self) -> Outage | None:
        """Record that the engine answers; the outage that ended, when it was down."""
        with self._lock:
            if self.current is None:
                return None
            ended = Outage(self.current.since, self.clock(), self.current.error)
            self.current, self.last = None, ended
        self.log.warning("%s is back after %.0fs", self.name, ended.seconds)
        return ended

    def check(self, client: Any) -> bool:
        """Ping the engine (blocking) and record the answer; True when it is up."""
        try:
            client.ping()
        except Exception as error:
            if not engine_unreachable(error):
                raise
            self.lost(error)
            return False
        self.back()
        return True

    def probe(self) -> bool:
        """`check` on a new connection (`connect`); True when the engine is up."""
        try:
            client = self.connect()  # docker-py may ask for the API version here already
        except Exception as error:
            if not engine_unreachable(error):
                raise
            self.lost(error)
            return False
        try:
            return self.check(client)
        finally:
            client.close()

    def note(self) -> str | None:
        """The current outage, else the last one, in a sentence (admin page)."""
        outage = self.current or self.last
        return outage.describe(self.name) if outage else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "up": self.up,
            "current": self.current.to_dict() if self.current else None,
            "last": self.last.to_dict() if self.last else None,
        }


class EngineWatcher:
    """Follows one engine from a daemon thread. While it is up: its stream of `die` events of
    managed containers (`on_die(container_id)`, at once, whatever the cause). When the stream
    ends, the engine is stopping or restarting (or the connection broke): `on_stream_end()`.
    Then a probe (`state.probe`: a new connection) every `interval` seconds, each failure
    recorded in `state`, until it answers:
    `on_back(outage)`, the outage being None when no ping failed (a restart behind systemd's
    socket, which holds connections until the new dockerd accepts them). Callbacks run on the
    watcher's thread: hand them to an event loop with `loop.call_soon_threadsafe`."""

    def __init__(
        self,
        client: Any,
        state: EngineState,
        *,
        on_die: Callable[[str], None],
        on_stream_end: Callable[[], None],
        on_back: Callable[[Outage | None], None],
        extra_labels: Iterable[str] = (),
        interval: float = 1.0,
    ):
        self.client = client
        self.state = state
        self.on_die = on_die
        self.on_stream_end = on_stream_end
        self.on_back = on_back
        self.filters = {
            "type": "container",
            "event": ["die"],
            # a pre-selection only: `on_die` acts on the hub's own servers' container ids
            "label": [f"{labels.MANAGED}=true", *extra_labels],
        }
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ds01-engine-watcher", daemon=True)

    def start(self) -> EngineWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop at the next wait or event (the stream ends with the engine or the process)."""
        self._stop.set()

    def _run(self) -> None:
        followed = False
        while not self._stop.is_set():
            try:
                before = self.state.last
                if not self._wait_until_up():
                    return
                if followed:
                    ended = self.state.last
                    self.on_back(ended if ended is not before else None)
                self.state.live_restore = bool(self.client.info().get("LiveRestoreEnabled"))
                followed = True
                try:
                    self._follow()
                finally:  # however it ended, the engine may be going: the hub takes note
                    self.on_stream_end()
            except Exception:  # a watcher that died silently would be worse than a loud one
                self.state.log.exception("watching %s failed; watching again", self.state.name)
                if self._stop.wait(self.interval):
                    return

    def _wait_until_up(self) -> bool:
        """Probe until the engine answers (True), or until stopped (False)."""
        while not self.state.probe():
            if self._stop.wait(self.interval):
                return False
        return True

    def _follow(self) -> None:
        """Call `on_die` for each event until the stream ends (the engine went away)."""
        try:
            for event in self.client.events(decode=True, filters=self.filters):
                if self._stop.is_set():
                    return
                container_id = event.get("id") or (event.get("Actor") or {}).get("ID")
                if container_id:
                    self.on_die(container_id)
        except Exception as error:
            if not engine_unreachable(error):
                raise
