"""Limits from JupyterHub group properties on a real hub running DS01Spawner: an edit over the
hub's REST API (what the admin panel sends) applies on the next spawn; a bad one is refused
with the limits file's message, never half-applied; fixed, it applies again."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness import unique_name
from harness.ds01_spawner import Ds01Hub

from ds01hub.hub.client import HubClient
from ds01hub.hub.group_limits import GroupLimits, fetch_group_limits

pytestmark = [pytest.mark.e2e, pytest.mark.docker]
DS01HUB = str(Path(sys.executable).with_name("ds01hub"))


async def read_group_limits(api_url: str, token: str) -> GroupLimits:
    return await fetch_group_limits(HubClient(api_url, token))


def set_properties(hub, group: str, properties: dict) -> None:
    response = hub.api("PUT", f"/groups/{group}/properties", json=properties)
    assert response.status_code == 200, response.text


def test_group_properties_over_rest_apply_on_the_next_spawn_and_a_bad_one_is_refused(
    hub_factory, tmp_path
):
    ds01 = Ds01Hub(hub_factory, tmp_path)
    hub = ds01.hub
    user = unique_name("grp")
    try:
        hub.create_user(user, groups=["students"])  # the YAML: memory 512m, 1 CPU
        set_properties(hub, "students", {"ds01": {"memory": "640m", "max_cpus": 0.5}})
        hub.start_server(user)
        hub.wait_ready(user)
        host = hub.container_of(user).attrs["HostConfig"]
        assert (host["Memory"], host["NanoCpus"]) == (640 << 20, 500_000_000)
        hub.stop_server(user)

        # a bad edit (and a good value beside it): refused whole, with the YAML's message
        set_properties(hub, "students", {"ds01": {"memory": "1k", "max_cpus": 0.25}})
        response = hub.start_server(user, check=False)
        assert response.status_code == 409, response.text
        message = response.json()["message"]
        assert "1 problem in JupyterHub group 'students' properties" in message
        assert (
            "JupyterHub group 'students' properties: ds01.memory: invalid memory: below the "
            "minimum of 6m (a plain number is bytes: add the unit, e.g. 8g) (found '1k')"
        ) not in message  # '1k' is text, not a plain number: the YAML says the same
        assert (
            "JupyterHub group 'students' properties: ds01.memory: invalid memory: below the "
            "minimum of 6m (found '1k'). Fix: use a size from 6m to 64t such as 8g, or null"
        ) in message
        cpus = {c.attrs["HostConfig"]["NanoCpus"] for c in hub.containers()}
        assert cpus == {500_000_000}  # nothing of the bad edit was applied
        # what the ds01-ops admin page lists, read over the same REST API
        found = asyncio.run(read_group_limits(f"{hub.url}/hub/api", hub.admin_token))
        [problem] = found.problems["students"]
        assert problem.key_path == "ds01.memory" and "students" not in found.layers

        # fixed: the next spawn applies it
        set_properties(hub, "students", {"ds01": {"memory": "768m"}})
        hub.start_server(user)
        hub.wait_ready(user)
        host = hub.container_of(user).attrs["HostConfig"]
        assert (host["Memory"], host["NanoCpus"]) == (768 << 20, 1_000_000_000)

        # the admin's command shows where each value came from
        command = [DS01HUB, "limits", user, "--limits", ds01.limits_path, "--hub"]
        environment = {**os.environ, "JUPYTERHUB_API_TOKEN": hub.admin_token}
        shown = subprocess.run(
            [*command, f"{hub.url}/hub/api"], capture_output=True, text=True, env=environment
        )
        assert shown.returncode == 0, shown.stderr
        rows = {line.split(":")[0]: line for line in shown.stdout.splitlines()}
        assert rows["Memory"].split()[1:] == ["768m", "(hub_groups.students)"]
        assert rows["Max CPUs"].split()[2:] == ["1", "(defaults)"]
    finally:
        hub.stop()
