"""A per-user cgroup parent that enforces aggregate caps (cgroup v1, Docker's cgroupfs driver).

Docker (cgroupfs driver) puts a container with `--cgroup-parent=/ds01/u-alice` in
`/sys/fs/cgroup/<controller>/ds01/u-alice/<container id>`, creating the parent when it is
missing and leaving it as it is when it exists. So DS01Spawner (root) creates the parent first
and writes the user's caps into it (`ds01hub.aggregate.cgroup_settings`): the kernel then caps
the sum of everything under it, with `memory.use_hierarchy` (on by default under Docker) for
memory. A systemd slice (the systemd driver, cgroup v2) is the other way and not this module.

Docker (runc) also makes the parent under every other controller it uses. When the user's last
container is gone, `remove_parent` removes the parent's directory under each controller
(`ds01hub.host.aggregate_gate.remove_unused_parent` decides when, under the user's lock, so
that a start never loses its parent). The kernel refuses to remove a cgroup that still has a
process or a child cgroup (EBUSY): such a directory is left, never emptied by force.
"""

from __future__ import annotations

import errno
from pathlib import Path

from ds01hub.aggregate import cgroup_settings
from ds01hub.errors import Ds01hubError
from ds01hub.limits import AggregateLimits

__all__ = ["CgroupError", "ensure_parent", "remove_parent"]


class CgroupError(Ds01hubError):
    """The parent could not be set up: the message names the file and the fix."""


def ensure_parent(root: str | Path, parent: str, cap: AggregateLimits) -> list[Path]:
    """Create `parent` under each cgroup v1 controller of `root` (/sys/fs/cgroup) that `cap`
    needs and write its caps; returns the files written. Idempotent: the caps are written
    again on every spawn, so an edited limit applies to the next one."""
    written: list[Path] = []
    for controller, files in cgroup_settings(cap).items():
        directory = Path(root) / controller / parent.strip("/")
        if ".." in Path(parent).parts:
            raise CgroupError(f"cgroup parent {parent!r} leaves {root}")
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CgroupError(
                f"cannot create the cgroup {directory}: {error.strerror}; is {root} a cgroup v1 "
                "mount with this controller, and does the hub run as root?"
            ) from None
        pending = [(directory / name, value) for name, value in files.items()]
        pending = [(path, value) for path, value in pending if path.exists()]
        written += _write_all(pending)
    return written


def _write_all(pending: list[tuple[Path, str]]) -> list[Path]:
    """Write in order; a value the kernel refuses because of another one's (memory.limit above
    memory.memsw.limit, when raising) is written again after the rest."""
    retry: list[tuple[Path, str]] = []
    for path, value in pending:
        try:
            path.write_text(value)
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise CgroupError(f"cannot write {value} to {path}: {error.strerror}") from None
            retry.append((path, value))
    for path, value in retry:
        try:
            path.write_text(value)
        except OSError as error:
            raise CgroupError(
                f"the kernel refused {value} in {path}: {error.strerror} (is a container under "
                "it using more already?)"
            ) from None
    return [path for path, _ in pending]


def remove_parent(root: str | Path, parent: str) -> list[Path]:
    """Remove `parent`'s directory (only its own last level, not the base above it) under each
    cgroup v1 controller of `root`; returns those removed. One still in use (a process or a
    child cgroup in it: the kernel says EBUSY or ENOTEMPTY) is left."""
    if ".." in Path(parent).parts or not parent.strip("/"):
        raise CgroupError(f"cgroup parent {parent!r} leaves {root}")
    removed = []
    for controller in sorted(Path(root).iterdir()):
        directory = controller / parent.strip("/")
        if controller.is_symlink() or not directory.is_dir():
            continue  # `cpu` -> `cpu,cpuacct`: the same directory, once
        try:
            directory.rmdir()
        except OSError as error:
            if error.errno in (errno.EBUSY, errno.ENOTEMPTY, errno.ENOENT):
                continue
            raise CgroupError(f"cannot remove the cgroup {directory}: {error.strerror}") from None
        removed.append(directory)
    return removed
