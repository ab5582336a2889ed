"""The foundation end to end: a real hub spawns a real container from the single-user image,
which answers through the proxy with the user's token, and is gone after stop."""

from __future__ import annotations

import pytest
from harness import TEST_LABEL, unique_name

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
