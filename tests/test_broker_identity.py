"""The broker learns who is calling from the kernel (SO_PEERCRED), never from the client.

Real Unix users (useradd), a real broker process on a real unix socket; the requests are made
by processes running under those users' uids. No hub is needed for these decisions: they are
taken before the broker talks to the hub.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile

import pytest
from harness.cli import (
    SITE_PACKAGES,
    USER_PYTHON,
    BrokerProcess,
    run_as,
    unix_user,
    user_env,
)

pytestmark = [pytest.mark.root]

CALL = (
    "import json, site, sys; site.addsitedir(sys.argv[1]); "
    "from ds01hub.cli.user.backends import BrokerBackend; from ds01hub.cli.output import CliError\n"
    "try:\n"
    "    broker = BrokerBackend(sys.argv[2], sys.argv[4] or None)\n"
    "    print(json.dumps(broker.call('GET', sys.argv[3])))\n"
    "except CliError as e:\n"
    "    print(json.dumps({'error': e.message, 'code': e.code})); sys.exit(e.code)\n"
)


@pytest.fixture(scope="module")
def admin_group():
    name = f"d01tadm{secrets.token_hex(2)}"
    subprocess.run(["groupadd", name], check=True)
    yield name
    subprocess.run(["groupdel", name], check=False)


@pytest.fixture(scope="module")
def users(admin_group):
    with unix_user() as alice, unix_user() as bob, unix_user() as carol:
        subprocess.run(["usermod", "-aG", admin_group, carol.name], check=True)
        yield alice, bob, carol


@pytest.fixture(scope="module")
def broker(admin_group):
    # the hub URL points nowhere: every request here must be decided before the hub is asked
    process = BrokerProcess(
        "http://127.0.0.1:9/hub/api", "unused", f"--Broker.admin_groups={admin_group}"
    )
    yield process
    process.stop()


def call_as(
    uid: int,
    gid: int,
    home: str,
    socket_path: str,
    path: str,
    act_for: str = "",
    prefix: tuple[str, ...] = (),
):
    """GET `path` from the broker as `uid` (under `prefix`, e.g. `unshare -m`)."""
    result = subprocess.run(
        [*prefix, USER_PYTHON, "-c", CALL, SITE_PACKAGES, socket_path, path, act_for],
        user=uid,
        group=gid,
        extra_groups=[],
        env=user_env(home, socket_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.returncode, json.loads(result.stdout or "null"), result.stderr


def test_socket_is_world_connectable(broker):
    assert oct(os.stat(broker.socket_path).st_mode & 0o777) == "0o666"


def test_each_user_is_identified_by_their_uid(broker, users):
    alice, bob, _ = users
    for person in (alice, bob):
        code, reply, err = call_as(
            person.uid, person.gid, person.home, broker.socket_path, "/whoami"
        )
        assert code == 0, err
        assert reply == {"user": person.name, "uid": person.uid, "admin": False}


def test_a_user_cannot_act_for_another(broker, users):
    alice, bob, _ = users
    code, reply, _ = call_as(
        alice.uid, alice.gid, alice.home, broker.socket_path, "/containers", act_for=bob.name
    )
    assert code == 1 and "only admins can act for another user" in reply["error"]
    # through the real command as well
    result = run_as(alice, broker.socket_path, "container-list", "--user", bob.name)
    assert result.returncode == 1
    assert "only admins can act for another user" in result.stderr
    result = run_as(alice, broker.socket_path, "container-stop", "x", "-y", "--user", bob.name)
    assert result.returncode == 1 and "only admins" in result.stderr


def test_admin_group_member_may_act_for_another(broker, users):
    _, bob, carol = users
    code, reply, err = call_as(
        carol.uid, carol.gid, carol.home, broker.socket_path, "/whoami", act_for=bob.name
    )
    assert code == 0, err
    assert reply == {"user": bob.name, "uid": carol.uid, "admin": True}


def test_uid_without_an_account_is_refused(broker):
    code, reply, _ = call_as(54321, 54321, "/tmp", broker.socket_path, "/whoami")
    assert code == 1 and "uid 54321 has no account" in reply["error"]


def test_root_must_name_the_user(broker, users):
    alice, _, _ = users
    code, reply, _ = call_as(0, 0, "/root", broker.socket_path, "/whoami")
    assert code == 2 and "root acts for users" in reply["error"]
    code, reply, _ = call_as(0, 0, "/root", broker.socket_path, "/whoami", act_for=alice.name)
    assert code == 0 and reply["user"] == alice.name and reply["admin"] is True


def test_unreachable_hub_is_a_clear_failure(broker, users):
    alice, _, _ = users
    result = run_as(alice, broker.socket_path, "container-list")
    assert result.returncode == 1
    assert "cannot reach the hub" in result.stderr


def test_a_second_broker_does_not_take_over_a_live_socket(broker):
    import subprocess as sp
    import sys

    result = sp.run(
        [
            sys.executable,
            "-m",
            "ds01hub.services.broker",
            f"--Broker.socket_path={broker.socket_path}",
            "--Broker.api_token=unused",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "another process is listening" in result.stderr
    assert "not taking it over" in result.stderr
    code, reply, _ = call_as(0, 0, "/root", broker.socket_path, "/whoami", act_for="root")
    assert code == 2  # the first broker still answers (root may not act as root)


def test_a_stopped_broker_removes_its_socket():
    process = BrokerProcess("http://127.0.0.1:9/hub/api", "unused")
    path = process.socket_path
    try:
        assert os.path.exists(path)
        process.process.terminate()
        assert process.process.wait(10) == 0
        assert not os.path.exists(path)
    finally:
        process.stop()


def test_root_in_another_mount_namespace_is_not_an_admin(broker, users):
    """Root in a container that can reach the socket is not root on the host: it may not act
    for anyone (the admin rule of ds01hub.peer, the same as the proxy's)."""
    alice, _, _ = users
    code, reply, _ = call_as(
        0, 0, "/root", broker.socket_path, "/whoami", alice.name, prefix=("unshare", "-m")
    )
    assert code == 1 and "only admins can act for another user" in reply["error"]
    code, reply, _ = call_as(0, 0, "/root", broker.socket_path, "/whoami", alice.name)
    assert code == 0 and reply == {"user": alice.name, "uid": 0, "admin": True}


def test_a_case_variant_of_a_user_is_refused_not_folded(broker, users):
    """`useradd --badname` makes an account whose name differs from alice's only in case: the
    broker refuses it with a message for the admin, and it can never act as alice."""
    alice, _, carol = users
    with unix_user(name=alice.name.capitalize()) as twin:
        assert twin.name != alice.name and twin.name.lower() == alice.name
        code, reply, _ = call_as(twin.uid, twin.gid, twin.home, broker.socket_path, "/whoami")
        assert code == 1 and "user" not in reply
        message = reply["error"]
        assert f"Unix account {twin.name!r} (uid {twin.uid}) cannot use ds01hub" in message
        assert f"not folded onto {alice.name!r}, the account of uid {alice.uid}" in message
        result = run_as(twin, broker.socket_path, "container-list")
        assert result.returncode == 1 and "not a valid hub user name" in result.stderr
        assert f"usermod -l NEWNAME {twin.name}" in result.stderr  # what the admin does
        # an admin naming the twin is not folded onto alice either
        code, reply, _ = call_as(
            carol.uid, carol.gid, carol.home, broker.socket_path, "/whoami", twin.name
        )
        assert code == 2 and "not a valid hub user name" in reply["error"]
        # alice herself is unaffected
        code, reply, _ = call_as(alice.uid, alice.gid, alice.home, broker.socket_path, "/whoami")
        assert code == 0 and reply["user"] == alice.name
    assert f"refused uid {twin.uid}" in broker.log()


def test_an_unreachable_docker_engine_is_named(users):
    """The broker's Docker socket answers nothing (a dead socket; the shared engine is left
    alone): the broker starts anyway, and every command says which service is unreachable --
    never "internal error"."""
    import socket

    alice, _, _ = users
    directory = tempfile.mkdtemp(prefix="ds01t-dead-")
    dead_path = os.path.join(directory, "docker.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(dead_path)
    dead.close()
    process = BrokerProcess(
        "http://127.0.0.1:9/hub/api", "unused", f"--Broker.docker_socket={dead_path}"
    )
    try:
        unreachable = f"Docker engine unreachable at unix://{dead_path} (Connection refused)"
        for command, *args in (
            ("container-stats",),
            ("image-list",),
            ("container-remove", "work", "-y"),
        ):
            result = run_as(alice, process.socket_path, command, *args)
            assert result.returncode == 1, (command, result.stderr)
            assert unreachable in result.stderr and "dockerd" in result.stderr, result.stderr
        # these ask the hub (also unreachable here) and Docker at once: either is named
        for command, *args in (
            ("container-list",),
            ("container-create", "work"),
            ("container-run", "work", "--", "true"),
        ):
            result = run_as(alice, process.socket_path, command, *args)
            assert result.returncode == 1, (command, result.stderr)
            assert unreachable in result.stderr or "cannot reach the hub" in result.stderr
            assert "internal error" not in result.stderr
        log = process.log()
        assert "starting anyway" in log and "Traceback" not in log
    finally:
        process.stop()
        shutil.rmtree(directory, ignore_errors=True)
