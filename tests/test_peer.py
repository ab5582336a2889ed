"""ds01hub.peer, the one identity module of the broker and the proxy: kernel credentials, the
name rule, the admin rule (with the mount namespace) and the stale-socket rule.

The unmarked tests use real sockets and the real /proc; the account databases are given as
tables where a test needs accounts this machine does not have. The `root` tests run a real
process in another mount namespace (`unshare -m`) and real Unix accounts.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ds01hub import peer

# ---- kernel credentials ------------------------------------------------------------------------


def test_credentials_come_from_the_kernel():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        assert peer.credentials(ours) == peer.Credentials(os.getpid(), os.getuid(), os.getgid())


# ---- the name rule -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["alice", "h.baker@lab.example", "bob_2", "x-y", "1abc", "é"])
def test_valid_hub_names(name):
    assert peer.hub_name_problem(name) is None


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("Alice", "lower case"),
        ("ALICE", "lower case"),
        ("aLice", "lower case"),
        ("É", "lower case"),
        ("", "empty"),
        ("a/b", "'/'"),
        ("..", "only dots"),
        ("al ice", "white space"),
        (" alice", "white space"),
        ("alice\n", "white space"),
        ("al\x00ice", "control"),
    ],
)
def test_names_that_are_not_hub_names(name, problem):
    assert problem in peer.hub_name_problem(name)


def accounts(table: dict[str, int]):
    """A password database as a table name -> uid (getpwnam's shape)."""

    def lookup_name(name):
        if name not in table:
            raise KeyError(name)
        return SimpleNamespace(pw_name=name, pw_uid=table[name])

    return lookup_name


@pytest.mark.parametrize("variant", ["Alice", "ALICE", "aLiCe"])
def test_a_case_variant_is_refused_never_folded(variant):
    lookup = accounts({"alice": 1001, variant: 1002})
    assert peer.check_hub_name("alice", 1001, lookup) == "alice"
    with pytest.raises(peer.IdentityError) as info:
        peer.check_hub_name(variant, 1002, lookup)
    message = info.value.message
    assert f"Unix account {variant!r} (uid 1002)" in message
    assert "not a valid hub user name" in message
    assert "not folded onto 'alice', the account of uid 1001" in message
    assert f"usermod -l NEWNAME {variant}" in info.value.hint and info.value.status == 403


def test_a_case_variant_without_a_twin_is_refused_too():
    with pytest.raises(peer.IdentityError, match="not folded onto 'bob'$"):
        peer.check_hub_name("Bob", 1002, accounts({"Bob": 1002}))


def test_a_name_that_belongs_to_another_uid_is_refused():
    # two password databases (files and LDAP) with one name for two uids
    with pytest.raises(peer.IdentityError, match="'carol' also belongs to uid 1003"):
        peer.check_hub_name("carol", 2003, accounts({"carol": 1003}))


def test_an_admin_names_users_exactly():
    lookup = accounts({"alice": 1001, "Alice": 1002})
    assert peer.account_named("alice", lookup) == "alice"
    with pytest.raises(peer.IdentityError, match="not a valid hub user name") as info:
        peer.account_named("Alice", lookup)
    assert info.value.status == 400
    with pytest.raises(peer.IdentityError, match="no Unix user named 'mallory'") as info:
        peer.account_named("mallory", lookup)
    assert info.value.status == 404

    def case_insensitive(name):  # a name service that matches names case-insensitively
        return SimpleNamespace(pw_name="alice", pw_uid=1001)

    with pytest.raises(peer.IdentityError, match="answered with 'alice'"):
        peer.account_named("alice2", case_insensitive)


NAMES = st.text(st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ["alice", "Alice", "ALICE", "bob", "", ".", "..", "a/b", "h.baker@lab.example"]
)


@given(
    table=st.dictionaries(NAMES, st.integers(1000, 1005), max_size=6),
    name=NAMES,
    uid=st.integers(1000, 1005),
)
def test_the_name_rule_never_folds_and_never_shares(table, name, uid):
    """Whatever the password database holds (`table`: getpwnam's answers): a name is served
    unchanged -- a valid hub name that belongs to this uid -- or refused with a message; and
    no two accounts are ever served names that the hub would take for one."""
    lookup = accounts(table)
    try:
        served = peer.check_hub_name(name, uid, lookup)
    except peer.IdentityError as refused:
        assert refused.message and refused.hint and refused.status == 403
    else:
        assert served == name == name.lower() and peer.hub_name_problem(name) is None
        assert table.get(name, uid) == uid  # never a name another uid answers to
    served = {}
    for account, owner in table.items():
        try:
            served[account] = peer.check_hub_name(account, owner, lookup)
        except peer.IdentityError:
            continue
    assert all(served[account] == account for account in served)
    folded = [account.lower() for account in served]
    assert len(set(folded)) == len(folded)


# ---- the admin rule ------------------------------------------------------------------------------


def caller(uid, name, groups=()):
    return peer.Caller(uid, uid, name, f"/home/{name}", (name, *groups))


def test_admin_rule_names_root_users_and_groups_from_the_host_namespace():
    rule = peer.AdminRule(frozenset({"dave"}), frozenset({"labadmins", "ds01-admin"}))
    here = os.getpid()
    assert rule.allows(caller(0, "root"), here)
    assert rule.allows(caller(5, "dave"), here)
    assert rule.allows(caller(6, "erin", ("labadmins",)), here)
    assert not rule.allows(caller(7, "frank", ("docker",)), here)
    assert rule.describe() == "root, dave, members of ds01-admin, members of labadmins"


def test_admin_rule_fails_closed_when_the_namespace_cannot_be_told():
    rule = peer.AdminRule()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    # pid 0: the kernel's answer for a peer in a pid namespace we cannot see
    for pid in (0, -1, gone.pid):
        assert not rule.allows(caller(0, "root"), pid)


ADMINS = peer.AdminRule(groups=frozenset({"ds01-admin"}))


def identify(uid, pid=None, rule=ADMINS):
    names = {0: "root", 1001: "alice", 1002: "Alice", 1003: "carol"}
    groups = {"carol": ("carol", "ds01-admin")}

    def lookup_uid(u):
        if u not in names:
            raise KeyError(u)
        return SimpleNamespace(pw_name=names[u], pw_gid=u, pw_dir=f"/home/{names[u]}")

    by_name = accounts({n: u for u, n in names.items()})
    creds = peer.Credentials(os.getpid() if pid is None else pid, uid, uid)
    return peer.identify(creds, rule, lookup_uid, by_name, lambda n, g: groups.get(n, (n,)))


def test_identify_applies_both_rules():
    assert identify(1001) == peer.Caller(1001, 1001, "alice", "/home/alice", ("alice",))
    assert identify(1003).admin and identify(0).admin
    assert not identify(1001).admin
    with pytest.raises(peer.IdentityError, match="uid 4242 has no account"):
        identify(4242)
    with pytest.raises(peer.IdentityError, match="not folded onto 'alice'"):
        identify(1002)


# ---- the stale-socket rule -----------------------------------------------------------------------


@pytest.fixture
def socket_dir():
    # a short path: unix socket paths are limited to 107 bytes
    directory = tempfile.mkdtemp(prefix="ds01t-peer-")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_a_live_socket_is_refused_and_keeps_answering(socket_dir):
    path = os.path.join(socket_dir, "s.sock")
    first = peer.listen_unix(path, 0o666)
    try:
        assert oct(os.stat(path).st_mode & 0o777) == "0o666"
        with pytest.raises(peer.SocketPathError, match="another process is listening"):
            peer.listen_unix(path, 0o666)
        probe = socket.socket(socket.AF_UNIX)
        with probe:
            probe.connect(path)  # still the first listener's
        assert peer.file_stamp(path) == first.stamp
    finally:
        first.sock.close()
        first.remove_path()
    assert not os.path.exists(path)


def test_a_dead_socket_is_replaced(socket_dir):
    path = os.path.join(socket_dir, "s.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)  # bound, never listening, closed: what a crash leaves behind
    dead.close()
    listener = peer.listen_unix(path, 0o600)
    with listener.sock:
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        probe = socket.socket(socket.AF_UNIX)
        with probe:
            probe.connect(path)


@pytest.mark.parametrize("kind", ["file", "directory", "symlink"])
def test_what_is_not_a_socket_is_refused_and_left_alone(socket_dir, kind):
    path = os.path.join(socket_dir, "s.sock")
    if kind == "file":
        with open(path, "w") as f:
            f.write("precious")
    elif kind == "directory":
        os.mkdir(path)
    else:
        os.symlink("/etc/passwd", path)
    with pytest.raises(peer.SocketPathError, match="exists and is not a socket"):
        peer.listen_unix(path, 0o666)
    assert os.path.lexists(path)


def test_only_our_own_socket_is_removed(socket_dir):
    path = os.path.join(socket_dir, "s.sock")
    first = peer.listen_unix(path, 0o666)
    first.sock.close()  # it died; a second listener takes the path
    second = peer.listen_unix(path, 0o666)
    with second.sock:
        first.remove_path()  # the first one's clean-up must not remove the second's socket
        assert os.path.exists(path) and peer.file_stamp(path) == second.stamp
        second.remove_path()
    assert not os.path.exists(path)


def test_the_directory_is_made(socket_dir):
    path = os.path.join(socket_dir, "run", "s.sock")
    listener = peer.listen_unix(path, 0o666)
    with listener.sock:
        assert oct(os.stat(os.path.dirname(path)).st_mode & 0o777) == "0o755"


# ---- a process in another mount namespace (root) -------------------------------------------------

CONNECT = "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.recv(1)"


def credentials_of(
    path: str, listener: peer.UnixListener, *prefix: str
) -> tuple[peer.Credentials, bool]:
    """Run a client (under `prefix`, e.g. `unshare -m`, which execs it: same pid) that connects
    to `path`; the kernel's record of it as the listener sees it, and whether it is admin."""
    client = subprocess.Popen([*prefix, sys.executable, "-c", CONNECT, path])
    try:
        listener.sock.setblocking(True)
        listener.sock.settimeout(60)
        connection, _ = listener.sock.accept()
        with connection:
            creds = peer.credentials(connection)
            assert creds.pid == client.pid
            admin = peer.identify(creds, peer.AdminRule()).admin
            connection.sendall(b"x")
        return creds, admin
    finally:
        client.wait(30)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (unshare -m)")
def test_root_in_another_mount_namespace_is_not_an_admin(socket_dir):
    path = os.path.join(socket_dir, "s.sock")
    listener = peer.listen_unix(path, 0o666)
    with listener.sock:
        creds, admin = credentials_of(path, listener)
        assert creds.uid == 0 and admin is True  # root on the host
        creds, admin = credentials_of(path, listener, "unshare", "-m")
        assert creds.uid == 0 and admin is False  # root elsewhere: same uid, not an admin


# ---- both listeners follow the socket rule -------------------------------------------------------

PROXY = [sys.executable, "-c", "import sys; from ds01hub.cli.admin import main; sys.exit(main())"]


def test_the_proxy_refuses_a_live_socket_and_replaces_a_dead_one(socket_dir):
    path = os.path.join(socket_dir, "docker.sock")
    upstream = os.path.join(socket_dir, "upstream.sock")
    open(upstream, "w").close()  # the proxy only checks that its upstream exists at start
    live = peer.listen_unix(path, 0o666)
    with live.sock:
        state = os.path.join(socket_dir, "state")  # its create locks, label key, deployment
        command = [*PROXY, "proxy", "--listen", path, "--upstream", upstream]
        command += ["--state-dir", state, "--hub-state-dir", state]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert result.returncode == 1
        assert "another process is listening" in result.stderr
        assert peer.file_stamp(path) == live.stamp  # untouched
    # `live` is closed now: its socket file is a dead one, which the proxy replaces
    proxy = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not answers(path):
            assert proxy.poll() is None, proxy.stderr.read()
            assert time.monotonic() < deadline, "the proxy did not take the dead socket's path"
            time.sleep(0.1)
        assert peer.file_stamp(path) != live.stamp
    finally:
        proxy.terminate()
        proxy.wait(30)
    assert not os.path.exists(path)  # it removed its own socket at the end


def answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX)
    with probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True
