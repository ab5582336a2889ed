"""Container names and labels: the parsed view every front end shares."""

from datetime import UTC, datetime

import pytest
from harness.inspect_docs import TRUST

from ds01hub import labels
from ds01hub.labels import ContainerRecord, container_name, escape_name, unescape_name


@pytest.mark.parametrize("text", ["alice", "alice.smith", "my-thesis", "a._.b", "Ünïcode", "x_y"])
def test_escape_is_docker_safe_and_reversible(text):
    escaped = escape_name(text)
    assert all(c.isalnum() and c.isascii() or c == "-" for c in escaped)
    assert unescape_name(escaped) == text


def test_the_separator_never_appears_inside_an_escaped_part():
    name = container_name("b._.c", "a._.x")
    project, _, user = name.partition(labels.NAME_SEPARATOR)
    assert (unescape_name(project), unescape_name(user)) == ("a._.x", "b._.c")
    assert name.count(labels.NAME_SEPARATOR) == 1
    assert container_name("alice") == "default._.alice"


def test_labels_carry_ds01_and_aime_compatibility_keys():
    created = datetime(2026, 2, 3, 4, 5, 6, tzinfo=UTC)
    found = labels.container_labels(
        user="alice",
        project="thesis",
        group="students",
        priority=10,
        gpus=["0", "2:1"],
        gpu_uuids=["GPU-a", "MIG-b"],
        image="ds01hub/singleuser",
        created_at=created,
    )
    assert found["ds01.managed"] == "true" and found["aime.mlc.DS01_MANAGED"] == "true"
    assert found["ds01.gpus"] == "0,2:1" == found["aime.mlc.GPUS"]
    assert found["ds01.gpu_uuids"] == "GPU-a,MIG-b"
    assert found["aime.mlc.USER"] == "alice" and found["aime.mlc.NAME"] == "thesis"
    assert found["ds01.created_at"] == "2026-02-03T04:05:06Z"
    assert all(isinstance(v, str) for v in found.values())


def test_record_from_an_inspect_document():
    doc = {
        "Id": "abc",
        "Name": "/thesis._.alice",
        "Config": {
            "Labels": TRUST.sign(
                labels.container_labels(
                    user="alice", project="thesis", group="", priority=30, gpus=["1"]
                ),
                "thesis._.alice",
            ),
            "Image": "img",
        },
        "State": {"Status": "exited", "FinishedAt": "2026-02-03T04:05:06.123456789Z"},
    }
    record = ContainerRecord.from_docker(doc, TRUST)
    assert (record.name, record.user, record.project, record.group) == (
        "thesis._.alice",
        "alice",
        "thesis",
        None,
    )
    assert record.gpus == ("1",) and record.priority == 30 and not record.running
    assert record.finished_at == datetime(2026, 2, 3, 4, 5, 6, 123456, tzinfo=UTC)
    assert record.to_dict()["finished_at"] == "2026-02-03T04:05:06.123456+00:00"
    assert record.deployment == TRUST.deployment


def test_record_from_a_list_entry_has_no_finish_time():
    entry = {
        "Id": "def",
        "Names": ["/other/alias", "/p._.bob"],  # a legacy link alias first
        "Labels": TRUST.sign(
            labels.container_labels(user="bob", project="p", group="g", priority=5), "p._.bob"
        ),
        "State": "running",
        "Created": 1767225600,
    }
    record = ContainerRecord.from_docker(entry, TRUST)
    assert record.running and record.gpus == () and record.finished_at is None
    assert record.group == "g" and record.name == "p._.bob"


@pytest.mark.parametrize(
    "found",
    [
        {},
        {"ds01.user": "mallory"},  # no managed flag
        {"ds01.managed": "true"},  # no user
        {"ds01.managed": "yes", "ds01.user": "mallory"},
        {"aime.mlc.DS01_MANAGED": "true", "aime.mlc.USER": "mallory"},  # compat labels alone
    ],
)
def test_containers_without_both_ownership_labels_are_not_ours(found):
    doc = {"Id": "x", "Name": "/x", "Config": {"Labels": found}}
    assert ContainerRecord.from_docker(doc, TRUST) is None
    assert ContainerRecord.claimed(doc) is None


def test_docker_zero_time_means_never():
    assert labels.parse_docker_time("0001-01-01T00:00:00Z") is None
    assert labels.parse_docker_time("") is None
    assert labels.parse_docker_time("not a time") is None
    assert labels.parse_docker_time(0) == datetime(1970, 1, 1, tzinfo=UTC)
