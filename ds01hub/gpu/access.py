"""No GPU behind the allocator's back: the NVIDIA device nodes belong to a group, and people
join it only for an admin-approved, expiring time (DS01's bare-metal restriction).

* The install makes the nodes ``root:ds01-gpu 0660`` three ways: the driver's own module
  options (``NVreg_DeviceFileGID``/``NVreg_DeviceFileMode`` in /etc/modprobe.d, used when the
  driver or nvidia-modprobe creates the nodes), a udev rule (nodes udev creates, the MIG
  instances' access capabilities under /dev/nvidia-caps), and at once for the nodes already
  there. The two MIG capabilities that are not a GPU to compute on keep the driver's own
  modes: ``nvidia-cap1`` (``mig/config``: create and destroy MIG instances, root only, 0400)
  and ``nvidia-cap2`` (``mig/monitor``: read-only for all, 0444). Their minors are fixed by
  the driver (``/proc/driver/nvidia-caps/mig-minors``: ``config 1``, ``monitor 2``); making
  them ``0660`` for the group would hand every grantee the power to repartition the GPUs
  under the allocator (found on a real H100: the driver creates them 0400 and 0444).
* Containers still get their GPUs: the NVIDIA runtime gives a container the device nodes of its
  device request, and DS01Spawner's containers carry the group as a supplementary group
  (``DS01HUB_GPU_GROUP`` in the hub config) for a process running as the user's own uid. A
  container without a device request has no node to open, group or not.
* ``ds01hub grant-gpu-access USER --for 24h [--reason ...]`` adds USER to the group and records
  the grant (who, by whom, until when) in ``$DS01HUB_STATE_DIR/gpu-access.json``; ``--list``
  shows the grants, ``--revoke USER`` ends one, ``--sweep`` (ds01hub-gpu-access.timer, every 5
  minutes) ends the expired ones. Ending a grant removes USER from the group and stops USER's
  host processes that still carry the group (a process keeps its groups until it exits, so a
  shell started during the grant would otherwise keep the GPUs); processes inside containers
  (another pid namespace) are left alone. Members added to the group by hand are permanent and
  never touched by grants.

Standard library only: the install (before any venv) renders the files.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import grp
import json
import os
import pwd
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ds01hub import paths
from ds01hub.errors import Ds01hubError, render
from ds01hub.units import UnitError, format_duration, parse_duration

GPU_GROUP = "ds01-gpu"
DEVICE_MODE = 0o660
GRANTS_FILE = "gpu-access.json"
UDEV_RULE = "/etc/udev/rules.d/70-ds01hub-nvidia.rules"
MODPROBE_CONF = "/etc/modprobe.d/ds01hub-nvidia.conf"
#: The NVIDIA device nodes: GPUs, the control device, UVM, modeset, MIG instances' access
#: capabilities (minor 3 and up: globs, as udev's KERNEL== matches them).
NODE_PATTERNS = (
    "nvidia[0-9]*",
    "nvidiactl",
    "nvidia-uvm",
    "nvidia-uvm-tools",
    "nvidia-modeset",
    "nvidia-caps/nvidia-cap[3-9]",
    "nvidia-caps/nvidia-cap[1-9][0-9]*",
)
#: MIG ``config`` (1) and ``monitor`` (2): never touched (see the module docstring).
DRIVER_OWNED_CAPS = ("nvidia-cap1", "nvidia-cap2")
MAX_GRANT = 30 * 86400  # a month: longer is a permanent member, added by hand


class GpuAccessError(Ds01hubError, RuntimeError):
    """A grant could not be made or ended; the message says why and what to do."""


# --------------------------------------------------------------------------------------------
# the device nodes (install)


def render_udev_rule(group: str) -> str:
    return (
        "# ds01hub: NVIDIA device nodes are for the allocator's containers and for people with\n"
        "# an admin's time-limited grant (ds01hub grant-gpu-access), not for every process.\n"
        f'KERNEL=="nvidia[0-9]*|nvidiactl|nvidia-uvm|nvidia-uvm-tools|nvidia-modeset", '
        f'GROUP="{group}", MODE="{DEVICE_MODE:04o}"\n'
        "# MIG instances' access capabilities; nvidia-cap1 (config) and nvidia-cap2 (monitor)\n"
        "# keep the driver's 0400/0444.\n"
        f'KERNEL=="nvidia-cap[3-9]|nvidia-cap[1-9][0-9]*", GROUP="{group}", '
        f'MODE="{DEVICE_MODE:04o}"\n'
    )


def render_modprobe(gid: int) -> str:
    """The driver's own options: it (and nvidia-modprobe) create the nodes with this owner."""
    return (
        "# ds01hub: the NVIDIA driver creates its device nodes root:<GPU group> 0660 (takes\n"
        "# effect when the module is next loaded: reboot, or unload and load nvidia).\n"
        f"options nvidia NVreg_DeviceFileUID=0 NVreg_DeviceFileGID={gid} "
        f"NVreg_DeviceFileMode={DEVICE_MODE}\n"
    )


def device_nodes(dev: Path) -> list[Path]:
    """The NVIDIA nodes under ``dev`` (a temp dir in tests)."""
    return sorted({node for pattern in NODE_PATTERNS for node in dev.glob(pattern)})


def nodes_to_fix(dev: Path, gid: int) -> list[Path]:
    return [
        node
        for node in device_nodes(dev)
        if node.stat().st_gid != gid or stat.S_IMODE(node.stat().st_mode) != DEVICE_MODE
    ]


def restrict_nodes(dev: Path, gid: int) -> list[Path]:
    """Make the NVIDIA nodes there now root:<gid> 0660; returns the nodes changed."""
    changed = nodes_to_fix(dev, gid)
    for node in changed:
        os.chown(node, 0, gid)
        os.chmod(node, DEVICE_MODE)
    return changed


def install_steps(layout: Any, file_step: Callable, step: Callable, accounts: bool) -> list:
    """The install's GPU steps (ds01hub.host.install calls this with its Layout, file_step and
    Step):
    udev rule, module options with the group's gid (known once the group exists), and the
    nodes already present."""
    rule = layout.at(UDEV_RULE)
    conf = layout.at(MODPROBE_CONF)

    def gid() -> int:
        try:
            return grp.getgrnam(layout.gpu_group).gr_gid
        except KeyError:
            raise GpuAccessError(
                f"group {layout.gpu_group} does not exist: the install creates it (run it as "
                "root without --root), or create it with groupadd --system"
            ) from None

    def conf_needed() -> bool:
        try:
            return not conf.exists() or conf.read_text() != render_modprobe(gid())
        except GpuAccessError:
            return True  # the group comes with this install (a dry run has not made it yet)

    def write_conf() -> None:
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(render_modprobe(gid()))
        os.chmod(conf, 0o644)

    def reload_udev() -> None:
        if layout.real and Path("/run/udev/control").exists():
            subprocess.run(["udevadm", "control", "--reload"], check=False)

    rule_file = file_step(rule, render_udev_rule(layout.gpu_group))
    return [
        step(rule_file.what, rule_file.needed, lambda: (rule_file.apply(), reload_udev())),
        step(f"write {conf} (NVreg_DeviceFileGID of {layout.gpu_group})", conf_needed, write_conf),
        step(
            f"restrict the NVIDIA device nodes in {layout.dev} to root:{layout.gpu_group} 0660",
            lambda: bool(device_nodes(layout.dev)) and bool(nodes_to_fix(layout.dev, gid())),
            lambda: restrict_nodes(layout.dev, gid()),
        ),
    ]


def uninstall_actions(layout: Any, remove: Callable[[Path], list]) -> list:
    """Remove the rule and the module options (the nodes keep their mode until the driver
    is next loaded)."""
    return remove(layout.at(UDEV_RULE)) + remove(layout.at(MODPROBE_CONF))


# --------------------------------------------------------------------------------------------
# grants


@dataclass(frozen=True)
class Grant:
    user: str
    granted_by: str
    granted_at: float
    expires_at: float
    reason: str = ""

    def to_dict(self, now: float | None = None) -> dict:
        data = asdict(self)
        data["granted_at_iso"] = _iso(self.granted_at)
        data["expires_at_iso"] = _iso(self.expires_at)
        if now is not None:
            data["remaining"] = format_duration(max(0.0, self.expires_at - now))
        return data


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class GrantStore:
    """The grants file under the state directory, read and written under an flock."""

    state_dir: Path
    group: str = GPU_GROUP
    proc: Path = Path("/proc")

    @property
    def path(self) -> Path:
        return self.state_dir / GRANTS_FILE

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict[str, Grant]]:
        """The grants by user, for reading and changing; written back on success."""
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.state_dir / f"{GRANTS_FILE}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            grants = self._read()
            yield grants
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(
                json.dumps({"grants": [asdict(g) for g in grants.values()]}, indent=2) + "\n"
            )
            os.chmod(temporary, 0o600)
            os.replace(temporary, self.path)

    def _read(self) -> dict[str, Grant]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
            return {g["user"]: Grant(**g) for g in data["grants"]}
        except (ValueError, KeyError, TypeError) as error:
            raise GpuAccessError(
                f"{self.path} is not a grants file ({error}); move it away to start afresh "
                "(the group's members stay as they are)"
            ) from None

    def list(self) -> list[Grant]:
        return sorted(self._read().values(), key=lambda g: g.expires_at)

    def grant(self, user: str, seconds: float, by: str, reason: str, now: float) -> Grant:
        entry = _account(user)
        if entry.pw_uid == 0:
            raise GpuAccessError("root needs no grant")
        if not 0 < seconds <= MAX_GRANT:
            raise GpuAccessError(
                f"--for {format_duration(seconds)}: a grant lasts more than 0 and at most "
                f"{format_duration(MAX_GRANT)}; for longer, add {user} to {self.group} by hand"
            )
        with self.locked() as grants:
            if user in _members(self.group) and user not in grants:
                raise GpuAccessError(
                    f"{user} is a permanent member of {self.group} (added by hand): a grant "
                    "would end that; remove them with gpasswd -d first if that is meant"
                )
            subprocess.run(["gpasswd", "-a", user, self.group], check=True, capture_output=True)
            new = Grant(user, by, now, now + seconds, reason)
            grants[user] = new
            return new

    def revoke(self, user: str) -> dict:
        """End USER's grant: out of the group, their host processes that carry it stopped."""
        with self.locked() as grants:
            if user not in grants:
                raise GpuAccessError(f"{user} has no GPU access grant (see --list)")
            return self._end(grants, user)

    def sweep(self, now: float) -> list[dict]:
        """End every grant that has expired."""
        with self.locked() as grants:
            expired = [u for u, g in grants.items() if g.expires_at <= now]
            return [self._end(grants, user) for user in expired]

    def _end(self, grants: dict[str, Grant], user: str) -> dict:
        del grants[user]
        with contextlib.suppress(subprocess.CalledProcessError):  # already out of the group
            subprocess.run(["gpasswd", "-d", user, self.group], check=True, capture_output=True)
        stopped = self._stop_processes(user)
        return {"user": user, "stopped_processes": stopped}

    def _stop_processes(self, user: str) -> list[int]:
        try:
            uid = pwd.getpwnam(user).pw_uid
            gid = grp.getgrnam(self.group).gr_gid
        except KeyError:
            return []
        pids = processes_with_group(uid, gid, self.proc)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        return pids


def _account(user: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(user)
    except KeyError:
        raise GpuAccessError(f"no Unix account {user!r} on this host") from None


def _members(group: str) -> set[str]:
    try:
        return set(grp.getgrnam(group).gr_mem)
    except KeyError:
        raise GpuAccessError(
            f"group {group} does not exist: run `ds01hub install` (it creates it)"
        ) from None


_STATUS_RE = re.compile(r"^(Uid|Groups):\s*(.*)$", re.MULTILINE)


def processes_with_group(uid: int, gid: int, proc: Path = Path("/proc")) -> list[int]:
    """Host processes of ``uid`` (real uid) that carry ``gid`` as a supplementary group, in our
    own pid namespace (a container's processes live in another and keep their group)."""
    own_ns = _pid_namespace(proc / "self")
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = dict(_STATUS_RE.findall((entry / "status").read_text()))
            if own_ns is not None and _pid_namespace(entry) != own_ns:
                continue
        except OSError:  # ended meanwhile
            continue
        uids = fields.get("Uid", "").split()
        groups = fields.get("Groups", "").split()
        if uids and int(uids[0]) == uid and str(gid) in groups:
            found.append(int(entry.name))
    return sorted(found)


def _pid_namespace(process: Path) -> str | None:
    try:
        return os.readlink(process / "ns" / "pid")
    except OSError:
        return None


# --------------------------------------------------------------------------------------------
# command line: ds01hub grant-gpu-access


def _state_dir(args: argparse.Namespace) -> Path:
    return paths.state_dir(args.state_dir)


def run_command(args: argparse.Namespace) -> int:
    store = GrantStore(_state_dir(args), group=os.environ.get("DS01HUB_GPU_GROUP") or GPU_GROUP)
    now = time.time()
    try:
        if args.list or not (args.user or args.sweep):
            grants = [g.to_dict(now) for g in store.list()]
            _say(args, {"grants": grants}, _grant_lines(grants))
            return 0
        if os.geteuid() != 0:
            raise GpuAccessError("only root changes GPU access (sudo ds01hub grant-gpu-access)")
        if args.sweep:
            ended = store.sweep(now)
            _say(args, {"ended": ended}, [_ended_line(e, "expired") for e in ended])
        elif args.revoke:
            ended = store.revoke(args.user)
            _say(args, {"ended": [ended]}, [_ended_line(ended, "revoked")])
        else:
            if not args.duration:
                raise GpuAccessError("say for how long: --for 24h (at most 30d)")
            seconds = parse_duration(args.duration)
            by = os.environ.get("SUDO_USER") or pwd.getpwuid(os.getuid()).pw_name
            grant = store.grant(args.user, seconds, by, args.reason, now)
            _say(
                args,
                {"granted": grant.to_dict(now)},
                [
                    f"{grant.user} may use the GPUs directly until {_iso(grant.expires_at)} "
                    f"(group {store.group}; from their next login). Ends by itself, or: "
                    f"ds01hub grant-gpu-access {grant.user} --revoke"
                ],
            )
    except (GpuAccessError, UnitError) as error:
        print(render(error, "ds01hub grant-gpu-access"), file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as error:
        detail = (error.stderr or b"").decode(errors="replace").strip()
        print(f"ds01hub grant-gpu-access: {' '.join(error.cmd)}: {detail}", file=sys.stderr)
        return 1
    return 0


def _grant_lines(grants: list[dict]) -> list[str]:
    if not grants:
        return ["no GPU access grants"]
    return [
        f"{g['user']:<16} until {g['expires_at_iso']} ({g['remaining']} left), granted by "
        f"{g['granted_by']}{': ' + g['reason'] if g['reason'] else ''}"
        for g in grants
    ]


def _ended_line(ended: dict, how: str) -> str:
    pids = ended["stopped_processes"]
    stopped = f"; stopped their processes {', '.join(map(str, pids))}" if pids else ""
    return f"{how}: GPU access of {ended['user']}{stopped}"


def _say(args: argparse.Namespace, data: dict, lines: list[str]) -> None:
    print(json.dumps(data, indent=2) if args.json else "\n".join(lines))
