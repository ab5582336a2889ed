"""The ds01 service and the wizards with the real DS01Spawner: real containers carrying the
ds01 labels, a limits YAML (SIMULATED GPU inventory), quota and container answers for the
token's owner only, and a project container started from the ProjectWizard."""

from __future__ import annotations

import pytest
import requests
from harness import free_port, unique_name

from ds01hub.widgets import Ds01Client, ProjectWizard, QuotaPanel

pytestmark = [pytest.mark.e2e, pytest.mark.docker]

LABEL = "ds01.test.notebook"

LIMITS_YAML = """\
defaults:
  max_gpus: 1
  max_cpus: 1
  memory: 512m
  idle_timeout: 2h
  gpu_hold_after_stop: 1h
policies:
  max_containers_per_user: 3
gpu_allocation:
  simulate:
    seed: {seed}
    gpus:
      - {{name: NVIDIA A100-SXM4-80GB, memory: 80g, count: 1}}
"""


@pytest.fixture(scope="module")
def ds01_hub(hub_factory, tmp_path_factory):
    tag = unique_name("nb")
    directory = tmp_path_factory.mktemp("ds01-service")
    limits = directory / "limits.yaml"
    limits.write_text(LIMITS_YAML.format(seed=tag))
    bridge = hub_factory.hub_ip
    config = f"""
from ds01hub.hub.services import configure_notebook
c.DS01Spawner.limits_path = {str(limits)!r}
c.DS01Spawner.state_dir = {str(directory / "state")!r}
c.DS01Spawner.container_label_filter = ["{LABEL}={tag}"]
c.Spawner.cmd = ["jupyterhub-singleuser"]
configure_notebook(
    c,
    url="http://{bridge}:{free_port(bridge)}",
    service_args=[
        "--DS01Service.limits_path={limits}", "--DS01Service.state_dir={directory / "state"}"
    ],
)
"""
    hub = hub_factory(config, spawner="ds01", labels={LABEL: tag})
    yield hub
    hub.stop()


def service_get(hub, path: str, token: str):
    response = requests.get(
        f"{hub.url}/services/ds01/api/{path}",
        headers={"Authorization": f"token {token}"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_quota_containers_and_a_project_container_from_the_wizard(ds01_hub, docker_client):
    hub = ds01_hub
    alice, bob = unique_name("nba"), unique_name("nbb")
    hub.create_user(alice)
    hub.create_user(bob)
    alice_token, bob_token = hub.token_for(alice), hub.token_for(bob)
    hub.start_server(alice)
    hub.wait_ready(alice)
    try:
        quota = service_get(hub, "quota", alice_token)
        assert quota["user"] == alice
        assert quota["limits"]["max_gpus"] == 1
        assert quota["limits"]["max_containers_per_user"] == 3
        assert quota["running"] == 1
        [container] = service_get(hub, "containers", alice_token)
        assert container["project"] == "default" and container["state"] == "running"
        assert service_get(hub, "containers", bob_token) == []
        assert service_get(hub, "quota", bob_token)["containers"] == 0

        # The widgets, run here against alice's real container (through the proxy).
        client = Ds01Client(hub.user_url(alice), alice_token)
        panel = QuotaPanel(client=client)
        assert "512M" in panel.limits_html.value and "1 running" in panel.limits_html.value
        assert "default" in panel.containers_html.value
        wizard = ProjectWizard(client=client)
        wizard.project_name.value = "Has.Upper"
        wizard.start_container.value = True
        wizard.next_button.click()
        assert wizard.step == 0 and "cannot name a container" in wizard.message.value
        wizard.project_name.value = "run-b"
        for _ in range(3):
            wizard.next_button.click()
        assert "container named <b>run-b</b>" in wizard.review.value
        result = wizard.create()
        assert result is not None, wizard.message.value
        assert "container" in result, wizard.message.value
        assert result["container"]["project"] == "run-b"
        assert result["container"]["state"] == "running"
        assert "Container run-b is running" in wizard.message.value
        started = docker_client.containers.get(result["container"]["container"])
        assert started.labels["ds01.user"] == alice and started.labels["ds01.project"] == "run-b"
        listing = docker_client.containers.get(container["container"]).exec_run(
            ["ls", f"{result['path']}"]
        )
        assert b"README.md" in listing.output
        assert service_get(hub, "quota", alice_token)["running"] == 2
    finally:
        hub.delete_server(alice, "run-b")
        hub.stop_server(alice)
