"""The broker learns who is calling from the kernel (SO_PEERCRED), never from the client.

Real Unix users (useradd), a real broker process on a real unix socket; the requests are made
by processes running under those users' uids. No hub is needed for these decisions: they are
taken before the broker talks to the hub.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess

import pytest
from ds01_cli_harness import (
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
    "from ds01hub.cli.backend import BrokerBackend; from ds01hub.cli.output import CliError\n"
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


def call_as(uid: int, gid: int, home: str, socket_path: str, path: str, act_for: str = ""):
    result = subprocess.run(
        [USER_PYTHON, "-c", CALL, SITE_PACKAGES, socket_path, path, act_for],
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
            "ds01hub.broker",
            f"--Broker.socket_path={broker.socket_path}",
            "--Broker.api_token=unused",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "another ds01 broker is listening" in result.stderr
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
