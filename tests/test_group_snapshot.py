"""The hub-groups snapshot (ds01hub.hub.group_snapshot): what the ds01-ops pass writes and every
door without the hub's database reads. Written whole, read strictly; any bytes or shape are a
snapshot or a named SnapshotError, never a traceback; a file that is not root's (or the
reader's), a link or a FIFO is not believed; a bad group property refuses its members only."""

from __future__ import annotations

import json
import os
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ds01hub import paths
from ds01hub.hub.group_limits import GroupLimits
from ds01hub.hub.group_snapshot import (
    SnapshotError,
    SnapshotReader,
    parse_snapshot,
    read_snapshot,
    snapshot_document,
    write_snapshot,
)
from ds01hub.limits import LimitsError, parse_limits

NOW = datetime(2026, 12, 7, 16, 0, tzinfo=UTC)
CONFIG = parse_limits(
    {
        "defaults": {"memory": "8g", "max_cpus": 4, "max_containers_per_user": 5},
        "groups": {"students": {"memory": "4g", "priority": 20}},
    }
)


def groups(**entries: tuple[list[str], object]) -> GroupLimits:
    found = GroupLimits()
    for name, (users, ds01) in entries.items():
        found.add(name, {} if ds01 is None else {"ds01": ds01}, users)
    return found


def written(tmp_path: Path, found: GroupLimits) -> Path:
    path = paths.hub_groups_snapshot(tmp_path)
    write_snapshot(path, found, NOW)
    return path


def test_written_whole_and_read_back_with_members_limits_and_problems(tmp_path):
    found = groups(
        students=(["alice", "bob"], {"memory": "1g", "max_containers_per_user": 1}),
        broken=(["bob"], {"memory": "1k"}),
        plain=(["carol"], None),
    )
    path = written(tmp_path, found)
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left
    snapshot = read_snapshot(path)
    assert snapshot is not None and snapshot.written_at == NOW
    assert snapshot.groups_of("alice") == ("students",)
    assert snapshot.groups_of("bob") == ("broken", "students")
    assert snapshot.groups_of("carol") == ("plain",)
    assert snapshot.groups.layers["students"].limits["memory"] == 1 << 30
    [problem] = snapshot.groups.problems["broken"]
    assert str(problem).startswith("JupyterHub group 'broken' properties: ds01.memory:")


def test_a_property_tighter_than_the_file_binds_with_its_source(tmp_path):
    path = written(tmp_path, groups(students=(["alice"], {"memory": "1g"})))
    resolved = SnapshotReader(path).resolve(CONFIG, "alice", ["unix-group"])
    assert resolved.memory == 1 << 30
    assert resolved.sources["memory"] == "hub_groups.students"
    # the hub group also chooses the YAML group, as the spawner's live groups do
    assert resolved.group == "students" and resolved.sources["priority"] == "groups.students"
    assert SnapshotReader(path).resolve(CONFIG, "dave").memory == 8 << 30


def test_a_bad_property_refuses_its_members_with_the_spawners_message(tmp_path):
    path = written(tmp_path, groups(broken=(["bob"], {"memory": "1k"})))
    with pytest.raises(LimitsError) as caught:
        SnapshotReader(path).resolve(CONFIG, "bob")
    assert "JupyterHub group 'broken' properties: ds01.memory" in str(caught.value)
    assert SnapshotReader(path).resolve(CONFIG, "alice").memory == 8 << 30  # others unaffected


def test_no_snapshot_yet_is_the_file_alone_and_says_so(tmp_path):
    reader = SnapshotReader(paths.hub_groups_snapshot(tmp_path))
    assert reader.current() is None
    assert reader.resolve(CONFIG, "alice", ["students"]).memory == 4 << 30
    assert "no hub group snapshot yet" in reader.status(NOW)


def test_the_reader_follows_each_rewrite_and_a_corrupt_file_fails_closed(tmp_path):
    path = written(tmp_path, groups(students=(["alice"], {"memory": "1g"})))
    reader = SnapshotReader(path)
    assert reader.resolve(CONFIG, "alice").memory == 1 << 30
    write_snapshot(path, groups(students=(["alice"], {"memory": "2g"})), NOW)
    assert reader.resolve(CONFIG, "alice").memory == 2 << 30
    path.write_bytes(b'{"version": 1, "written_at": ')  # a torn write (never ours: renamed)
    with pytest.raises(SnapshotError) as caught:
        reader.resolve(CONFIG, "alice")
    assert str(path) in caught.value.message and "not a snapshot" in caught.value.message
    assert "refused" in reader.status(NOW)


def test_a_link_a_fifo_and_a_file_others_may_write_are_not_believed(tmp_path):
    real = written(tmp_path, groups(students=(["alice"], {"memory": "1g"})))
    link = tmp_path / "link.json"
    link.symlink_to(real)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    writable = tmp_path / "writable.json"
    writable.write_bytes(real.read_bytes())
    writable.chmod(0o666)
    for path, why in ((link, "cannot be opened"), (fifo, "regular"), (writable, "writable")):
        with pytest.raises(SnapshotError) as caught:
            read_snapshot(path)  # the FIFO: no hang (opened non-blocking)
        assert why in caught.value.message


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_a_file_owned_by_another_user_is_not_believed(tmp_path):
    path = written(tmp_path, groups(students=(["alice"], {"memory": "1g"})))
    os.chown(path, 65534, 65534)
    with pytest.raises(SnapshotError, match="owned by uid 65534, not root"):
        SnapshotReader(path).resolve(CONFIG, "alice")


def test_readers_never_see_a_partial_file_while_it_is_rewritten(tmp_path):
    path = written(tmp_path, groups(students=(["alice"], {"memory": "1g"})))
    stop = threading.Event()
    errors: list[BaseException] = []

    def read_all_the_time() -> None:
        while not stop.is_set():
            try:
                read_snapshot(path)
            except BaseException as error:  # noqa: BLE001 - any failure is the finding
                errors.append(error)

    reader = threading.Thread(target=read_all_the_time)
    reader.start()
    try:
        for size in range(50):
            members = [f"user{i}" for i in range(size * 40)]
            write_snapshot(path, groups(students=(members, {"memory": f"{size + 1}g"})), NOW)
    finally:
        stop.set()
        reader.join()
    assert errors == []


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\xff\xfe", "not UTF-8"),
        (b"[" * 100_000, "nested too deeply"),
        (b'{"version": 1, "version": 1}', "duplicate key 'version'"),
        (b'{"version": NaN, "written_at": "x", "groups": []}', "NaN"),
        (b'{"version": 2, "written_at": "2026-01-01T00:00:00+00:00", "groups": []}', "version"),
        (b'{"version": 1, "written_at": "2026-01-01", "groups": []}', "with a zone"),
        (b'{"version": 1, "written_at": "2026-01-01T00:00:00Z", "groups": {}}', "a list"),
        (
            b'{"version": 1, "written_at": "2026-01-01T00:00:00Z", "groups": '
            b'[{"name": "a", "users": []}, {"name": "a", "users": []}]}',
            "listed twice",
        ),
        (
            b'{"version": 1, "written_at": "2026-01-01T00:00:00Z", "groups": '
            b'[{"name": "a", "users": [""]}]}',
            "non-empty name",
        ),
        (b'{"version": 1, "written_at": "2026-01-01T00:00:00Z", "groups": [], "x": 1}', "'x'"),
        (b" " * (16 << 20) + b"{}", "larger than"),
    ],
)
def test_each_kind_of_bad_snapshot_is_named(data, why):
    with pytest.raises(SnapshotError) as caught:
        parse_snapshot(data, "S")
    assert caught.value.message.startswith("hub group snapshot S: ") and why in str(caught.value)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
GROUP = st.fixed_dictionaries(
    {"name": st.text(max_size=8), "users": st.lists(st.text(max_size=6), max_size=4)},
    optional={"ds01": JSON | st.dictionaries(st.sampled_from(["memory", "max_gpus"]), JSON)},
)
DOCUMENT = st.fixed_dictionaries(
    {
        "version": st.sampled_from([1, 1.0, True, "1"]),
        "written_at": st.sampled_from(["2026-12-07T16:00:00+00:00", "2026-12-07", "x"]),
        "groups": st.lists(GROUP | JSON, max_size=4),
    }
)


def outcome(data: bytes) -> None:
    """A snapshot (its every group resolvable or refused by name) or a SnapshotError."""
    try:
        snapshot = parse_snapshot(data)
    except SnapshotError as error:
        assert error.message.startswith("hub group snapshot <snapshot>: ")
        return
    for user in {u for users in snapshot.groups.members.values() for u in users}:
        try:
            snapshot.resolve(CONFIG, user)
        except LimitsError as error:
            assert "JupyterHub group" in str(error)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_any_bytes_are_a_snapshot_or_a_named_error(data):
    outcome(data)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(DOCUMENT | JSON)
def test_any_json_shape_is_a_snapshot_or_a_named_error(document):
    outcome(json.dumps(document).encode())


@settings(max_examples=100)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=8).filter(lambda s: "\x00" not in s),
        st.tuples(st.lists(st.text(min_size=1, max_size=6).filter(lambda s: "\x00" not in s))),
        max_size=5,
    )
)
def test_what_is_written_reads_back_the_same(entries):
    found = GroupLimits()
    for name, (users,) in entries.items():
        found.add(name, {"ds01": {"memory": "1g"}}, users)
    data = json.dumps(snapshot_document(found, NOW)).encode()
    snapshot = parse_snapshot(data)
    assert {n: sorted(u) for n, u in snapshot.groups.members.items()} == {
        n: sorted(u) for n, (u,) in entries.items()
    }
    assert snapshot.groups.layers.keys() == entries.keys()
