"""The culler's pure decision and its small edges (cgroup parsing, the warnings file)."""

from __future__ import annotations

import io
import tarfile
from datetime import UTC, datetime, timedelta

from ds01hub.services.ops.culler import (
    CullPolicy,
    ServerActivity,
    busy_signals,
    container_id_in_cgroup,
    container_of_pid,
    decide,
    needs_sampling,
    warning_archive,
)
from ds01hub.services.ops.warnings import CullWarning, WarningStore, pending_warnings

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
HOUR = 3600.0
CID = "a" * 64


def activity(idle_for: float, **kw) -> ServerActivity:
    values = dict(
        user="alice",
        server="",
        container="default._.alice",
        container_id=CID,
        started=NOW - timedelta(days=1),
        last_activity=NOW - timedelta(seconds=idle_for),
        gpu_samples={"0": (0, 1, 0)},
        gpu_processes={"0": ()},
        cpu_percent=0.5,
    )
    return ServerActivity(**(values | kw))


def policy(**kw) -> CullPolicy:
    return CullPolicy(**({"idle_timeout": 2 * HOUR, "warn_before": 600.0} | kw))


def test_recent_hub_activity_keeps_the_server_without_sampling():
    recent = activity(30 * 60)
    assert not needs_sampling(recent, policy(), NOW)
    verdict = decide(recent, policy(), NOW)
    assert (verdict.action, verdict.code) == ("keep", "active")


def test_idle_past_the_lead_is_warned_with_the_cull_time():
    verdict = decide(activity(2 * HOUR - 300), policy(), NOW)
    assert verdict.action == "warn" and verdict.code == "idle"
    # due at idle_since + timeout (5 min from now) but never sooner than the full lead time
    assert verdict.warning.cull_at == NOW + timedelta(seconds=600)
    assert "will be stopped" in verdict.warning.message()
    assert "no hub activity for 1h 55m" in verdict.reason


def test_a_warned_server_is_culled_once_the_warning_stood_its_lead():
    idle = activity(2 * HOUR)  # the same idle period throughout
    first = decide(idle, policy(), NOW)
    assert first.action == "warn"
    later = NOW + timedelta(seconds=300)
    waiting = decide(idle, policy(), later, first.warning)
    assert (waiting.action, waiting.code) == ("keep", "warned")
    assert waiting.warning == first.warning
    done = NOW + timedelta(seconds=601)
    culled = decide(idle, policy(), done, first.warning)
    assert (culled.action, culled.code) == ("cull", "idle")


def test_new_activity_after_a_warning_drops_it():
    warned = decide(activity(2 * HOUR), policy(), NOW).warning
    verdict = decide(activity(60), policy(), NOW + timedelta(minutes=11), warned)
    assert verdict.action == "keep" and verdict.warning is None


def test_a_warning_of_an_earlier_idle_period_does_not_count():
    old = decide(activity(2 * HOUR), policy(), NOW - timedelta(hours=5)).warning
    verdict = decide(activity(2 * HOUR), policy(), NOW, old)
    assert verdict.action == "warn"  # warned afresh, not culled on the stale warning


def test_busy_gpu_without_browser_is_never_culled():
    training = activity(30 * HOUR, gpu_samples={"0": (0, 97, 0)})
    verdict = decide(training, policy(), NOW)
    assert (verdict.action, verdict.code) == ("keep", "busy")
    assert "GPU 0 at 97%" in verdict.reason


def test_a_compute_process_of_the_container_keeps_a_mig_slot_busy():
    mig = activity(30 * HOUR, gpu_samples={"0:1": (None, None)}, gpu_processes={"0:1": (4242,)})
    assert busy_signals(mig, policy()) == ["1 compute process(es) on GPU 0:1"]
    assert decide(mig, policy(), NOW).action == "keep"


def test_busy_cpu_or_unknown_cpu_keeps_the_server():
    assert decide(activity(30 * HOUR, cpu_percent=180.0), policy(), NOW).code == "busy"
    unknown = decide(activity(30 * HOUR, cpu_percent=None), policy(), NOW)
    assert unknown.action == "keep" and "CPU use unknown" in unknown.reason


def test_thresholds_are_inclusive_of_busy():
    at_threshold = activity(30 * HOUR, gpu_samples={"0": (5,)}, cpu_percent=9.9)
    assert decide(at_threshold, policy(gpu_threshold=5), NOW).code == "busy"
    assert decide(at_threshold, policy(gpu_threshold=6), NOW).action == "warn"


def test_null_idle_timeout_is_never_culled():
    forgotten = activity(400 * HOUR)
    assert not needs_sampling(forgotten, policy(idle_timeout=None), NOW)
    verdict = decide(forgotten, policy(idle_timeout=None), NOW)
    assert (verdict.action, verdict.code) == ("keep", "never")


def test_without_a_lead_time_an_idle_server_is_culled_at_its_timeout():
    assert decide(activity(2 * HOUR - 1), policy(warn_before=0), NOW).action == "keep"
    verdict = decide(activity(2 * HOUR), policy(warn_before=0), NOW)
    assert verdict.action == "cull" and verdict.warning is None


def test_never_used_server_is_idle_since_its_start():
    fresh = activity(0, last_activity=None, started=NOW - timedelta(hours=3))
    assert fresh.idle_since == NOW - timedelta(hours=3)
    assert decide(fresh, policy(), NOW).action == "warn"
    unknown = activity(0, last_activity=None, started=None)
    assert decide(unknown, policy(), NOW).code == "unknown"


def test_max_runtime_stops_even_a_busy_server_after_a_warning():
    busy_long = activity(0, started=NOW - timedelta(hours=71, minutes=55), gpu_samples={"0": (99,)})
    first = decide(busy_long, policy(max_runtime=72 * HOUR), NOW)
    assert (first.action, first.code) == ("warn", "max_runtime")
    culled = decide(
        busy_long, policy(max_runtime=72 * HOUR), NOW + timedelta(minutes=11), first.warning
    )
    assert (culled.action, culled.code) == ("cull", "max_runtime")


def test_container_ids_are_read_from_cgroup_v1_and_v2():
    v1 = f"12:memory:/docker/{CID}\n11:cpu,cpuacct:/docker/{CID}\n"
    v2 = f"0::/system.slice/docker-{CID}.scope\n"
    assert container_id_in_cgroup(v1) == CID
    assert container_id_in_cgroup(v2) == CID
    assert container_id_in_cgroup("0::/user.slice/session-3.scope\n") is None


def test_container_of_pid_reads_proc(tmp_path):
    (tmp_path / "77").mkdir()
    (tmp_path / "77" / "cgroup").write_text(f"1:name=systemd:/docker/{CID}\n")
    assert container_of_pid(77, tmp_path) == CID
    assert container_of_pid(78, tmp_path) is None  # gone meanwhile


def test_warnings_round_trip_and_are_per_user(tmp_path):
    warned = decide(activity(2 * HOUR), policy(), NOW).warning
    other = CullWarning(
        "bob", "thesis", "thesis._.bob", "idle", "idle", NOW, NOW, NOW + timedelta(hours=1)
    )
    WarningStore(tmp_path).save([warned, other])
    assert pending_warnings("alice", tmp_path) == [warned]
    assert [w.container for w in pending_warnings("bob", tmp_path)] == ["thesis._.bob"]
    assert pending_warnings("carol", tmp_path) == []
    (tmp_path / "cull-warnings.json").write_text("{broken")
    assert pending_warnings("alice", tmp_path) == []


def test_warning_archive_holds_the_message_readable_by_everyone():
    with tarfile.open(fileobj=io.BytesIO(warning_archive("stop soon\n"))) as tar:
        member = tar.getmember("ds01hub/cull-warning.txt")
        assert member.mode == 0o644
        assert tar.extractfile(member).read() == b"stop soon\n"
