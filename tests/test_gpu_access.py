"""GPU access grants with a real Unix user and a real group: `ds01hub grant-gpu-access` adds
the user to the group with a record and an expiry; the sweep ends expired grants, takes the
user out of the group and stops their host processes that still carry it. (The device nodes'
owner and mode: tests/test_install.py; on a GPU host the lead checks the real /dev/nvidia*.)"""

from __future__ import annotations

import grp
import json
import os
import secrets
import subprocess
import sys
import time

import pytest
from harness.cli import unix_user

from ds01hub.gpu import access as gpu_access

pytestmark = pytest.mark.root

if os.geteuid() != 0:  # pragma: no cover
    pytest.skip("needs root to create users and groups", allow_module_level=True)


@pytest.fixture
def group():
    name = f"d01gpu{secrets.token_hex(3)}"
    subprocess.run(["groupadd", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["groupdel", name], check=False)


def members(group: str) -> list[str]:
    return grp.getgrnam(group).gr_mem


def cli(*args: str, state_dir, group: str) -> subprocess.CompletedProcess:
    env = os.environ | {"DS01HUB_GPU_GROUP": group}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "ds01hub.cli.admin",
            "grant-gpu-access",
            *args,
            "--state-dir",
            str(state_dir),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_a_grant_adds_the_user_until_the_sweep_ends_it(tmp_path, group):
    store = gpu_access.GrantStore(tmp_path, group=group)
    with unix_user() as user:
        grant = store.grant(user.name, 3600, "admin", "thesis deadline", now=1000.0)
        assert grant.expires_at == 4600.0 and user.name in members(group)
        assert [g.user for g in store.list()] == [user.name]
        assert store.sweep(now=4599.0) == []  # not yet
        assert user.name in members(group)
        ended = store.sweep(now=4600.0)
        assert [e["user"] for e in ended] == [user.name]
        assert user.name not in members(group) and store.list() == []
        record = json.loads((tmp_path / gpu_access.GRANTS_FILE).read_text())
        assert record == {"grants": []}


def test_ending_a_grant_stops_the_users_processes_that_still_carry_the_group(tmp_path, group):
    """A process started during the grant keeps its groups until it exits: the sweep stops
    it (and leaves the user's other processes alone)."""
    store = gpu_access.GrantStore(tmp_path, group=group)
    gid = grp.getgrnam(group).gr_gid
    with unix_user() as user:
        store.grant(user.name, 60, "admin", "", now=time.time())
        carrying = subprocess.Popen(
            ["sleep", "300"], user=user.uid, group=user.gid, extra_groups=[gid]
        )
        plain = subprocess.Popen(["sleep", "300"], user=user.uid, group=user.gid, extra_groups=[])
        try:
            found = gpu_access.processes_with_group(user.uid, gid)
            assert carrying.pid in found and plain.pid not in found
            ended = store.revoke(user.name)
            assert carrying.pid in ended["stopped_processes"]
            assert carrying.wait(30) == -15  # SIGTERM
            assert plain.poll() is None
        finally:
            for process in (carrying, plain):
                process.kill()
                process.wait()


def test_the_command_grants_lists_refuses_and_revokes(tmp_path, group):
    with unix_user() as user, unix_user() as member:
        subprocess.run(["gpasswd", "-a", member.name, group], check=True, capture_output=True)
        result = cli(
            user.name, "--for", "2h", "--reason", "deadline", state_dir=tmp_path, group=group
        )
        assert result.returncode == 0, result.stderr
        assert f"{user.name} may use the GPUs directly until" in result.stdout
        listing = json.loads(cli("--list", "--json", state_dir=tmp_path, group=group).stdout)
        [entry] = listing["grants"]
        assert entry["user"] == user.name and entry["reason"] == "deadline"
        assert entry["remaining"].startswith(("2h", "1h59m"))
        # named errors: no duration, too long, a permanent member, an unknown account
        assert "--for 24h" in cli(user.name, state_dir=tmp_path, group=group).stderr
        assert (
            "at most 30d" in cli(user.name, "--for", "90d", state_dir=tmp_path, group=group).stderr
        )
        refused = cli(member.name, "--for", "1h", state_dir=tmp_path, group=group)
        assert refused.returncode == 1 and "permanent member" in refused.stderr
        assert (
            "no Unix account"
            in cli("nobody-here-x", "--for", "1h", state_dir=tmp_path, group=group).stderr
        )
        revoked = cli(user.name, "--revoke", state_dir=tmp_path, group=group)
        assert revoked.returncode == 0 and f"revoked: GPU access of {user.name}" in revoked.stdout
        assert user.name not in members(group) and member.name in members(group)
        assert "no GPU access grants" in cli("--list", state_dir=tmp_path, group=group).stdout
