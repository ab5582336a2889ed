"""Remote use: the users' commands with a JupyterHub API token talk to the hub's REST API
directly (ds01hub.hub.client). A real hub spawns real single-user servers (local processes
here; the spawner does not matter to this path), the commands run as the installed console
scripts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from harness import Hub

pytestmark = [pytest.mark.e2e]

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    directory = tmp_path_factory.mktemp("remote-hub")
    extra = f"""
import sys
c.SimpleLocalProcessSpawner.home_dir_template = "{directory}/homes/{{username}}"
c.Spawner.cmd = [sys.executable, "-m", "jupyterhub.singleuser"]
c.Spawner.args = ["--allow-root"]  # this test machine runs everything as root
c.Spawner.http_timeout = 60
"""
    hub = Hub(directory=directory, hub_ip="127.0.0.1", spawner="simple", extra_config=extra).start()
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def people(hub):
    tokens = {}
    for role in ("alice", "bob"):
        name = f"rem{role[0]}{uuid.uuid4().hex[:6]}"
        hub.create_user(name)
        tokens[role] = (name, hub.token_for(name))
    yield tokens
    for name, _ in tokens.values():
        hub.api("DELETE", f"/users/{name}")


def cli(hub, token: str, command: str, *args: str) -> subprocess.CompletedProcess:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": "/nonexistent",
        "DS01HUB_HUB_URL": hub.url,
        "DS01HUB_TOKEN": token,
    }
    return subprocess.run(
        [str(BIN / command), *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_create_list_stop_start_remove_through_the_hub(hub, people):
    name, token = people["alice"]
    result = cli(hub, token, "container-create", "proj")
    assert result.returncode == 0, result.stderr + hub.log()
    assert "proj created and started" in result.stdout
    rows = json.loads(cli(hub, token, "container-list", "--json").stdout)
    assert [(r["project"], r["state"]) for r in rows] == [("proj", "running")]
    assert rows[0]["uptime_s"] is not None

    result = cli(hub, token, "container-create", "proj")
    assert result.returncode == 1 and "already have a container named 'proj'" in result.stderr
    result = cli(hub, token, "container-start", "nothing")
    assert result.returncode == 1 and "no container named 'nothing'" in result.stderr

    result = cli(hub, token, "container-stop", "proj", "-y")
    assert result.returncode == 0, result.stderr
    assert cli(hub, token, "container-list", "--json").stdout.strip() == "[]"
    rows = json.loads(cli(hub, token, "container-list", "--all", "--json").stdout)
    assert [(r["project"], r["state"]) for r in rows] == [("proj", "stopped")]

    result = cli(hub, token, "container", "start", "proj")
    assert result.returncode == 0, result.stderr
    result = cli(hub, token, "container-remove", "proj", "-y")
    assert result.returncode == 0, result.stderr
    rows = json.loads(cli(hub, token, "container-list", "--all", "--json").stdout)
    assert rows == []


def test_a_token_only_reaches_its_own_user(hub, people):
    alice, _ = people["alice"]
    _, bob_token = people["bob"]
    result = cli(hub, bob_token, "container-list", "--user", alice)
    assert result.returncode == 1 and "the hub said" in result.stderr
    result = cli(hub, bob_token, "container-stop", "proj", "-y", "--user", alice)
    assert result.returncode == 1


def test_host_only_commands_say_so(hub, people):
    _, token = people["alice"]
    for command in (
        ["container-stats"],
        ["image-list"],
        ["image-create", "x"],
        ["container-run", "proj", "--", "true"],
    ):
        result = cli(hub, token, *command)
        assert result.returncode == 1 and "needs the ds01 broker on the host" in result.stderr


def test_a_bad_token_is_a_clear_error(hub):
    result = cli(hub, "not-a-token", "container-list")
    assert result.returncode == 1 and "the hub said" in result.stderr
