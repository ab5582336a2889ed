"""The ds01 hub service over real HTTP: a real JupyterHub + configurable-http-proxy start it as a
managed service, and real user tokens (made by the hub) are used against it."""

import json
import threading
import uuid

import pytest
from harness.service_hub import service_get, service_request, start_service_hub

from ds01hub.actions.builds import CANCELLED, MAX_CONCURRENT_BUILDS, HostBuildLocks
from ds01hub.hub.services import configure_notebook


@pytest.fixture(scope="module")
def service_hub(tmp_path_factory):
    hub = start_service_hub(tmp_path_factory.mktemp("service-hub"))
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def users(service_hub):
    names = [f"svc{uuid.uuid4().hex[:6]}", f"svc{uuid.uuid4().hex[:6]}"]
    for name in names:
        service_hub.create_user(name)
    return {name: service_hub.token_for(name) for name in names}


def test_configure_hub_grants_access_scope_to_users_and_server_tokens():
    from traitlets.config import Config

    c = Config()
    c.JupyterHub.load_roles = [{"name": "user", "scopes": ["self", "read:hub"]}]
    configure_notebook(c, url="http://172.17.0.1:10101")
    roles = {r["name"]: r for r in c.JupyterHub.load_roles}
    assert roles["user"]["scopes"] == ["self", "read:hub", "access:services!service=ds01"]
    assert "access:services!service=ds01" in roles["server"]["scopes"]
    assert "access:servers!server" in roles["server"]["scopes"]
    assert roles["ds01-service"]["services"] == ["ds01"]
    [service] = c.JupyterHub.services.get_value([])
    assert service["url"] == "http://172.17.0.1:10101"
    assert service["command"][1:3] == ["-m", "ds01hub.services.notebook"]
    environment = c.Spawner.environment.get_value({})
    assert environment["DS01_SERVICE_URL"] == "http://172.17.0.1:10101/services/ds01/"


def test_configure_hub_in_a_subconfig_merges_instead_of_replacing():
    """In a file loaded with load_subconfig(), values are lazy: the parent's roles, services
    and environment must survive."""
    from traitlets.config import Config

    parent = Config()
    parent.JupyterHub.services = [{"name": "admin-svc", "api_token": "x"}]
    parent.JupyterHub.load_roles = [{"name": "admin", "services": ["admin-svc"]}]
    parent.Spawner.environment = {"KEEP": "1"}
    sub = Config()
    configure_notebook(sub, url="http://172.17.0.1:10101")
    parent.merge(sub)
    services = parent.JupyterHub.services
    assert [s["name"] for s in services] == ["admin-svc", "ds01"]
    names = [r["name"] for r in parent.JupyterHub.load_roles]
    assert names == ["admin", "ds01-service", "user", "server"]
    assert parent.Spawner.environment["KEEP"] == "1"
    assert parent.Spawner.environment["DS01_SERVICE_URL"].endswith(":10101/services/ds01/")


@pytest.mark.e2e
def test_no_token_is_refused_and_browser_is_sent_to_login(service_hub):
    response = service_get(service_hub, "api/images", None)
    assert response.status_code == 403
    assert "token" in response.json()["error"]
    index = service_get(service_hub, "", None)
    assert index.status_code == 302
    assert "/hub/api/oauth2/authorize" in index.headers["Location"]


@pytest.mark.e2e
def test_bad_token_and_token_without_service_scope_are_refused(service_hub, users):
    assert service_get(service_hub, "api/me", "not-a-token").status_code == 403
    name = next(iter(users))
    narrow = service_hub.token_for(name, scopes=["read:users!user"])
    assert service_get(service_hub, "api/me", narrow).status_code == 403


@pytest.mark.e2e
def test_service_tokens_are_refused(service_hub):
    # The admin *service* token may reach the hub, but the ds01 service acts for users only.
    assert service_get(service_hub, "api/me", service_hub.admin_token).status_code == 403


@pytest.mark.e2e
def test_me_and_templates(service_hub, users):
    name, token = next(iter(users.items()))
    assert service_get(service_hub, "api/me", token).json()["name"] == name
    templates = service_get(service_hub, "api/templates", token).json()
    assert [t["key"] for t in templates] == ["general", "cv", "nlp", "rl", "custom"]


@pytest.mark.e2e
def test_build_requests_are_validated(service_hub, users):
    token = next(iter(users.values()))
    bad = service_request(
        service_hub, "POST", "api/builds", token, json={"name": "x", "pip_packages": ["six; id"]}
    )
    assert bad.status_code == 400
    assert "invalid pip package 'six; id'" in bad.json()["error"]
    unknown = service_request(
        service_hub, "POST", "api/builds", token, json={"name": "x", "base": "ubuntu"}
    )
    assert unknown.status_code == 400 and "base" in unknown.json()["error"]
    not_json = service_request(service_hub, "POST", "api/builds", token, data=b"{")
    assert not_json.status_code == 400


@pytest.mark.e2e
def test_unknown_and_foreign_builds_and_images_are_not_found(service_hub, users):
    (_, alice), (_, bob) = users.items()
    assert service_get(service_hub, f"api/builds/{uuid.uuid4().hex}", alice).status_code == 404
    assert service_request(service_hub, "DELETE", "api/images/nope", bob).status_code == 404
    assert service_request(service_hub, "DELETE", "api/images/Bad!", bob).status_code == 400


@pytest.mark.e2e
def test_quota_and_containers_answer_for_the_token_owner(service_hub, users):
    name, token = next(iter(users.items()))
    quota = service_get(service_hub, "api/quota", token)
    assert quota.status_code == 200, quota.text
    assert quota.json()["user"] == name
    containers = service_get(service_hub, "api/containers", token)
    assert containers.status_code == 200 and containers.json() == []


@pytest.mark.docker
@pytest.mark.e2e
def test_build_stream_list_and_only_the_owner_sees_or_deletes(
    docker_client, singleuser_image, tmp_path
):
    service_hub = start_service_hub(tmp_path, base_image=singleuser_image)
    alice, bob = f"b{uuid.uuid4().hex[:6]}", f"b{uuid.uuid4().hex[:6]}"
    for name in (alice, bob):
        service_hub.create_user(name)
    alice_token, bob_token = service_hub.token_for(alice), service_hub.token_for(bob)
    response = service_request(
        service_hub,
        "POST",
        "api/builds",
        alice_token,
        json={"name": "tiny", "template": "custom", "pip_packages": "six"},
    )
    assert response.status_code == 202, response.text
    build = response.json()
    assert build["tag"] == f"ds01-{alice}/tiny:latest"
    try:
        # A second build while the first runs is refused.
        again = service_request(service_hub, "POST", "api/builds", alice_token, json={"name": "b"})
        assert again.status_code == 409
        # Bob cannot see Alice's build, not even that it exists.
        assert service_get(service_hub, f"api/builds/{build['id']}", bob_token).status_code == 404
        stream = service_request(
            service_hub, "GET", f"api/builds/{build['id']}/stream", alice_token, stream=True
        )
        events = [json.loads(line) for line in stream.iter_lines() if line]
        assert events[-1]["kind"] == "done", events[-10:]
        assert any(e["kind"] == "step" for e in events)
        status = service_get(service_hub, f"api/builds/{build['id']}?since=1000", alice_token)
        assert status.json()["status"] == "done" and status.json()["events"] == []
        mine = service_get(service_hub, "api/images", alice_token).json()
        assert [i["tag"] for i in mine] == [f"ds01-{alice}/tiny:latest"]
        assert service_get(service_hub, "api/images", bob_token).json() == []
        refused = service_request(service_hub, "DELETE", "api/images/tiny", bob_token)
        assert refused.status_code == 404
        deleted = service_request(service_hub, "DELETE", "api/images/tiny", alice_token)
        assert deleted.status_code == 200
        assert service_get(service_hub, "api/images", alice_token).json() == []
    finally:
        service_hub.stop()
        for image in docker_client.images.list(filters={"label": f"ds01.image.user={alice}"}):
            docker_client.images.remove(image.id, force=True)


@pytest.mark.docker
@pytest.mark.e2e
def test_only_the_owner_cancels_a_build_and_an_ended_one_is_a_conflict(service_hub, users):
    """The widget's Cancel: the host's build slots are all taken (here), so the build waits in
    line, deterministically, until its owner cancels it."""
    (_, alice), (_, bob) = users.items()
    locks = HostBuildLocks(service_hub.directory / "state", MAX_CONCURRENT_BUILDS)
    slots = [locks.take_slot(threading.Event(), lambda: None) for _ in range(MAX_CONCURRENT_BUILDS)]
    try:
        started = service_request(service_hub, "POST", "api/builds", alice, json={"name": "q"})
        assert started.status_code == 202, started.text
        cancel = f"api/builds/{started.json()['id']}/cancel"
        assert service_request(service_hub, "POST", cancel, bob, json={}).status_code == 404
        bad = service_request(service_hub, "POST", cancel, alice, json={"wait": "soon"})
        assert bad.status_code == 400 and "'wait'" in bad.json()["error"]
        done = service_request(service_hub, "POST", cancel, alice, json={"wait": 30})
        assert done.status_code == 200, done.text
        assert done.json() == {"image": "q", "stopped": True}
        state = service_get(service_hub, f"api/builds/{started.json()['id']}", alice).json()
        assert state["status"] == "error" and state["events"][-1]["text"] == CANCELLED
        again = service_request(service_hub, "POST", cancel, alice, json={})
        assert again.status_code == 409 and "already ended" in again.json()["error"]
    finally:
        for slot in slots:
            HostBuildLocks.release(slot)
