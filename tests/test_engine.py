"""The Docker engine going away and coming back (ds01hub.engine; docs/architecture.md, "Engine
restart"), without the shared engine: docker-py talks to a socket where nothing listens, or to
a small stand-in engine on a unix socket of the test's own (ping, info and an event stream the
test feeds). The real dockerd stopped under a real hub: tests/test_engine_restart.py."""

from __future__ import annotations

import json
import logging
import queue
import socketserver
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import docker
import pytest
import requests
import urllib3
from harness import wait_until
from prometheus_client import CollectorRegistry
from test_allocation_state import NOW, Machine, doc
from test_metrics import samples

from ds01hub.engine import EngineState, EngineWatcher, engine_unreachable, short_error
from ds01hub.gpu.allocator import GpuAllocator
from ds01hub.services.ops.admin_page import overview, render_page
from ds01hub.services.ops.metrics import StateCollector


def client_at(path: Path) -> docker.DockerClient:
    return docker.DockerClient(base_url=f"unix://{path}", version="1.41", timeout=10)


def error_of(call) -> BaseException:
    with pytest.raises(Exception) as caught:
        call()
    return caught.value


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


# -- recognising an unreachable engine ---------------------------------------------------------


def test_an_engine_that_does_not_answer_is_unreachable(tmp_path):
    missing = tmp_path / "docker.sock"
    assert engine_unreachable(error_of(client_at(missing).ping))
    # docker.from_env() / version="auto" asks for the API version first
    assert engine_unreachable(
        error_of(lambda: docker.APIClient(base_url=f"unix://{missing}", version="auto"))
    )
    # an event stream cut off mid-read (docker-py reads streams through urllib3 directly)
    assert engine_unreachable(urllib3.exceptions.ProtocolError("Connection broken"))
    wrapped = RuntimeError("listing failed")
    wrapped.__cause__ = error_of(client_at(missing).ping)
    assert engine_unreachable(wrapped)


@pytest.mark.parametrize(
    "error",
    [
        docker.errors.APIError("500 Server Error: boom"),
        docker.errors.NotFound("no such container"),
        requests.exceptions.ReadTimeout("slow"),
        requests.exceptions.ConnectTimeout("slow to accept"),
        ConnectionResetError("the hub went away"),  # not docker-py's: not the engine's
        ValueError("x"),
    ],
)
def test_an_engine_that_answers_or_is_slow_is_not_unreachable(error):
    assert not engine_unreachable(error)


def test_short_error_is_one_bounded_line():
    assert short_error("a\n  b\tc") == "a b c"
    assert len(short_error("x" * 10_000)) == 200
    assert short_error(ValueError()) == "ValueError"


# -- EngineState: said once when it goes, once when it is back ---------------------------------


def test_the_state_logs_each_change_once_and_describes_the_outage(tmp_path, caplog):
    clock = Clock()
    state = EngineState("the Docker engine at unix:///x", logging.getLogger("t"), clock)
    assert state.up and state.note() is None and state.back() is None
    with caplog.at_level(logging.WARNING, logger="t"):
        assert state.lost(ConnectionRefusedError("refused"))
        clock.now += timedelta(seconds=5)
        assert not state.lost("again")  # not news
        assert "unreachable since 2026-03-02 12:00:00 UTC" in state.note()
        assert state.to_dict()["current"]["error"] == "refused"
        clock.now += timedelta(seconds=7)
        ended = state.back()
        assert state.back() is None
    assert ended.seconds == 12 and state.up
    assert state.note() == (
        "the Docker engine at unix:///x was unreachable from 2026-03-02 12:00:00 UTC for 12s: "
        "refused"
    )
    assert [r.getMessage() for r in caplog.records] == [
        "the Docker engine at unix:///x is unreachable: refused",
        "the Docker engine at unix:///x is back after 12s",
    ]


# -- a stand-in engine on a socket of the test's own -------------------------------------------


class StandInEngine:
    """Answers `/_ping`, `/info` and a chunked `/events` stream fed from `events` (None ends
    it), on `path`; `stop()` closes the socket as a stopping dockerd does."""

    def __init__(self, path: Path):
        self.path = path
        self.events: queue.Queue = queue.Queue()
        self.server: socketserver.ThreadingUnixStreamServer | None = None

    def start(self) -> StandInEngine:
        engine = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.split("?")[0].endswith("/events"):
                    return self.stream()
                body = b"OK" if "_ping" in self.path else json.dumps({"LiveRestoreEnabled": False})
                body = body if isinstance(body, bytes) else body.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def stream(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                while (event := engine.events.get()) is not None:
                    data = json.dumps(event).encode() + b"\n"
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                self.close_connection = True

        self.server = socketserver.ThreadingUnixStreamServer(str(self.path), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """As dockerd: the socket goes first, then the streams end."""
        self.server.shutdown()
        self.server.server_close()
        self.path.unlink()
        self.events.put(None)


def test_the_state_probes_until_the_engine_is_back(tmp_path):
    path = tmp_path / "docker.sock"
    state = EngineState(connect=lambda: client_at(path), ping_interval=0.05)
    assert not state.probe()
    engine = StandInEngine(path).start()
    try:
        wait_until(lambda: state.up, 10, 0.05, "the pinger sees the engine back")
        assert state.last is not None and state.last.until is not None
    finally:
        engine.stop()


def test_the_watcher_reports_deaths_the_end_of_the_stream_and_the_return(tmp_path):
    path = tmp_path / "docker.sock"
    engine = StandInEngine(path).start()
    seen: queue.Queue = queue.Queue()
    state = EngineState(connect=lambda: client_at(path))
    watcher = EngineWatcher(
        client_at(path),
        state,
        on_die=lambda cid: seen.put(("die", cid)),
        on_stream_end=lambda: seen.put(("stream end", state.up)),
        on_back=lambda outage: seen.put(("back", outage is not None)),
        interval=0.05,
    ).start()
    try:
        engine.events.put({"Type": "container", "status": "die", "id": "c1"})
        assert seen.get(timeout=10) == ("die", "c1")
        engine.stop()  # the engine stops: the stream ends, pings fail
        assert seen.get(timeout=10)[0] == "stream end"
        wait_until(lambda: not state.up, 10, 0.05, "the watcher sees the engine gone")
        engine = StandInEngine(path).start()
        assert seen.get(timeout=10) == ("back", True)
        assert state.up and state.live_restore is False
    finally:
        watcher.stop()
        engine.stop()


# -- what the ops service and the allocator do with it -----------------------------------------


def test_metrics_and_the_admin_page_say_the_engine_is_unreachable(tmp_path):
    missing = client_at(tmp_path / "docker.sock")
    machine = Machine(tmp_path)
    allocator = GpuAllocator(
        None,
        machine.allocator.inventory,
        tmp_path / "state",
        machine.log,
        container_lister=lambda: missing.api.containers(all=True),
    )
    state = EngineState()
    registry = CollectorRegistry()
    registry.register(StateCollector(allocator, machine.log, state))
    got = samples(registry)
    assert got[("ds01_docker_engine_up", frozenset())] == 0
    assert not any(name.startswith("ds01_gpu_slots") for name, _ in got)
    assert got[("ds01_culls_total", frozenset({("reason", "idle")}))] == 0  # the event log's
    assert not state.up

    model = overview([], machine.allocator.inventory, machine.log, NOW, engine=state)
    page = render_page(model)
    assert model["engine"]["up"] is False and 'id="engine"' in page
    assert "Docker engine unreachable" in page and "unreachable since" in page
    state.back()
    page = render_page(overview([], machine.allocator.inventory, machine.log, NOW, engine=state))
    assert 'class="note" id="engine"' in page and "was unreachable from" in page


def test_end_hold_gives_a_stopped_containers_slots_back_with_a_release_event(tmp_path):
    machine = Machine(tmp_path)
    (slot,) = machine.allocate("alice", "a").granted
    machine.docs.append(doc("a", "alice", [slot], "exited", NOW - timedelta(minutes=5), cid="id-a"))
    machine.allocator.commit("a")
    (other,) = machine.allocate("bob", "b").granted
    machine.docs.append(doc("b", "bob", [other], cid="id-b"))
    machine.allocator.commit("b")
    assert {h.slot_id for h in machine.allocator.holdings()} == {slot, other}

    reason = "the Docker engine stopped at 12:00; the server stopped with it"
    assert machine.allocator.end_hold("id-a", reason) == [slot]
    assert {h.slot_id for h in machine.allocator.holdings()} == {other}
    assert machine.allocator.revoked("a") == [slot]  # its next start asks for slots again
    assert machine.allocator.revocations()["id-a"]["reason"] == reason
    (release,) = machine.log.events(kind="release")
    assert (release.user, release.slot, release.reason) == ("alice", slot, reason)
    assert machine.allocator.end_hold("id-a", reason) == []  # once
    assert machine.allocator.end_hold("id-b", reason) == []  # a running container keeps its
    machine.allocator.sweep()
    assert len(machine.log.events(kind="release")) == 1 and not machine.log.events(kind="expire")
