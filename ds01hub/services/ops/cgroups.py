"""Containers' CPU time from their cgroup counters: one small file read per container.

`docker stats` makes the engine wait about a second per container to average a sample; the
kernel keeps the same counter the engine reads, so the culler reads it itself, twice, and
divides (`cpu_percent_between`). Both cgroup layouts are handled:

- v1: the `cpuacct` hierarchy (mounted alone as `.../cpuacct` or with cpu as
  `.../cpu,cpuacct`), file `cpuacct.usage` (nanoseconds);
- v2: the unified hierarchy, file `cpu.stat`, line `usage_usec` (microseconds).

A container's directory is `<parent>/<id>` (cgroupfs driver, default parent `docker`) or
`<slice>/docker-<id>.scope` (systemd driver). The usual places are tried first; a container
with another parent (`cgroup_parent` in the limits file) is found once through its main
process (`/proc/<pid>/cgroup`) and remembered while it runs. The parsing is pure; `CgroupCpu`
is the thin reader.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

V1_FILE = "cpuacct.usage"
V2_FILE = "cpu.stat"


@dataclass(frozen=True)
class CpuHierarchy:
    """Where the CPU-accounting cgroups are mounted: `path` shows the hierarchy's `root`."""

    path: Path
    root: str
    version: int  # 1 or 2

    def directory(self, cgroup: str) -> Path | None:
        """The directory of cgroup path `cgroup` (as /proc/<pid>/cgroup says it), None when
        it lies outside what this mount shows."""
        root = self.root.rstrip("/")
        if root and cgroup != root and not cgroup.startswith(root + "/"):
            return None
        relative = cgroup[len(root) :].lstrip("/")
        if ".." in relative.split("/"):
            return None
        return self.path / relative

    @property
    def usage_file(self) -> str:
        return V1_FILE if self.version == 1 else V2_FILE


def cpu_hierarchy(mountinfo: str) -> CpuHierarchy | None:
    """The CPU-accounting hierarchy in a /proc/self/mountinfo text: cgroup v1's `cpuacct`
    mount when there is one (a hybrid host also mounts an empty v2 tree), else the v2 mount."""
    unified = None
    for line in mountinfo.splitlines():
        mount, separator, rest = line.partition(" - ")
        fields, tail = mount.split(), rest.split()
        if not separator or len(fields) < 5 or len(tail) < 3:
            continue
        root, point = _unescape(fields[3]), Path(_unescape(fields[4]))
        if tail[0] == "cgroup" and "cpuacct" in tail[2].split(","):
            return CpuHierarchy(point, root, 1)
        if tail[0] == "cgroup2" and unified is None:
            unified = CpuHierarchy(point, root, 2)
    return unified


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (`\\040`)."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def cgroup_of_process(proc_cgroup: str, version: int) -> str | None:
    """The process's cgroup path for CPU accounting from its /proc/<pid>/cgroup text: the
    line whose controllers include `cpuacct` (v1), or the `0::` line (v2)."""
    for line in proc_cgroup.splitlines():
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if not path.startswith("/"):
            continue
        if version == 1 and "cpuacct" in controllers.split(","):
            return path
        if version == 2 and number == "0" and controllers == "":
            return path
    return None


def usage_ns(text: str, version: int) -> int | None:
    """CPU time used, in nanoseconds, from `cpuacct.usage` (v1) or `cpu.stat` (v2) text."""
    if version == 1:
        value = text.strip()
        return int(value) if value.isdigit() else None
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            return int(value) * 1000 if value.strip().isdigit() else None
    return None


def cpu_percent_between(
    before_ns: int | None, after_ns: int | None, seconds: float
) -> float | None:
    """CPU use between two readings `seconds` apart, in percent of one core (200% = two
    cores busy); None when a reading is missing or the counter went back (a restart)."""
    if before_ns is None or after_ns is None or seconds <= 0 or after_ns < before_ns:
        return None
    return (after_ns - before_ns) / (seconds * 1e9) * 100.0


def usual_places(container_id: str) -> tuple[str, ...]:
    """Where Docker puts a container's cgroup without a `cgroup_parent`: cgroupfs, systemd."""
    return (f"docker/{container_id}", f"system.slice/docker-{container_id}.scope")


class CgroupCpu:
    """Reads containers' CPU counters. `main_pid(container_id)` (the engine's inspect) is asked
    only for a container found in none of the usual places, once while it runs."""

    def __init__(
        self,
        main_pid: Callable[[str], int | None],
        mountinfo: str | os.PathLike = "/proc/self/mountinfo",
        proc_root: str | os.PathLike = "/proc",
    ):
        self.main_pid = main_pid
        self.proc_root = Path(proc_root)
        try:
            self.hierarchy = cpu_hierarchy(Path(mountinfo).read_text())
        except OSError:
            self.hierarchy = None
        self._found: dict[str, Path] = {}

    def usage(self, container_id: str) -> int | None:
        """The container's CPU time so far (ns), None when its counter cannot be read."""
        directory = self.directory(container_id)
        if directory is None or self.hierarchy is None:
            return None
        try:
            text = (directory / self.hierarchy.usage_file).read_text()
        except OSError:  # stopped meanwhile: its cgroup went away
            self._found.pop(container_id, None)
            return None
        return usage_ns(text, self.hierarchy.version)

    def readings(self, container_ids: Iterable[str]) -> dict[str, int | None]:
        return {cid: self.usage(cid) for cid in container_ids}

    def directory(self, container_id: str) -> Path | None:
        hierarchy = self.hierarchy
        if hierarchy is None or not _is_container_id(container_id):
            return None
        if container_id in self._found:
            return self._found[container_id]
        for place in usual_places(container_id):
            candidate = hierarchy.path / place
            if (candidate / hierarchy.usage_file).exists():
                self._found[container_id] = candidate
                return candidate
        found = self._through_process(container_id, hierarchy)
        if found is not None:
            self._found[container_id] = found
        return found

    def _through_process(self, container_id: str, hierarchy: CpuHierarchy) -> Path | None:
        pid = self.main_pid(container_id)
        if not pid:
            return None
        try:
            text = (self.proc_root / str(pid) / "cgroup").read_text()
        except OSError:
            return None
        cgroup = cgroup_of_process(text, hierarchy.version)
        return hierarchy.directory(cgroup) if cgroup else None

    def forget_all_but(self, container_ids: Iterable[str]) -> None:
        """Drop what is remembered of containers no longer running."""
        keep = set(container_ids)
        for cid in [c for c in self._found if c not in keep]:
            del self._found[cid]


def containers_usage(root: str | os.PathLike) -> dict[str, int]:
    """Every container's CPU time (ns) under a cgroup mount `root` (a node's /sys/fs/cgroup,
    bind-mounted into its metrics exporter): v1's `cpuacct` hierarchy when there is one, else
    v2; containers in the usual places only (`usual_places`). Unreadable ones are left out."""
    root = Path(root)
    names = ("cpuacct", "cpu,cpuacct", "cpuacct,cpu")  # a host may leave some empty
    v1 = next((root / n for n in names if (root / n / V1_FILE).is_file()), None)
    base, version = (v1, 1) if v1 is not None else (root, 2)
    usage_file = V1_FILE if version == 1 else V2_FILE
    found: dict[str, int] = {}
    for pattern in ("docker/*", "system.slice/docker-*.scope"):
        for directory in base.glob(pattern):
            container = directory.name.removeprefix("docker-").removesuffix(".scope")
            if not _is_container_id(container):
                continue
            try:
                value = usage_ns((directory / usage_file).read_text(), version)
            except OSError:  # stopped meanwhile
                continue
            if value is not None:
                found[container] = value
    return found


def _is_container_id(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)
