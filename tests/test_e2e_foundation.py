"""The foundation end to end: a real hub spawns a real container from the single-user image,
which answers through the proxy with the user's token, and is gone after stop."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from harness import TEST_LABEL, free_port, unique_name, wait_until
from harness.browser import log_in

from ds01hub.host import bootstrap

pytestmark = [pytest.mark.e2e, pytest.mark.docker]


def test_server_starts_answers_through_the_proxy_and_stops(hub, docker_client, singleuser_image):
    user = unique_name("fnd")
    hub.create_user(user, groups=["students"])
    token = hub.token_for(user)

    hub.start_server(user)
    server = hub.wait_ready(user, timeout=180)
    assert server["ready"] is True

    response = hub.user_request(token, "GET", user, "api/status")
    assert response.status_code == 200, response.text
    assert "started" in response.json()

    container = hub.container_of(user)
    assert container.status == "running"
    assert container.attrs["Config"]["Image"] == singleuser_image
    assert container.labels[TEST_LABEL] == "1"

    hub.stop_server(user)
    assert hub.server(user) is None
    container.reload()
    assert container.status in ("exited", "removing")


def test_a_token_of_another_user_is_refused(hub):
    owner, other = unique_name("own"), unique_name("oth")
    for name in (owner, other):
        hub.create_user(name)
    hub.start_server(owner)
    hub.wait_ready(owner)
    try:
        response = hub.user_request(hub.token_for(other), "GET", owner, "api/status")
        assert response.status_code == 403, response.text
        response = hub.user_request(hub.token_for(owner), "GET", owner, "api/status")
        assert response.status_code == 200, response.text
    finally:
        hub.stop_server(owner)


def test_named_servers_are_separate_containers(hub):
    user = unique_name("nam")
    hub.create_user(user)
    token = hub.token_for(user)
    for project in ("alpha", "beta"):
        hub.start_server(user, project)
    for project in ("alpha", "beta"):
        hub.wait_ready(user, project)
        response = hub.user_request(token, "GET", user, "api/status", name=project)
        assert response.status_code == 200, response.text
    hub.delete_server(user, "alpha")
    assert set(hub.user(user)["servers"]) == {"beta"}
    hub.stop_server(user, "beta")


@pytest.mark.docker
def test_the_server_extension_is_loaded_in_the_image(docker_client, singleuser_image):
    output = docker_client.containers.run(
        singleuser_image,
        ["jupyter", "server", "extension", "list"],
        labels={TEST_LABEL: "1", "ds01.test.foundation": "extension-list"},
        remove=True,
        stderr=True,
    ).decode()
    assert "ds01hub.server_extension enabled" in output.replace("\x1b[32m", "").replace(
        "\x1b[0m", ""
    )
    assert "ds01hub.server_extension  OK" in output.replace("\x1b[32m", "").replace("\x1b[0m", "")


def test_the_demo_logs_a_user_in_and_gives_a_running_server(
    docker_client, singleuser_image, tmp_path
):
    """`ds01hub demo start` as `make demo` runs it (on free ports, its own state directory):
    a demo user logs in through the form, gets a server, and `demo stop` removes it."""
    state = tmp_path / "demo"
    state.mkdir()
    labels = {TEST_LABEL: "1", "ds01.test.foundation": "demo"}
    (state / "local_config.py").write_text(
        f"c.DockerSpawner.prefix = {unique_name('ds01demotest')!r}\n"
        f"c.DockerSpawner.extra_create_kwargs = {{'labels': {labels!r}}}\n"
    )
    port = free_port()
    ports = ["--port", str(port), "--hub-port", str(free_port(bootstrap.docker_bridge_ip()))]
    ports += ["--proxy-api-port", str(free_port())]
    demo_command = [str(Path(sys.executable).with_name("ds01hub")), "demo"]
    common = ["--state-dir", str(state), "--json"]
    started = subprocess.run(
        [*demo_command, "start", *common, *ports, "--image", singleuser_image],
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        assert started.returncode == 0, started.stderr
        result = json.loads(started.stdout)
        assert result["gpu_inventory"] == "simulated"  # this machine has no NVIDIA GPU
        assert {user["name"] for user in result["users"]} == {"alice", "bob", "carol", "dave"}
        url = result["url"]

        session = requests.Session()
        session.get(f"{url}/hub/login", timeout=30)
        form = {"username": "alice", "password": "wrong", "_xsrf": session.cookies["_xsrf"]}
        refused = session.post(f"{url}/hub/login", data=form, allow_redirects=False, timeout=30)
        assert refused.status_code == 403
        form["password"] = result["password"]
        login = session.post(f"{url}/hub/login", data=form, allow_redirects=False, timeout=30)
        assert login.status_code == 302, login.text
        # what the browser's spawn page does (with whatever options form the spawner shows):
        # a start request with the user's own session, their defaults as options
        xsrf = {"X-XSRFToken": session.cookies["_xsrf"]}
        start = session.post(f"{url}/hub/api/users/alice/server", json={}, headers=xsrf)
        assert start.status_code in (201, 202), start.text

        def ready() -> bool:
            alice = session.get(f"{url}/hub/api/users/alice", timeout=30).json()
            return bool(alice["servers"].get("", {}).get("ready"))

        wait_until(ready, 180, 1, "alice's server is ready")
        lab = session.get(f"{url}/user/alice/lab", timeout=60)  # through the OAuth dance
        assert lab.status_code == 200 and "JupyterLab" in lab.text
        assert session.get(f"{url}/user/alice/api/status", timeout=30).status_code == 200
        (container,) = docker_client.containers.list(filters={"label": "ds01.test.foundation=demo"})
        assert container.attrs["Config"]["Image"] == singleuser_image
    finally:
        stopped = subprocess.run(
            [*demo_command, "stop", *common], capture_output=True, text=True, timeout=120
        )
        for leftover in docker_client.containers.list(
            all=True, filters={"label": "ds01.test.foundation=demo"}
        ):
            leftover.remove(force=True)
    assert stopped.returncode == 0, stopped.stderr
    assert json.loads(stopped.stdout)["state"] == "stopped"
    status = subprocess.run([*demo_command, "status", *common], capture_output=True, text=True)
    assert json.loads(status.stdout)["state"] == "not running"


@pytest.mark.browser
def test_a_user_logs_in_with_a_browser_and_gets_jupyterlab(hub, chromium):
    user = unique_name("web")
    hub.create_user(user)
    context = chromium.new_context()
    try:
        page = context.new_page()
        log_in(page, hub.hub_url, user, "wrong password")
        page.wait_for_selector("text=Invalid username or password", timeout=30_000)
        log_in(page, hub.hub_url, user, hub.password)
        # no options form: the hub spawns at once and sends the browser on to JupyterLab
        page.wait_for_url(f"**/user/{user}/lab**", timeout=180_000)
        page.wait_for_selector("#jp-main-dock-panel", timeout=120_000)
        assert hub.server(user)["ready"]
    finally:
        context.close()
        hub.stop_server(user)
