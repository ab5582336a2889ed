"""A user's aggregate caps at the Docker proxy's door (issue 17): `docker create`/`run`/`start`
through the proxy are checked by the hub's own gate (`ds01hub.host.aggregate_gate`) against
ALL of the user's containers, and, with the site's cgroup root set, created under the user's
parent cgroup. Pure decisions first; then the real proxy, the real engine and a real Unix user
(cgroup v1, Docker's cgroupfs driver: this host)."""

from __future__ import annotations

import json
import secrets
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from harness.inspect_docs import TRUST
from hypothesis import given
from hypothesis import strategies as st
from test_proxy import IMAGE, admin_docker, docker_as, proxy_process, spawner_label_args
from test_proxy import busybox_image as busybox_image  # noqa: F401  (the module's fixture)
from test_proxy_policy import ALICE, base, create, denied

from ds01hub import labels
from ds01hub.aggregate import ContainerUse, aggregate_refusal, is_user_parent, parent_for
from ds01hub.dockerproxy import policy
from ds01hub.dockerproxy.policy import UserLimits
from ds01hub.gpu.allocator import Owner
from ds01hub.host.aggregate_gate import counted_uses
from ds01hub.limits import AggregateLimits

CAP = AggregateLimits(cpus=4, memory=8 << 30, pids=1000)
CAPPED = UserLimits(
    host_config={"Memory": 4 << 30, "MemorySwap": 4 << 30, "NanoCpus": 2 * 10**9},
    aggregate=CAP,
)
ROOTED = policy.Settings(trust=TRUST, aggregate_cgroup_root="/sys/fs/cgroup")

# --------------------------------------------------------------------------- decisions (fast)


def test_a_container_past_the_aggregate_is_refused_with_the_hubs_message():
    host = {"Memory": 4 << 30, "NanoCpus": 2 * 10**9, "PidsLimit": 100}
    one = ContainerUse("one", 2, 4 << 30, 100)
    policy.check_aggregate(ALICE, CAPPED, [one], "two", host)  # 8g together: at the cap
    message = denied(policy.check_aggregate, ALICE, CAPPED, [one, one], "two", host, status=409)
    new = ContainerUse.from_host_config("two", host)
    assert message == aggregate_refusal("alice", CAP, [one, one], new)
    assert "memory: 12g together, over the aggregate 8g" in message
    # a container without a memory limit cannot be kept under a memory cap
    unbounded = denied(policy.check_aggregate, ALICE, CAPPED, [], "two", {}, status=409)
    assert "two has no memory limit" in unbounded
    # no caps, no check
    policy.check_aggregate(ALICE, UserLimits(), [one, one, one], "two", {})
    policy.check_aggregate(ALICE, None, [one, one, one], "two", {})


def test_with_the_cgroup_root_the_container_is_made_under_the_users_parent(monkeypatch):
    monkeypatch.setattr("test_proxy_policy.SETTINGS", ROOTED)
    assert create(base(), limits=CAPPED)["HostConfig"]["CgroupParent"] == "/ds01/u-alice"
    group = UserLimits({**CAPPED.host_config, "CgroupParent": "/ds01/students"}, aggregate=CAP)
    assert create(base(), limits=group)["HostConfig"]["CgroupParent"] == "/ds01/students/u-alice"
    # a systemd slice is the systemd driver's: the admin's slice stays, no per-user parent
    slice_ = UserLimits({**CAPPED.host_config, "CgroupParent": "ds01.slice"}, aggregate=CAP)
    assert create(base(), limits=slice_)["HostConfig"]["CgroupParent"] == "ds01.slice"
    # without aggregate caps nothing is placed
    assert "CgroupParent" not in create(base(), limits=UserLimits())["HostConfig"]
    # the caller's own parent stays refused, root set or not
    assert "cgroup parent" in denied(create, base(CgroupParent="/"), limits=CAPPED)


def test_a_proxy_made_container_names_the_proxy_as_its_creator(monkeypatch):
    """While the proxy lives its created containers do not count against the caps (their
    start passes the user's lock in the proxy first); after it died, they do."""
    creator = Owner.current().label()
    monkeypatch.setattr("test_proxy_policy.SETTINGS", policy.Settings(trust=TRUST, creator=creator))
    made = create(base(), name="mine", limits=CAPPED)["Labels"]
    assert made[labels.CREATOR] == creator and TRUST.verify(made, "mine")
    record = labels.ContainerRecord.from_docker(
        {"Id": "c" * 64, "Names": ["/mine"], "State": "created", "Labels": made}, TRUST
    )
    assert record is not None and counted_uses(None, [record], exclude="other") == []


def test_restart_always_is_refused_with_caps_and_unless_stopped_kept():
    always = base(RestartPolicy={"Name": "always"})
    assert "--restart unless-stopped" in denied(create, always, limits=CAPPED)
    assert create(always, limits=UserLimits())["HostConfig"]["RestartPolicy"]["Name"] == "always"
    kept = create(base(RestartPolicy={"Name": "unless-stopped"}), limits=CAPPED)
    assert kept["HostConfig"]["RestartPolicy"] == {"Name": "unless-stopped"}


def test_without_the_cgroup_root_the_caps_are_checked_but_not_placed():
    assert "CgroupParent" not in create(base(), limits=CAPPED)["HostConfig"]
    assert CAPPED.user_parent("alice", policy.Settings(trust=TRUST)) is None
    assert CAPPED.user_parent("alice", ROOTED) == "/ds01/u-alice"


@given(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40))
def test_a_users_parent_is_theirs_alone(user, other):
    parent = parent_for("/ds01/students", user)
    assert parent is not None and parent.startswith("/ds01/students/u-")
    assert ".." not in Path(parent).parts and parent.count("/") == 3
    assert is_user_parent(parent, user) and is_user_parent(parent + "/", user)
    assert is_user_parent(parent, other) == (user == other)
    assert not is_user_parent("/ds01/students", user) and not is_user_parent("", user)


# --------------------------------------------------------------------------- real proxy, engine

CGROUP_ROOT = Path("/sys/fs/cgroup")
RUN = secrets.token_hex(3)


@pytest.fixture(scope="module")
def student(busybox_image):  # noqa: F811
    """A real Unix user (removed at teardown with everything they made)."""
    name = f"pxg{RUN}"
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], check=True)
    yield name
    ids = admin_docker("ps", "-aq", "--filter", f"label=ds01.user={name}").stdout.split()
    if ids:
        admin_docker("rm", "-f", *ids, check=False)
    subprocess.run(["userdel", "-r", name], capture_output=True)


def limits_file(directory: Path, user: str, extra: str = "") -> Path:
    """Each container 64m, the user's containers together 100m: one fits, two do not."""
    path = directory / "resource-limits.yaml"
    path.write_text(
        f"defaults:\n  memory: 64m\n  max_cpus: 1\n  pids_limit: 100\n{extra}"
        f"user_overrides:\n  {user}:\n    aggregate: {{memory_max: 100m}}\n"
    )
    return path


def run_sleeper(proxy, user: str, name: str) -> subprocess.CompletedProcess:
    return docker_as(
        proxy, user, "run", "-d", "--name", name, "--label", "ds01.test=1", IMAGE, "sleep", "300"
    )


def state_of(name: str) -> str:
    return admin_docker("inspect", "-f", "{{.State.Status}}", name).stdout.strip()


@pytest.mark.docker
@pytest.mark.root
def test_the_second_container_past_the_cap_is_refused_and_the_first_keeps_running(
    student, tmp_path
):
    first, second = f"one-{RUN}", f"two-{RUN}"
    with proxy_process("--limits", str(limits_file(tmp_path, student))) as proxy:
        assert run_sleeper(proxy, student, first).returncode == 0
        refused = run_sleeper(proxy, student, second)
        assert refused.returncode != 0
        assert f"over the aggregate limits of {student} (100m memory)" in refused.stderr
        assert "memory: 128m together, over the aggregate 100m" in refused.stderr
        assert f"Running: {first} (1 CPUs, 64m memory, 100 tasks)" in refused.stderr
        assert state_of(first) == "running"
        assert admin_docker("inspect", second, check=False).returncode != 0  # nothing left

        # made while the first was stopped, then started beside it: the start is refused
        assert docker_as(proxy, student, "stop", "-t", "0", first).returncode == 0
        made = docker_as(proxy, student, "create", "--name", second, IMAGE, "sleep", "300")
        assert made.returncode == 0, made.stderr
        assert docker_as(proxy, student, "start", first).returncode == 0
        late = docker_as(proxy, student, "start", second)
        assert late.returncode != 0 and "over the aggregate limits" in late.stderr
        assert state_of(first) == "running" and state_of(second) == "created"
        restarted = docker_as(proxy, student, "restart", "-t", "0", first)
        assert restarted.returncode == 0, restarted.stderr  # itself is not counted twice
        assert state_of(first) == "running"
        denials = proxy.log.read_text()
        assert "status=409" in denials and "over the aggregate limits" in denials
        admin_docker("rm", "-f", first, second)


@pytest.mark.docker
@pytest.mark.root
def test_two_starts_at_once_start_one_and_a_hub_container_counts_too(student, tmp_path):
    """Two `docker start`s of one user at once, each within the caps alone: the user's lock
    lets exactly one through, whichever comes first. Then a container the hub made for the
    user (its signed labels, made on the engine directly) counts against a proxy run."""
    names = [f"race{i}-{RUN}" for i in (1, 2)]
    with proxy_process("--limits", str(limits_file(tmp_path, student))) as proxy:
        for name in names:
            made = docker_as(proxy, student, "create", "--name", name, IMAGE, "sleep", "300")
            assert made.returncode == 0, made.stderr
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda n: docker_as(proxy, student, "start", n), names))
        assert sorted(r.returncode == 0 for r in results) == [False, True]
        refused = next(r for r in results if r.returncode != 0)
        assert "over the aggregate limits" in refused.stderr
        assert sorted(state_of(n) for n in names) == ["created", "running"]
        admin_docker("rm", "-f", *names)

        hub_made = f"default._.{student}"
        signed = spawner_label_args(proxy, student, hub_made)
        admin_docker("run", "-d", "--name", hub_made, "-m", "64m", *signed, IMAGE, "sleep", "300")
        late = run_sleeper(proxy, student, f"late-{RUN}")
        assert late.returncode != 0 and f"Running: {hub_made} (64m memory)" in late.stderr
        admin_docker("rm", "-f", hub_made)


@pytest.mark.docker
@pytest.mark.root
def test_with_the_cgroup_root_the_container_runs_under_the_users_capped_parent(student, tmp_path):
    if not (CGROUP_ROOT / "memory" / "memory.use_hierarchy").exists():
        pytest.skip("not a cgroup v1 host")
    base_cgroup = f"/ds01-pxtest-{RUN}"
    parent = parent_for(base_cgroup, student)
    assert parent is not None
    name = f"caged-{RUN}"
    limits = limits_file(tmp_path, student, f"  cgroup_parent: {base_cgroup}\n")
    options = ("--limits", str(limits), "--aggregate-cgroup-root", str(CGROUP_ROOT))
    try:
        with proxy_process(*options) as proxy:
            started = run_sleeper(proxy, student, name)
            assert started.returncode == 0, started.stderr
            host = json.loads(admin_docker("inspect", "-f", "{{json .HostConfig}}", name).stdout)
            assert host["CgroupParent"] == parent
            memory = CGROUP_ROOT / "memory" / parent.strip("/")
            # the caps were written before the start: the kernel enforces them on the parent
            assert (memory / "memory.limit_in_bytes").read_text().strip() == str(100 << 20)
            pid = admin_docker("inspect", "-f", "{{.State.Pid}}", name).stdout.strip()
            container_id = admin_docker("inspect", "-f", "{{.Id}}", name).stdout.strip()
            cgroups = Path(f"/proc/{pid}/cgroup").read_text()
            assert f"memory:{parent}/{container_id}" in cgroups
            # the user's own --cgroup-parent stays refused
            own = docker_as(proxy, student, "create", "--cgroup-parent", "/", IMAGE, "true")
            assert own.returncode != 0 and "cgroup parent" in own.stderr
    finally:
        admin_docker("rm", "-f", name, check=False)
        for controller in CGROUP_ROOT.iterdir():
            for directory in (controller / parent.strip("/"), controller / base_cgroup.strip("/")):
                if directory.is_dir() and not directory.is_symlink():
                    directory.rmdir()
