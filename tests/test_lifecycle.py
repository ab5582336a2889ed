"""Hold expiry and container removal: the pure planning, on parsed container records."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from harness.inspect_docs import TRUST

from ds01hub import labels
from ds01hub.labels import ContainerRecord
from ds01hub.services.ops.lifecycle import expired_holds, removals_due

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def record(name, gpus=("0",), state="exited", stopped_ago=None):
    finished = NOW - stopped_ago if stopped_ago is not None else None
    doc = {
        "Id": f"id-{name}",
        "Name": f"/{name}",
        "Config": {
            "Labels": TRUST.sign(
                labels.container_labels(
                    user="alice", project=name, group="students", priority=10, gpus=gpus
                ),
                name,
            )
        },
        "State": {
            "Status": state,
            "FinishedAt": finished.isoformat() if finished else "0001-01-01T00:00:00Z",
        },
    }
    return ContainerRecord.from_docker(doc, TRUST)


def hold(seconds):
    return lambda _record: seconds


def test_gpu_hold_expires_exactly_at_finished_plus_hold():
    before = record("a", stopped_ago=timedelta(hours=1) - timedelta(seconds=1))
    at = record("b", stopped_ago=timedelta(hours=1))
    actions = expired_holds([before, at], hold(3600), NOW)
    assert [a.container for a in actions] == [at.name]
    assert actions[0].kind == "expire" and actions[0].slots == ("0",)
    assert actions[0].due == NOW
    assert "gpu_hold_after_stop 1h" in actions[0].reason


def test_running_gpu_less_or_forever_held_containers_never_expire():
    running = record("r", state="running")
    no_gpus = record("n", gpus=(), stopped_ago=timedelta(days=9))
    stopped = record("s", stopped_ago=timedelta(days=9))
    assert expired_holds([running, no_gpus], hold(60), NOW) == []
    assert expired_holds([stopped], hold(None), NOW) == []  # null: held until removed


def test_containers_are_removed_after_the_container_hold_gpu_or_not():
    old = record("old", gpus=(), stopped_ago=timedelta(hours=48))
    young = record("young", stopped_ago=timedelta(hours=47))
    actions = removals_due([old, young], hold(48 * 3600), NOW)
    assert [(a.kind, a.container) for a in actions] == [("remove", old.name)]
    assert actions[0].reason.startswith("removed:") and "workspace kept" in actions[0].reason


def test_a_null_container_hold_never_removes_and_running_is_never_removed():
    ancient = record("x", stopped_ago=timedelta(days=365))
    assert removals_due([ancient], hold(None), NOW) == []
    assert removals_due([record("y", state="running")], hold(0), NOW) == []
