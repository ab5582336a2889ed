"""Queued spawn requests (the `queue` option): the stored file, its strict reading, the
per-user limit, and the hub-side tasks that resume them after a restart."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from types import SimpleNamespace

import pytest
from harness import wait_until_async

from ds01hub.gpu.decision import Decision
from ds01hub.gpu.queued import QueuedRequest, QueuedStore, QueueFileError, QueueLimitError
from ds01hub.hub.client import HubClient
from ds01hub.limits import parse_limits
from ds01hub.spawner.gpu_queue import GpuQueue
from ds01hub.spawner.options import OptionsError, normalize_user_options, options_from_form
from ds01hub.spawner.queued import QueuedStarter
from ds01hub.spawner.spawner import _serve_queued


def request(user="alice", server="q", priority=10, since=1000.0) -> QueuedRequest:
    return QueuedRequest(
        user, server, f"{server}._.{user}", {"image": "img", "gpus": 1}, priority, ("lab",), since
    )


def test_requests_are_kept_in_arrival_order_across_instances(tmp_path):
    store = QueuedStore(tmp_path)
    assert store.load() == []
    store.add(request("alice"), limit=2)
    store.add(request("bob"), limit=2)
    assert [r.user for r in QueuedStore(tmp_path).load()] == ["alice", "bob"]
    assert QueuedStore(tmp_path).load()[0] == request("alice")  # every field round-trips


def test_asking_again_keeps_the_place_and_the_limit_counts_per_user(tmp_path):
    store = QueuedStore(tmp_path)
    store.add(request("alice", "a", since=1.0), limit=2)
    kept = store.add(request("alice", "a", since=99.0), limit=2)
    assert kept.since == 1.0 and len(store.load()) == 1
    store.add(request("alice", "b"), limit=2)
    with pytest.raises(QueueLimitError, match=r"alice already has 2 queued request\(s\).*a, b"):
        store.add(request("alice", "c"), limit=2)
    store.add(request("bob", "c"), limit=2)  # another user is not affected
    assert store.remove("a._.alice") and not store.remove("a._.alice")
    store.add(request("alice", "c"), limit=2)
    assert [r.container for r in store.load()] == ["b._.alice", "c._.bob", "c._.alice"]


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "cannot read"),
        ('{"a": 1}', "not a list of requests"),
        ("[1]", "an entry is not an object"),
        ('[{"user": "", "server": "", "container": "x"}]', "must be strings"),
        (
            '[{"user": "u", "server": "", "container": "x", "options": {}, "priority": true,'
            ' "since": 1}]',
            "priority must be a whole number",
        ),
        (
            '[{"user": "u", "server": "", "container": "x", "options": {}, "priority": 1,'
            ' "since": 1, "groups": [1]}]',
            "groups must be a list of strings",
        ),
    ],
)
def test_a_bad_file_is_refused_naming_it_and_the_fix(tmp_path, content, problem):
    store = QueuedStore(tmp_path)
    store.path.write_text(content)
    with pytest.raises(QueueFileError) as caught:
        store.load()
    assert problem in str(caught.value) and str(store.path) in str(caught.value)
    assert "fix or remove" in str(caught.value)


def test_the_file_is_replaced_whole(tmp_path):
    store = QueuedStore(tmp_path)
    store.add(request(), limit=None)
    assert json.loads(store.path.read_text())[0]["groups"] == ["lab"]
    assert not store.path.with_suffix(".tmp").exists()


async def test_stored_requests_are_resumed_and_removed_when_served(tmp_path):
    store = QueuedStore(tmp_path)
    store.add(request("alice"), limit=None)
    store.add(request("bob"), limit=None)
    served: list[str] = []
    release = asyncio.Event()

    async def serve(entry: QueuedRequest) -> None:
        served.append(entry.user)
        if entry.user == "bob":
            await release.wait()  # bob still waits for a GPU

    class Log:
        def error(self, *args):
            raise AssertionError(args)

        def exception(self, *args):
            raise AssertionError(args)

    starter = QueuedStarter(store, serve, Log())
    assert starter.resume() == 2
    await wait_until_async(lambda: [r.user for r in store.load()] == ["bob"], 10, message="served")
    assert starter.waiting("q._.bob") and not starter.waiting("q._.alice")
    # The user withdraws bob's request: the task ends, the file forgets it.
    assert starter.stop_waiting("q._.bob") and store.remove("q._.bob")
    assert store.load() == [] and sorted(served) == ["alice", "bob"]


def test_the_queue_option_from_the_form_and_the_rest_api():
    assert options_from_form({"gpu": ["gpus:1"], "queue": ["on"]}) == {"gpus": 1, "queue": True}
    assert options_from_form({"gpu": ["gpus:1"]}) == {"gpus": 1}
    assert normalize_user_options({"queue": True, "gpus": 1}) == {"queue": True, "gpus": 1}
    assert normalize_user_options({"queue": False}) == {}
    assert normalize_user_options({"queue": None}) == {}
    with pytest.raises(OptionsError, match="'queue'='yes': Input should be a valid boolean"):
        normalize_user_options({"queue": "yes"})


def test_the_hub_notes_where_a_request_stands_and_container_list_shows_it(tmp_path):
    from ds01hub.actions.operations import queued_view
    from ds01hub.cli.user.views import time_cell

    store = QueuedStore(tmp_path)
    store.add(request("alice", "q", since=0.0), limit=None)
    assert store.of_user("alice")[0].position is None
    row = queued_view(store.of_user("alice")[0], "q")
    assert row["state"] == "queued" and time_cell(row) == "queued, no est."
    store.note("q._.alice", 2, 5, 7200.0)
    store.note("q._.nobody", 1, 1, None)  # a request already gone: nothing to note
    [noted] = store.of_user("alice")
    assert (noted.position, noted.waiting, noted.estimate) == (2, 5, 7200.0)
    row = queued_view(noted, "q")
    assert row["queued_since"] == "1970-01-01T00:00:00Z"
    assert time_cell(row) == "position 2 of 5, est. 1970-01-01 02:00 UTC"
    assert store.of_user("bob") == []
    store.path.write_text("garbage")
    assert store.of_user("alice") == []  # container-list still works; the hub logs the file


def test_hub_pages_show_queued_requests_and_recent_starts(tmp_path):
    from types import SimpleNamespace

    from ds01hub.services.ops.warnings import hub_announcement

    store = QueuedStore(tmp_path)
    store.add(request("<b>al</b>", "q", since=0.0), limit=None)
    store.add(request("bob", "r"), limit=None)
    announce = hub_announcement(tmp_path)
    alice = SimpleNamespace(name="<b>al</b>")
    assert announce(alice) == (
        "Your server q waits for a GPU: queued, no estimate (the GPUs are in use by running "
        "servers). It starts by itself."
    )
    store.note("q._.<b>al</b>", 1, 2, 3600.0)
    assert "position 1 of 2, estimate: 1970-01-01 01:00 UTC" in announce(alice)
    # It starts: the request is gone, the pages say so (escaped: user data) for a day.
    import time

    now = time.time()
    assert store.remove("q._.<b>al</b>", started_at=now)
    text = announce(alice)
    assert "waits for a GPU" not in text and "Your queued server q got its GPU" in text
    assert store.notices("<b>al</b>", now + 3600) and not store.notices("<b>al</b>", now + 90000)
    assert store.notices("bob", now) == [] and "waits for a GPU" in announce(
        SimpleNamespace(name="bob")
    )
    assert "<b>" not in announce(SimpleNamespace(name="<b>al</b>"))


class _OneSlotAtATime:
    """The allocator as the queue sees it: `free` identical slots, granted in turn."""

    def __init__(self) -> None:
        self.free = 0
        self.granted: list[str] = []

    def allocate(self, request, limits) -> Decision:
        if self.free <= 0:
            return Decision(reason="no free GPU slot", code="busy")
        self.free -= 1
        self.granted.append(request.container)
        return Decision(granted=(request.container,))

    def release(self, container: str, reason: str) -> None:
        raise AssertionError(f"nothing is released here: {container} {reason}")


async def test_after_a_hub_restart_a_queued_request_keeps_its_place_and_starts_in_order(
    tmp_path, monkeypatch
):
    """alice and bob were queued (in that order) before the hub restarted; after it, carol's
    live spawn asks first. The resumed requests (the hub's own `_serve_queued`) still stand
    before carol, alice before bob, the positions noted for `container-list` are theirs, and
    the servers start in that order as slots free."""
    store = QueuedStore(tmp_path)
    now = time.time()
    store.add(request("alice", since=now - 600), limit=None)
    store.add(request("bob", since=now - 300), limit=None)

    started: list[str] = []

    async def start_server(self, user, server="", options=None):
        started.append(user)
        return 202

    monkeypatch.setattr(HubClient, "start_server", start_server)
    allocator = _OneSlotAtATime()
    executor = ThreadPoolExecutor(2)
    context = SimpleNamespace(
        limits=SimpleNamespace(current=parse_limits({})),
        allocator=allocator,
        executor=executor,
        queue=GpuQueue(recheck_interval=60),  # the restarted hub's queue: empty
        queued=SimpleNamespace(store=store),
        hub_api_url="http://127.0.0.1:1/hub/api",
        eventlog=None,
        hub_groups=None,  # no hub-groups snapshot: the file's limits
    )

    async def attempt() -> Decision:
        return allocator.allocate(SimpleNamespace(container="q._.carol"), None)

    carol = asyncio.create_task(
        context.queue.acquire("q._.carol", 10, attempt, user="carol", timeout=None, abandon=None)
    )
    await wait_until_async(lambda: len(context.queue) == 1, 10, message="carol waits")
    starter = QueuedStarter(store, partial(_serve_queued, context, "token", 0.01), None)
    try:
        assert starter.resume() == 2
        await wait_until_async(lambda: len(context.queue) == 3, 10, message="all three wait")
        context.queue.notify()  # a round: every waiter's position is noted
        await wait_until_async(
            lambda: [r.position for r in store.load()] == [1, 2], 10, message="positions noted"
        )
        assert context.queue.keys() == ["q._.alice", "q._.bob", "q._.carol"]
        assert [r.waiting for r in store.load()] == [3, 3]
        for served in (["alice"], ["alice", "bob"]):
            allocator.free += 1
            context.queue.notify()
            await wait_until_async(lambda s=served: started == s, 10, message=f"{served} start")
            await wait_until_async(
                lambda s=served: not {r.user for r in store.load()} & set(s), 10, message="gone"
            )
        assert not carol.done()
        allocator.free += 1
        context.queue.notify()
        assert (await asyncio.wait_for(carol, 10)).granted == ("q._.carol",)
        assert allocator.granted == ["q._.alice", "q._.bob", "q._.carol"]
    finally:
        carol.cancel()
        executor.shutdown(wait=True)
