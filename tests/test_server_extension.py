"""The ds01 jupyter-server extension over real HTTP: a real JupyterHub spawns real single-user
servers (local processes) that load the extension from the shipped jupyter-config file; requests
carry real hub tokens; forwarded requests reach the real ds01 service."""

import uuid

import pytest
import requests
from harness.service_hub import start_server, start_service_hub

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    hub = start_service_hub(tmp_path_factory.mktemp("ext-hub"), local_servers=True)
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def alice(hub):
    name = f"ext{uuid.uuid4().hex[:6]}"
    hub.create_user(name)
    start_server(hub, name)
    yield name, hub.token_for(name)
    hub.stop_server(name)


def call(hub, user, method, path, token, **kw):
    headers = {"Authorization": f"token {token}"} if token else {}
    return requests.request(
        method,
        f"{hub.url}/user/{user}/ds01/{path}",
        headers=headers,
        allow_redirects=False,
        timeout=60,
        **kw,
    )


def test_status_reports_the_service(hub, alice):
    name, token = alice
    response = call(hub, name, "GET", "status", token)
    assert response.status_code == 200, response.text
    assert response.json()["service_url"].endswith("/services/ds01/")
    assert response.json()["root_dir"] == str(hub.directory / "homes" / name)


def test_project_init_writes_the_users_files(hub, alice):
    name, token = alice
    response = call(
        hub,
        name,
        "POST",
        "projects",
        token,
        json={"name": "thesis", "use_case": "cv", "description": "cells"},
    )
    assert response.status_code == 201, response.text
    assert response.json()["relative_path"] == "thesis"
    root = hub.directory / "homes" / name / "thesis"
    assert (root / "README.md").read_text().startswith("# thesis")
    assert (root / "data" / "images").is_dir()
    assert (root / ".git").is_dir() and response.json()["git_committed"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"name": "x", "parent": "../.."}, "outside your files"),
        ({"name": "x", "parent": "/etc"}, "relative to"),
        ({"name": "../evil"}, "invalid project name"),
        ({"name": "x", "use_case": "audio"}, "unknown use case"),
        ({"name": "x", "shell": "rm -rf"}, "unknown field"),
    ],
)
def test_project_init_refuses_bad_input_with_a_reason(hub, alice, body, message):
    name, token = alice
    response = call(hub, name, "POST", "projects", token, json=body)
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_a_symlink_out_of_the_users_files_is_refused(hub, alice, tmp_path):
    name, token = alice
    outside = tmp_path / "outside"
    outside.mkdir()
    (hub.directory / "homes" / name / "escape").symlink_to(outside)
    response = call(hub, name, "POST", "projects", token, json={"name": "x", "parent": "escape"})
    assert response.status_code == 400
    assert "outside your files" in response.json()["error"]
    assert list(outside.iterdir()) == []


def test_other_users_and_anonymous_requests_are_refused(hub, alice):
    name, _ = alice
    bob = f"ext{uuid.uuid4().hex[:6]}"
    hub.create_user(bob)
    bob_token = hub.token_for(bob)
    assert call(hub, name, "POST", "projects", bob_token, json={"name": "p"}).status_code == 403
    assert call(hub, name, "GET", "api/quota", bob_token).status_code == 403
    assert call(hub, name, "GET", "api/quota", None).status_code in (302, 403)
    assert not (hub.directory / "homes" / name / "p").exists()


def test_requests_are_forwarded_with_the_users_own_token(hub, alice):
    name, token = alice
    templates = call(hub, name, "GET", "api/templates", token)
    assert templates.status_code == 200, templates.text
    assert [t["key"] for t in templates.json()][-1] == "custom"
    quota = call(hub, name, "GET", "api/quota", token)
    assert quota.status_code == 200, quota.text
    assert quota.json()["user"] == name  # the service saw the server's token as this user
    refused = call(
        hub, name, "POST", "api/builds", token, json={"name": "x", "pip_packages": "a;b"}
    )
    assert refused.status_code == 400
    assert "invalid pip package" in refused.json()["error"]


@pytest.mark.parametrize(
    ("method", "path"),
    [("DELETE", "api/quota"), ("GET", "api/../../hub/api/users"), ("POST", "api/images")],
)
def test_only_known_endpoints_are_forwarded(hub, alice, method, path):
    name, token = alice
    assert call(hub, name, method, path, token).status_code == 404


def test_unreachable_service_gives_a_readable_503(hub):
    name = f"down{uuid.uuid4().hex[:6]}"
    hub.create_user(name)
    start_server(hub, name)
    try:
        response = call(hub, name, "GET", "api/quota", hub.token_for(name))
        assert response.status_code == 503
        assert "ds01 service is not reachable" in response.json()["error"]
        assert "administrator" in response.json()["hint"]
    finally:
        hub.stop_server(name)
