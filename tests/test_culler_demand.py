"""High demand and `.keep-alive` in the culler's decision (issue 17), on a controlled clock; the
`.keep-alive` check against a real container's workspace."""

from __future__ import annotations

import base64
import io
import json
import tarfile
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ds01hub import provenance
from ds01hub.limits import LimitsError, parse_limits
from ds01hub.services.ops.culler import (
    Culler,
    CullPolicy,
    ServerActivity,
    decide,
    is_regular_file,
)

NOW = datetime(2027, 3, 2, 12, 0, tzinfo=UTC)
HOUR = 3600.0


def idle(seconds: float, **kw) -> ServerActivity:
    values = dict(
        user="alice",
        server="",
        container="default._.alice",
        container_id="a" * 64,
        started=NOW - timedelta(days=3),
        last_activity=NOW - timedelta(seconds=seconds),
        gpu_samples={"0": (0, 0, 0)},
        gpu_processes={"0": ()},
        cpu_percent=0.5,
    )
    return ServerActivity(**(values | kw))


def policy(**kw) -> CullPolicy:
    values = {
        "idle_timeout": 2 * HOUR,
        "warn_before": 600.0,
        "high_demand_threshold": 0.8,
        "high_demand_reduction": 0.5,
        "keep_alive_max": 24 * HOUR,
    }
    return CullPolicy(**(values | kw))


def test_high_demand_shrinks_the_idle_timeout():
    server = idle(75 * 60)  # 1h15m idle; idle_timeout 2h
    assert decide(server, policy(), NOW, demand=0.5).code == "active"
    assert decide(server, policy(), NOW, demand=0.8).code == "active"  # not *more* than 80 %
    assert decide(server, policy(), NOW, demand=None).code == "active"  # unknown: no shrink
    verdict = decide(server, policy(), NOW, demand=0.9)
    assert (verdict.action, verdict.code) == ("warn", "idle")
    assert "high demand: 90% of GPU slots allocated (over 80%)" in verdict.reason
    assert "idle_timeout 2h cut to 1h" in verdict.reason
    # a warning given under high demand stands its lead time, then the server is culled
    later = NOW + timedelta(seconds=601)
    assert decide(server, policy(), later, verdict.warning, demand=0.9).action == "cull"
    # without the threshold set, demand changes nothing
    assert decide(server, policy(high_demand_threshold=None), NOW, demand=1.0).code == "active"


def test_keep_alive_holds_off_idle_culling_up_to_its_cap():
    due = idle(2 * HOUR + 60)  # past the idle timeout
    assert decide(due, policy(), NOW).action == "warn"
    kept = decide(replace_keep(due), policy(), NOW)
    assert (kept.action, kept.code) == ("keep", "active")
    assert ".keep-alive in the workspace: 1d more" in kept.reason
    # 26 h idle: the cap is spent, keep-alive or not
    spent = replace_keep(idle(26 * HOUR))
    warned = decide(spent, policy(), NOW)
    assert warned.action == "warn" and ".keep-alive" in warned.reason
    assert decide(spent, policy(), NOW + timedelta(seconds=601), warned.warning).action == "cull"
    # a cap of null: the file is ignored
    assert decide(replace_keep(due), policy(keep_alive_max=None), NOW).action == "warn"


def test_keep_alive_never_holds_off_max_runtime():
    server = replace_keep(idle(60, started=NOW - timedelta(hours=30)))
    verdict = decide(server, policy(max_runtime=24 * HOUR), NOW)
    assert (verdict.action, verdict.code) == ("warn", "max_runtime")


def replace_keep(activity: ServerActivity) -> ServerActivity:
    from dataclasses import replace

    return replace(activity, keep_alive=True)


@given(
    idle_for=st.floats(0, 60 * HOUR),
    demand=st.none() | st.floats(0, 1),
    keep=st.booleans(),
    warned_for=st.floats(0, 2 * HOUR),
)
def test_property_idle_culls_happen_exactly_after_the_effective_limit(
    idle_for, demand, keep, warned_for
):
    rule = policy()
    server = idle(idle_for, keep_alive=keep)
    limit = 2 * HOUR * (0.5 if demand is not None and demand > 0.8 else 1)
    limit += 24 * HOUR if keep else 0
    first = decide(server, rule, NOW, demand=demand)
    if idle_for < limit - 600:
        assert first.action == "keep"
        return
    assert first.action == "warn" and first.code == "idle"
    # never culled before the effective limit, and culled once the warning stood its lead
    since = NOW - timedelta(seconds=idle_for)
    assert first.warning.cull_at >= since + timedelta(seconds=limit) - timedelta(microseconds=1)
    later = NOW + timedelta(seconds=warned_for)
    again = decide(server, rule, later, first.warning, demand)
    assert (again.action == "cull") == (later >= first.warning.cull_at)


def test_demand_and_keep_alive_limits_are_read_from_policies():
    config = parse_limits(
        {
            "policies": {
                "high_demand_threshold": 0.75,
                "high_demand_idle_reduction": 0.25,
                "keepalive_max_duration": "12h",
            }
        }
    )
    assert not config.warnings  # DS01's keys are enforced now
    culler = Culler(None, None, None, config, state_dir="/nonexistent", trust=object())
    rule = culler.policy_for("u", [])
    assert (rule.high_demand_threshold, rule.high_demand_reduction) == (0.75, 0.25)
    assert rule.keep_alive_max == 12 * HOUR
    with pytest.raises(LimitsError) as caught:
        parse_limits({"policies": {"high_demand_threshold": 1.5, "high_demand_idle_reduction": 1}})
    paths = [p.key_path for p in caught.value.problems]
    assert paths == ["policies.high_demand_threshold", "policies.high_demand_idle_reduction"]


def test_only_a_regular_file_counts_as_keep_alive():
    def header(mode) -> str:
        return base64.b64encode(json.dumps({"name": ".keep-alive", "mode": mode}).encode()).decode()

    assert is_regular_file(header(0o644))
    assert not is_regular_file(header((1 << 31) | 0o755))  # a directory
    assert not is_regular_file(header((1 << 27) | 0o777))  # a symlink
    for bad in (None, "", "%%%", header("644"), header(True), header(-1), "A" * 5000):
        assert not is_regular_file(bad)


@pytest.mark.docker
def test_the_keep_alive_check_reads_a_real_containers_workspace(
    docker_client, base_image, tmp_path
):
    name = f"ds01-test-keepalive-{uuid.uuid4().hex[:8]}"
    container = docker_client.containers.create(
        base_image, ["sleep", "60"], name=name, labels={"ds01.test": "keepalive"}
    )
    try:
        culler = Culler(
            None,
            docker_client,
            None,
            parse_limits({}),
            state_dir=tmp_path,
            trust=provenance.load(tmp_path),
        )
        assert not culler.has_keep_alive(container.id)  # no /workspace at all
        container.put_archive("/", tar_of({"workspace/": None}))
        assert not culler.has_keep_alive(container.id)
        container.put_archive("/", tar_of({"workspace/.keep-alive/": None}))  # a directory
        assert not culler.has_keep_alive(container.id)
        other = docker_client.containers.create(base_image, ["true"], name=name + "-b")
        try:
            other.put_archive("/", tar_of({"workspace/.keep-alive": b""}))
            assert culler.has_keep_alive(other.id)
        finally:
            other.remove(force=True)
    finally:
        container.remove(force=True)


def tar_of(entries: dict[str, bytes | None]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path, data in entries.items():
            info = tarfile.TarInfo(path.rstrip("/"))
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
