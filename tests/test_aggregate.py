"""Per-user aggregate caps (issue 17): DS01's `aggregate` section read like every other limit,
the check at spawn (pure), and a per-user cgroup parent that really caps a real container
(cgroup v1, Docker's cgroupfs driver: this host)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from ds01hub.aggregate import (
    ContainerUse,
    aggregate_refusal,
    cgroup_settings,
    user_cgroup_parent,
)
from ds01hub.limits import AggregateLimits, LimitsError, parse_limits

DS01_STUDENT = {
    "cpu_quota": "9600%",
    "memory_max": "96G",
    "memory_high": "86G",
    "tasks_max": 12288,
    "gpu_limit": 3,
}


def test_ds01s_aggregate_section_is_read_and_its_gpu_limit_tightens_max_gpus():
    config = parse_limits(
        {
            "defaults": {"max_gpus": 4},
            "groups": {"student": {"members": ["alice"], "aggregate": DS01_STUDENT}},
        }
    )
    alice = config.resolve("alice")
    assert alice.aggregate == AggregateLimits(96.0, 96 << 30, 86 << 30, 12288, 3)
    assert alice.max_gpus == 3 and alice.sources["max_gpus"] == "groups.student.aggregate.gpu_limit"
    assert dict(alice.display_rows())["Aggregate (all containers)"] == (
        "96 CPUs, 96g memory, (soft 86g), 12288 tasks, 3 GPU slots"
    )
    assert config.resolve("bob").aggregate is None


@pytest.mark.parametrize(
    ("aggregate", "message"),
    [
        ({"cpu_quota": "lots"}, "cpu_quota: not a percentage"),
        ({"cpu_quota": "9600%", "cpus": 4}, "both cpu_quota and cpus"),
        ({"memory_max": "8g", "memory_high": "9g"}, "memory_high above memory_max"),
        ({"memory_max": 0}, "memory_max: 0 means no limit"),
        ({"cpu_weight": 5}, "unknown key 'cpu_weight'"),
        ("96g", "not a mapping"),
    ],
)
def test_a_bad_aggregate_is_named_with_its_fix(aggregate, message):
    with pytest.raises(LimitsError) as caught:
        parse_limits({"defaults": {"aggregate": aggregate}})
    [problem] = caught.value.problems
    assert problem.key_path == "defaults.aggregate" and message in problem.message


def test_a_spawn_beyond_the_aggregate_is_refused_and_names_why():
    cap = AggregateLimits(cpus=4, memory=8 << 30, pids=1000)
    running = [ContainerUse("one._.alice", 2, 4 << 30, 500)]
    assert aggregate_refusal("alice", cap, running, ContainerUse("two", 2, 4 << 30, 500)) is None
    refusal = aggregate_refusal("alice", cap, running, ContainerUse("two", 3, 4 << 30, 500))
    assert refusal.startswith("over the aggregate limits of alice (4 CPUs, 8g memory")
    assert "CPUs: 5 together, over the aggregate 4" in refusal
    assert "Running: one._.alice (2 CPUs, 4g memory, 500 tasks)" in refusal
    unbounded = aggregate_refusal("alice", cap, running, ContainerUse("two", 1, None, 10))
    assert "two has no memory limit, so the aggregate of 8g cannot be kept" in unbounded
    host = {"NanoCpus": 0, "CpuQuota": 150000, "CpuPeriod": 100000, "Memory": 0, "PidsLimit": -1}
    assert ContainerUse.from_host_config("x", host) == ContainerUse("x", 1.5, None, None)


def test_the_cgroup_parent_names_and_files():
    assert user_cgroup_parent("/ds01", "alice") == "/ds01/u-alice"
    assert user_cgroup_parent("/ds01/", "h.baker@lab") == "/ds01/u-h.baker@lab"
    assert user_cgroup_parent("ds01", "../../etc") == "/ds01/u-..-2f..-2fetc"
    assert "/" not in user_cgroup_parent("", "a/b").strip("/")
    files = cgroup_settings(AggregateLimits(cpus=0.5, memory=64 << 20, pids=40))
    assert files == {
        "memory": {
            "memory.limit_in_bytes": str(64 << 20),
            "memory.memsw.limit_in_bytes": str(64 << 20),
        },
        "cpu": {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "50000"},
        "pids": {"pids.max": "40"},
    }


CGROUP_ROOT = Path("/sys/fs/cgroup")


@pytest.mark.docker
@pytest.mark.root
def test_the_user_cgroup_parent_really_caps_a_real_container(docker_client, base_image):
    from ds01hub.host.cgroups import ensure_parent

    if not (CGROUP_ROOT / "memory" / "memory.use_hierarchy").exists():
        pytest.skip("not a cgroup v1 host")
    base = f"/ds01-test-{uuid.uuid4().hex[:8]}"
    parent = user_cgroup_parent(base, "alice")
    cap = AggregateLimits(cpus=0.5, memory=64 << 20, pids=40)
    containers = []

    def run(command: str, cgroup_parent: str | None):
        container = docker_client.containers.run(
            base_image,
            ["sh", "-c", command],
            detach=True,
            mem_limit=512 << 20,
            memswap_limit=512 << 20,
            cgroup_parent=cgroup_parent,
            labels={"ds01.test": "aggregate"},
        )
        containers.append(container)
        return container

    try:
        ensure_parent(CGROUP_ROOT, parent, cap)
        memory = CGROUP_ROOT / "memory" / parent.strip("/")
        assert (memory / "memory.limit_in_bytes").read_text().strip() == str(64 << 20)
        assert (CGROUP_ROOT / "cpu" / parent.strip("/") / "cpu.cfs_quota_us").read_text() == (
            "50000\n"
        )
        assert (CGROUP_ROOT / "pids" / parent.strip("/") / "pids.max").read_text() == "40\n"

        # the container's own cgroup lies under the user's parent, with its own (higher) limit
        sleeper = run("sleep 120", parent)
        own = memory / sleeper.id
        assert (own / "memory.limit_in_bytes").read_text().strip() == str(512 << 20)
        sleeper.reload()
        proc_cgroups = Path(f"/proc/{sleeper.attrs['State']['Pid']}/cgroup").read_text()
        assert f"memory:{parent}/{sleeper.id}" in proc_cgroups
        sleeper.remove(force=True)
        containers.remove(sleeper)

        # 200 MiB in one process: fine under the container's own 512m, killed under the parent
        hog = "head -c 200m /dev/zero | tail > /dev/null"
        free = run(hog, None)
        capped = run(hog, parent)
        assert free.wait(timeout=120)["StatusCode"] == 0
        assert capped.wait(timeout=120)["StatusCode"] == 137  # SIGKILL: the kernel's OOM kill
        peak = int((memory / "memory.max_usage_in_bytes").read_text())
        assert 32 << 20 < peak <= 64 << 20  # the parent's cap held, and was reached

        # tasks: 60 sleeps in one container under a parent that allows 40 in all
        forks = run("n=0; for i in $(seq 60); do sleep 30 & n=$((n+1)); done; echo $n", parent)
        forks.wait(timeout=120)
        assert "Cannot fork" in forks.logs().decode()  # dash, at the parent's pids.max
    finally:
        for container in containers:
            container.remove(force=True)
        for controller in CGROUP_ROOT.iterdir():
            for directory in (controller / parent.strip("/"), controller / base.strip("/")):
                if directory.is_dir() and not directory.is_symlink():
                    directory.rmdir()
