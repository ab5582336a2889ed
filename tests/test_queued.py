"""Queued spawn requests (the `queue` option): the stored file, its strict reading, the
per-user limit, and the hub-side tasks that resume them after a restart."""

from __future__ import annotations

import asyncio
import json

import pytest
from harness import wait_until_async

from ds01hub.gpu.queued import QueuedRequest, QueuedStore, QueueFileError, QueueLimitError
from ds01hub.spawner.options import OptionsError, normalize_user_options, options_from_form
from ds01hub.spawner.queued import QueuedStarter


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
    with pytest.raises(OptionsError, match="'queue'='yes': not true or false"):
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
