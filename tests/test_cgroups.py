"""The culler's CPU readings from cgroup counters (v1 and v2 layouts, parsing and the reader
over a directory tree laid out as the kernel does)."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from ds01hub.services.ops import cgroups

ID = "a" * 64
OTHER = "b" * 64

V1_HOST = """\
24 23 0:21 / /sys/fs/cgroup ro,relatime - tmpfs tmpfs ro,size=4096k
25 24 0:22 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
26 24 0:23 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
27 24 0:24 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
"""
V1_COMBINED = "30 24 0:25 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
V2_HOST = "35 24 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def test_the_v1_cpuacct_mount_wins_over_a_hybrid_hosts_empty_v2_tree():
    found = cgroups.cpu_hierarchy(V1_HOST)
    assert found == cgroups.CpuHierarchy(Path("/sys/fs/cgroup/cpuacct"), "/", 1)
    combined = cgroups.cpu_hierarchy(V1_COMBINED)
    assert combined.path == Path("/sys/fs/cgroup/cpu,cpuacct") and combined.version == 1
    assert cgroups.cpu_hierarchy(V2_HOST).version == 2
    assert cgroups.cpu_hierarchy("garbage\n\n1 2 3") is None


def test_a_mount_point_with_a_space_is_unescaped():
    text = "27 24 0:24 / /mnt/my\\040cgroups rw - cgroup cgroup rw,cpuacct\n"
    assert cgroups.cpu_hierarchy(text).path == Path("/mnt/my cgroups")


def test_the_cpu_cgroup_of_a_process_in_either_layout():
    v1 = f"12:cpu,cpuacct:/ds01/students/{ID}\n4:memory:/other\n0::/\n"
    assert cgroups.cgroup_of_process(v1, 1) == f"/ds01/students/{ID}"
    v2 = f"0::/system.slice/docker-{ID}.scope\n"
    assert cgroups.cgroup_of_process(v2, 2) == f"/system.slice/docker-{ID}.scope"
    assert cgroups.cgroup_of_process(v2, 1) is None


def test_usage_counters_in_either_layout():
    assert cgroups.usage_ns("123456789\n", 1) == 123456789
    assert cgroups.usage_ns("usage_usec 1500\nuser_usec 1000\n", 2) == 1_500_000
    assert cgroups.usage_ns("nonsense", 1) is None
    assert cgroups.usage_ns("user_usec 5\n", 2) is None


def test_a_path_outside_the_mounts_root_is_not_followed():
    nested = cgroups.CpuHierarchy(Path("/c"), "/docker", 1)
    assert nested.directory(f"/docker/{ID}") == Path(f"/c/{ID}")
    assert nested.directory("/elsewhere/x") is None
    assert cgroups.CpuHierarchy(Path("/c"), "/", 1).directory("/a/../../etc") is None


def test_percent_between_two_readings():
    assert cgroups.cpu_percent_between(0, 500_000_000, 1.0) == 50.0
    assert cgroups.cpu_percent_between(0, 4_000_000_000, 2.0) == 200.0
    assert cgroups.cpu_percent_between(None, 5, 1.0) is None
    assert cgroups.cpu_percent_between(10, 5, 1.0) is None  # restarted: the counter went back


@given(
    st.integers(0, 2**62),
    st.integers(0, 2**40),
    st.floats(1e-3, 1e4, allow_nan=False),
)
def test_percent_is_the_used_share_of_the_interval(before, used, seconds):
    percent = cgroups.cpu_percent_between(before, before + used, seconds)
    assert percent >= 0
    assert abs(percent * seconds * 1e7 - used) <= 1e-6 * max(used, 1)


def write_tree(root: Path, layout: dict[str, str]) -> None:
    for relative, text in layout.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def reader(tmp_path: Path, fstype: str, options: str, pids: dict[str, int]) -> cgroups.CgroupCpu:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"27 24 0:24 / {tmp_path / 'cg'} rw - {fstype} {fstype} {options}\n")
    asked = []

    def main_pid(container_id: str) -> int | None:
        asked.append(container_id)
        return pids.get(container_id)

    cpu = cgroups.CgroupCpu(main_pid, mountinfo, tmp_path / "proc")
    cpu.asked = asked  # type: ignore[attr-defined]
    return cpu


def test_v1_reader_finds_docker_s_default_place_and_a_custom_parent_once(tmp_path):
    write_tree(
        tmp_path,
        {
            f"cg/docker/{ID}/cpuacct.usage": "1000\n",
            f"cg/ds01/students/{OTHER}/cpuacct.usage": "2000\n",
            "proc/77/cgroup": f"5:cpuacct:/ds01/students/{OTHER}\n",
        },
    )
    cpu = reader(tmp_path, "cgroup", "rw,cpuacct", {OTHER: 77})
    assert cpu.readings([ID, OTHER]) == {ID: 1000, OTHER: 2000}
    (tmp_path / f"cg/ds01/students/{OTHER}/cpuacct.usage").write_text("3000\n")
    assert cpu.usage(OTHER) == 3000
    assert cpu.asked == [OTHER]  # the custom parent was looked up once, then remembered


def test_v2_reader_reads_cpu_stat_under_a_systemd_scope(tmp_path):
    write_tree(
        tmp_path,
        {f"cg/system.slice/docker-{ID}.scope/cpu.stat": "usage_usec 42\nuser_usec 40\n"},
    )
    cpu = reader(tmp_path, "cgroup2", "rw", {})
    assert cpu.usage(ID) == 42_000


def test_unreadable_or_unknown_containers_read_as_none(tmp_path):
    write_tree(tmp_path, {f"cg/docker/{ID}/cpuacct.usage": "5\n"})
    cpu = reader(tmp_path, "cgroup", "rw,cpuacct", {})
    assert cpu.usage("../../etc") is None and cpu.asked == []  # not an id: never a path
    assert cpu.usage(OTHER) is None and cpu.asked == [OTHER]  # no pid known: no reading
    assert cpu.usage(ID) == 5
    (tmp_path / f"cg/docker/{ID}/cpuacct.usage").unlink()  # stopped: its cgroup is gone
    assert cpu.usage(ID) is None


def test_no_cgroup_mount_means_no_readings(tmp_path):
    (tmp_path / "mountinfo").write_text("1 0 8:1 / / rw - ext4 /dev/sda1 rw\n")
    cpu = cgroups.CgroupCpu(lambda cid: 1, tmp_path / "mountinfo", tmp_path)
    assert cpu.usage(ID) is None
