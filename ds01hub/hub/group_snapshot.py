"""The hub's group properties and members for the doors that have no hub database: one file.

The spawner reads a group's `ds01` properties from the hub's ORM on every spawn. The other
doors that resolve a user's limits (the Docker socket proxy, the SSH users' broker, the
notebook service's quota view, `ds01hub limits` and `ds01hub fairshare`) cannot: the proxy
has no hub token at all. So the ds01-ops service, which reads every group over the REST API
each culler pass, writes what it read to `STATE_DIR/hub-groups.json` (`write_snapshot`:
temporary file, fsync, rename; mode 0644, owned by the service's user, root on a host), and
every door resolves through `SnapshotReader` (re-read when the file changes). The properties
are stored as the hub gave them and checked on reading by the YAML's readers
(`ds01hub.limits.parse_group_properties`), so every door has the spawner's messages.

Trust: the file decides limits, so a reader believes it only when it is a regular file owned
by root (or by the reader itself) and writable by nobody else, and parses it strictly; any
doubt is a `SnapshotError` that the doors refuse with (fail closed), never a silent fallback to
the looser file-only limits. No file at all means the ops service never ran: the YAML alone
applies, and `ds01hub limits` and the admin page say so. The file is as fresh as the last
pass that reached the hub (one `OpsService.interval`, 5 minutes by default).
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ds01hub.errors import Ds01hubError
from ds01hub.hub.group_limits import GroupLimits
from ds01hub.limits import (
    HUB_PROPERTY,
    HubGroupLimits,
    LimitsConfig,
    LimitsError,
    ResolvedLimits,
)
from ds01hub.strict_yaml import short_repr

__all__ = [
    "MAX_SNAPSHOT_BYTES",
    "GroupSnapshot",
    "SnapshotError",
    "SnapshotReader",
    "lenient_resolver",
    "parse_snapshot",
    "read_snapshot",
    "snapshot_document",
    "write_snapshot",
]

SNAPSHOT_VERSION = 1
#: Far above a lab's groups (10,000 users in 100 groups is about 1 MiB); a bound on the work.
MAX_SNAPSHOT_BYTES = 16 << 20
MAX_NAME = 1024
HINT = (
    "the ds01-ops service rewrites it on its next pass; if this persists, check the state "
    "directory (it must be root's) and the ops service's log, or delete the file to fall back "
    "to the YAML file's limits until the next pass"
)


class SnapshotError(Ds01hubError):
    """The snapshot exists but cannot be believed: `message` names the file and what is wrong.
    Doors refuse what needs limits (503) rather than apply looser ones."""

    status = 503

    def __init__(self, path: str, what: str):
        super().__init__(f"hub group snapshot {path}: {what}", hint=HINT)


@dataclass(frozen=True)
class GroupSnapshot:
    """The hub's groups as of one ops pass: limits and problems by group, members."""

    groups: GroupLimits
    written_at: datetime
    path: str = "<snapshot>"
    by_user: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, groups: GroupLimits, written_at: datetime, path: str) -> GroupSnapshot:
        by_user: dict[str, list[str]] = {}
        for name, users in groups.members.items():
            for user in users:
                by_user.setdefault(user, []).append(name)
        index = {user: tuple(sorted(names)) for user, names in by_user.items()}
        return cls(groups, written_at, path, index)

    def groups_of(self, user: str) -> tuple[str, ...]:
        """The user's hub groups (names, sorted)."""
        return self.by_user.get(user, ())

    def layers_for(self, user: str) -> list[HubGroupLimits]:
        """The limits of the user's groups that have any; LimitsError when one is bad (the
        spawner refuses the user's spawns the same way)."""
        return self.groups.for_groups(self.groups_of(user))

    def resolve(
        self,
        config: LimitsConfig,
        user: str,
        groups: Iterable[str] = (),
        now: datetime | None = None,
    ) -> ResolvedLimits:
        """The user's limits as the spawner resolves them: their hub groups (from here) beside
        the door's own `groups` (Unix groups, or the hub's live list) for the YAML groups, and
        their hub groups' properties between `user_overrides` and the YAML."""
        names = list(dict.fromkeys([*groups, *self.groups_of(user)]))
        return config.resolve(user, names, now, hub_groups=self.layers_for(user))

    def describe(self, now: datetime) -> str:
        minutes = max(0, int((now - self.written_at).total_seconds() // 60))
        return (
            f"hub group properties as of the ds01-ops pass at {self.written_at:%Y-%m-%d %H:%M} "
            f"UTC ({minutes} min ago; {self.path})"
        )


def lenient_resolver(
    config: LimitsConfig, snapshot: GroupSnapshot | None
) -> Callable[[str, str | None], ResolvedLimits]:
    """For what is computed from containers and the event log rather than granted (`ds01hub
    fairshare`, the admin page, GPU and container hold times): `resolve(user, recorded group)`
    gives the user's limits now, with their hub groups from `snapshot` beside the group the
    label or log recorded. A bad property of one of their groups gives the file's (not a
    grant: their spawns and creates are refused meanwhile)."""

    def resolve(user: str, recorded: str | None) -> ResolvedLimits:
        groups = [recorded] if recorded else []
        if snapshot is None:
            return config.resolve(user, groups)
        try:
            return snapshot.resolve(config, user, groups)
        except LimitsError:
            return config.resolve(user, [*groups, *snapshot.groups_of(user)])

    return resolve


# -------------------------------------------------------------------------------- writing


def snapshot_document(groups: GroupLimits, written_at: datetime) -> dict[str, Any]:
    """The JSON the file holds: each group's name, members and `ds01` property as given."""
    entries = []
    for name in sorted(groups.members.keys() | groups.properties.keys()):
        entry: dict[str, Any] = {"name": name, "users": sorted(groups.members.get(name, ()))}
        if name in groups.properties:
            entry[HUB_PROPERTY] = groups.properties[name]
        entries.append(entry)
    return {
        "version": SNAPSHOT_VERSION,
        "written_at": written_at.astimezone(UTC).isoformat(),
        "groups": entries,
    }


def write_snapshot(path: str | os.PathLike, groups: GroupLimits, written_at: datetime) -> None:
    """Replace the file whole: a complete temporary file (mode 0644), fsync, rename, fsync of
    the directory; readers see the old file or the new one, never a part. OSError on failure
    (the old file stays)."""
    target = Path(path)
    data = json.dumps(snapshot_document(groups, written_at), sort_keys=True).encode()
    temporary = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o644)  # whatever the umask: every door reads it
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    directory = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


# -------------------------------------------------------------------------------- reading


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {short_repr(key)}")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME or "\x00" in value:
        raise ValueError(f"{what} must be a non-empty name (found {short_repr(value)})")
    return value


def _exact_keys(
    value: Any, what: str, required: set[str], optional: frozenset[str] = frozenset()
) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be an object (found {short_repr(value)})")
    missing, unknown = required - value.keys(), value.keys() - required - optional
    if missing or unknown:
        raise ValueError(f"{what}: missing {sorted(missing)}, unknown {sorted(unknown)}")
    return value


def _document(value: Any) -> tuple[datetime, GroupLimits]:
    top = _exact_keys(value, "the document", {"version", "written_at", "groups"})
    if top["version"] != SNAPSHOT_VERSION or isinstance(top["version"], bool):
        raise ValueError(f"version must be {SNAPSHOT_VERSION} (found {short_repr(top['version'])})")
    written = top["written_at"]
    try:
        written_at = datetime.fromisoformat(written) if isinstance(written, str) else None
    except ValueError:
        written_at = None
    if written_at is None or written_at.tzinfo is None:
        raise ValueError(
            f"written_at must be an ISO time with a zone (found {short_repr(written)})"
        )
    if not isinstance(top["groups"], list):
        raise ValueError(f"groups must be a list (found {short_repr(top['groups'])})")
    groups = GroupLimits()
    for index, entry in enumerate(top["groups"]):
        where = f"groups[{index}]"
        entry = _exact_keys(entry, where, {"name", "users"}, frozenset({HUB_PROPERTY}))
        name = _name(entry["name"], f"{where}.name")
        if name in groups.members:
            raise ValueError(f"{where}: group {short_repr(name)} is listed twice")
        if not isinstance(entry["users"], list):
            raise ValueError(f"{where}.users must be a list (found {short_repr(entry['users'])})")
        users = [_name(user, f"{where}.users") for user in entry["users"]]
        properties = {HUB_PROPERTY: entry[HUB_PROPERTY]} if HUB_PROPERTY in entry else {}
        groups.add(name, properties, users)
    return written_at.astimezone(UTC), groups


def parse_snapshot(data: bytes, path: str = "<snapshot>") -> GroupSnapshot:
    """The snapshot in `data`, strictly (UTF-8 JSON, no duplicate keys, no NaN, the exact
    shape `snapshot_document` writes); SnapshotError naming what is wrong otherwise. A group
    whose property is bad is not an error here: it is listed in `groups.problems`, and its
    members' requests are refused with its message, as the spawner does."""
    if len(data) > MAX_SNAPSHOT_BYTES:
        raise SnapshotError(path, f"larger than {MAX_SNAPSHOT_BYTES} bytes")
    try:
        text = data.decode("utf-8")
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
        written_at, groups = _document(value)
    except UnicodeDecodeError as error:
        raise SnapshotError(path, f"not UTF-8 ({error.reason} at byte {error.start})") from None
    except RecursionError:
        raise SnapshotError(path, "nested too deeply") from None
    except ValueError as error:  # json.JSONDecodeError too
        raise SnapshotError(path, f"not a snapshot: {error}") from None
    return GroupSnapshot.of(groups, written_at, path)


def _trusted(info: os.stat_result, path: str) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise SnapshotError(path, "not a regular file")
    if info.st_uid not in (0, os.geteuid()):
        raise SnapshotError(path, f"owned by uid {info.st_uid}, not root: not believed")
    if info.st_mode & 0o022:
        raise SnapshotError(path, f"writable by others (mode {info.st_mode & 0o777:o})")


def read_snapshot(path: str | os.PathLike) -> GroupSnapshot | None:
    """The snapshot at `path`, None when there is none; SnapshotError when it cannot be
    believed (a link, not a regular file, owned by another user than root or the reader,
    writable by others, unreadable, too large or not a snapshot)."""
    name = str(path)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as error:  # ELOOP: a symbolic link
        raise SnapshotError(name, f"cannot be opened ({error.strerror})") from None
    try:
        _trusted(os.fstat(fd), name)
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read(MAX_SNAPSHOT_BYTES + 1)
    except OSError as error:
        raise SnapshotError(name, f"cannot be read ({error.strerror})") from None
    finally:
        os.close(fd)
    return parse_snapshot(data, name)


class SnapshotReader:
    """One process's view of the snapshot at `path`: re-read only when the file changed
    (inode, size, times); thread-safe (the proxy resolves limits in threads)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, ...] | None = None
        self._result: GroupSnapshot | SnapshotError | None = None

    def _file_stamp(self) -> tuple[int, ...] | None:
        try:
            info = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as error:
            raise SnapshotError(str(self.path), f"cannot be read ({error.strerror})") from None
        return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)

    def current(self) -> GroupSnapshot | None:
        """The snapshot now; None when there is none; SnapshotError when it is not believed."""
        with self._lock:
            stamp = self._file_stamp()
            if stamp is None:
                self._stamp, self._result = None, None
            elif stamp != self._stamp:
                try:
                    self._result = read_snapshot(self.path)
                except SnapshotError as error:
                    self._result = error
                self._stamp = stamp
            if isinstance(self._result, SnapshotError):
                raise self._result
            return self._result

    def resolve(
        self,
        config: LimitsConfig,
        user: str,
        groups: Iterable[str] = (),
        now: datetime | None = None,
    ) -> ResolvedLimits:
        """The user's effective limits: `config` with the snapshot's groups (the YAML alone
        when there is no snapshot yet). SnapshotError, or LimitsError for a bad property of
        one of the user's groups: the door refuses, as the spawner does."""
        snapshot = self.current()
        if snapshot is None:
            return config.resolve(user, groups, now)
        return snapshot.resolve(config, user, groups, now)

    def reporter(self, config: LimitsConfig) -> Callable[[str, str | None], ResolvedLimits]:
        """`lenient_resolver` with the snapshot now (SnapshotError when not believed)."""
        return lenient_resolver(config, self.current())

    def status(self, now: datetime) -> str:
        """One line for the CLI and the admin page: as of when, none yet, or what is wrong."""
        try:
            snapshot = self.current()
        except SnapshotError as error:
            return f"{error.message}: requests that need limits are refused"
        if snapshot is None:
            return (
                f"no hub group snapshot yet ({self.path}: the ds01-ops service has not run): "
                "the YAML file's limits apply; group properties bind hub spawns only"
            )
        return snapshot.describe(now)
