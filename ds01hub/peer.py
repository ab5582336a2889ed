"""Who is on the other end of a unix socket: the one identity module of the broker and the proxy.

Both listeners learn who is calling from the kernel and nothing else:

- `credentials`: SO_PEERCRED, the (pid, uid, gid) the kernel recorded when the client
  connected; never anything the client sends.
- `identify`: uid -> the Unix account (the password database, which may be LDAP) -> a
  `Caller` with its groups, under two rules that hold for both listeners:
  - **the name rule** (`check_hub_name`): the account's name must already be a valid hub
    user name (JupyterHub's names are lower case, non-empty, without '/', ...) and belong to
    this uid alone. It is never folded: folding `Alice` onto `alice` would let a second
    account (`useradd --badname Alice`, an LDAP entry) act as another user.
  - **the admin rule** (`AdminRule`): root, the named admin users and members of the admin
    groups are admins, but only when the calling process also lives in the host's mount
    namespace: root (or an admin) inside a container that can reach the socket is not an
    admin of the host.
- `listen_unix`: one stale-socket rule for both listeners: a path where a live listener
  answers is refused (never taken over), a dead socket is removed, anything that is not a
  socket is refused.

Reading another process's mount namespace needs root (the broker and the proxy run as root);
where it cannot be read, nobody is an admin (fail closed).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import os
import pwd
import socket
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from ds01hub.errors import Ds01hubError

#: What an admin does about an account the name rule refuses.
RENAME_HINT = (
    "an admin must give the account a lower-case name that no other account has "
    "(usermod -l NEWNAME {name}), or map it in the directory (LDAP); ds01hub never folds names"
)


@dataclass(frozen=True)
class Caller:
    """Who is on the other end of the socket (from SO_PEERCRED and the password database)."""

    uid: int
    gid: int
    user: str
    home: str
    groups: tuple[str, ...] = ()
    admin: bool = False


@dataclass(frozen=True)
class Credentials:
    """The kernel's record of the connecting process (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int


class IdentityError(Ds01hubError):
    """A caller that may not use the socket: `message` says why (for the caller and the admin's
    log), `hint` what to do, `status` is HTTP-like (403 refused, 404 no such account)."""

    status = 403


def credentials(sock: socket.socket) -> Credentials:
    """(pid, uid, gid) of the process that connected to `sock`, from the kernel."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return Credentials(*struct.unpack("3i", raw))


def unix_groups(name: str, gid: int) -> tuple[str, ...]:
    """Names of every group the Unix user belongs to (primary and supplementary)."""
    names = []
    for group_id in os.getgrouplist(name, gid):
        with contextlib.suppress(KeyError):
            names.append(grp.getgrgid(group_id).gr_name)
    return tuple(names)


def same_mount_namespace(pid: int) -> bool:
    """Whether process `pid` sees our file system (our mount namespace). False when it cannot
    be told (the process is gone, pid 0 from another pid namespace, /proc unreadable)."""
    if pid <= 0:
        return False
    try:
        theirs = os.stat(f"/proc/{pid}/ns/mnt")
        ours = os.stat("/proc/self/ns/mnt")
    except OSError:
        return False
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


@dataclass(frozen=True)
class AdminRule:
    """Who may act for others (the broker's `--user`) or see everything (the proxy): root, the
    named users and the members of the named groups -- and only from the host's mount
    namespace (`same_mount_namespace`)."""

    users: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()

    def allows(self, caller: Caller, pid: int) -> bool:
        named = (
            caller.uid == 0
            or caller.user in self.users
            or bool(self.groups.intersection(caller.groups))
        )
        return named and same_mount_namespace(pid)

    def describe(self) -> str:
        """`root, dave, members of ds01-admin` (for the listeners' start-up log)."""
        members = [f"members of {g}" for g in sorted(self.groups)]
        return ", ".join(["root", *sorted(self.users), *members])


def hub_name_problem(name: str) -> str | None:
    """Why `name` is not a valid hub user name as it stands, or None. JupyterHub's rules
    (`Authenticator.validate_username`: not empty, no '/', not only dots, no surrounding
    spaces) plus its default normalisation (lower case) and no white space or control
    characters anywhere, so the name means the same in a URL, a label and a log line."""
    if not name:
        return "it is empty"
    if "/" in name:
        return "it contains '/'"
    if set(name) == {"."}:
        return "it is only dots"
    if any(c.isspace() or not c.isprintable() for c in name):
        return "it contains white space or control characters"
    if name != name.lower():
        return "hub user names are lower case"
    return None


def check_hub_name(name: str, uid: int, lookup_name: Callable[[str], Any] = pwd.getpwnam) -> str:
    """`name` (the account of `uid`) as the hub user name, unchanged -- or IdentityError.

    Refused: a name that is not already a valid hub name (`hub_name_problem`; the message
    names the account it would have been folded onto), and a name that the name service
    gives to another uid (two password databases, one name: the hub would take them for
    one user)."""
    problem = hub_name_problem(name)
    if problem is not None:
        message = (
            f"Unix account {name!r} (uid {uid}) cannot use ds01hub: its name is not a valid "
            f"hub user name ({problem})"
        )
        folded = name.lower()
        if folded != name:
            message += f"; it is not folded onto {folded!r}"
            other = _uid_of(folded, lookup_name)
            if other is not None and other != uid:
                message += f", the account of uid {other}"
        raise IdentityError(message, hint=RENAME_HINT.format(name=name))
    owner = _uid_of(name, lookup_name)
    if owner is not None and owner != uid:
        raise IdentityError(
            f"Unix account {name!r} (uid {uid}) cannot use ds01hub: the name {name!r} also "
            f"belongs to uid {owner}",
            hint=RENAME_HINT.format(name=name),
        )
    return name


def _uid_of(name: str, lookup_name: Callable[[str], Any]) -> int | None:
    try:
        return int(lookup_name(name).pw_uid)
    except KeyError:
        return None


def identify(
    creds: Credentials,
    admins: AdminRule,
    lookup_uid: Callable[[int], Any] = pwd.getpwuid,
    lookup_name: Callable[[str], Any] = pwd.getpwnam,
    groups_of: Callable[[str, int], tuple[str, ...]] = unix_groups,
) -> Caller:
    """The caller behind kernel credentials (deny by default): an unknown uid and an account
    that breaks the name rule raise IdentityError; `admin` follows the admin rule.

    Blocking (the password database may be LDAP): call it off the event loop."""
    try:
        account = lookup_uid(creds.uid)
    except KeyError:
        raise IdentityError(f"uid {creds.uid} has no account on this host") from None
    name = check_hub_name(account.pw_name, creds.uid, lookup_name)
    caller = Caller(
        creds.uid, account.pw_gid, name, account.pw_dir, groups_of(name, account.pw_gid)
    )
    return replace(caller, admin=admins.allows(caller, creds.pid))


def account_named(name: str, lookup_name: Callable[[str], Any] = pwd.getpwnam) -> str:
    """The Unix user an admin names (`--user NAME`), by the same name rule, unchanged: never
    folded, and only an account whose own name is exactly `name` (a name service may match
    names case-insensitively)."""
    problem = hub_name_problem(name)
    if problem is not None:
        raise IdentityError(
            f"{name!r} is not a valid hub user name ({problem})",
            hint="name the user exactly as the hub knows them (lower case)",
            status=400,
        )
    try:
        account = lookup_name(name)
    except KeyError:
        raise IdentityError(f"no Unix user named {name!r} on this host", status=404) from None
    if account.pw_name != name:
        raise IdentityError(
            f"no Unix user named exactly {name!r} on this host "
            f"(the name service answered with {account.pw_name!r})",
            status=404,
        )
    return check_hub_name(name, int(account.pw_uid), lookup_name)


# --------------------------------------------------------------------------------------------
# The listening socket


class SocketPathError(Ds01hubError):
    """The listening socket's path cannot be taken: `message` says why and what to do."""


@dataclass
class UnixListener:
    """A bound, listening unix socket and the file it made, so that only ours is removed."""

    path: str
    sock: socket.socket
    stamp: tuple[int, int, int]  # (device, inode, ctime in ns): inode numbers are reused

    def remove_path(self) -> None:
        """Remove the socket file, unless another listener has taken the path since."""
        with contextlib.suppress(FileNotFoundError):
            if file_stamp(self.path) == self.stamp:
                os.unlink(self.path)


def file_stamp(path: str) -> tuple[int, int, int]:
    info = os.lstat(path)
    return info.st_dev, info.st_ino, info.st_ctime_ns


def listen_unix(path: str, mode: int, backlog: int = 128) -> UnixListener:
    """Listen on the unix socket `path` (mode `mode`; its directory made 0755 if missing), by
    the one stale-socket rule: refuse when a live listener answers there (SocketPathError),
    remove a dead socket, refuse anything else that is in the way. The check, the removal and
    the bind happen under a lock on the directory, so two listeners starting at once cannot
    both take the path."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o755, exist_ok=True)
    with _locked(directory):
        _clear_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, mode)
            sock.listen(backlog)
            stamp = file_stamp(path)
        except BaseException:
            sock.close()
            raise
    sock.setblocking(False)
    return UnixListener(path, sock, stamp)


@contextlib.contextmanager
def _locked(directory: str) -> Iterator[None]:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _clear_stale(path: str) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise SocketPathError(
            f"{path} exists and is not a socket: not replacing it "
            "(remove it, or choose another socket path)"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # a socket nobody listens on: left behind by a crash
        return
    except OSError as error:
        if error.errno == errno.ENOENT:  # removed meanwhile
            return
        raise SocketPathError(
            f"cannot tell whether another process listens on {path} "
            f"({error.strerror or error}): not taking it over"
        ) from None
    finally:
        probe.close()
    raise SocketPathError(
        f"another process is listening on {path}: not taking it over "
        "(stop it first, or give this one its own socket path)"
    )
