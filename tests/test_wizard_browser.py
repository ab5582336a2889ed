"""A person's path through the notebook wizards, in a real headless Chromium.

A real JupyterHub (with the ds01 service) spawns a real container from the single-user image;
the browser logs in, opens JupyterLab, runs a notebook whose cells show the ProjectWizard and the
ImageBuilder, clicks through them, and the test checks the results where they really land: the
project files inside the container (docker exec) and the built image in Docker, listed for that
user only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import requests
from harness import free_port, unique_name
from harness.browser import log_in, notebook_of, run_all_cells

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.docker]

SCREENSHOTS = Path(os.environ.get("DS01_SCREENSHOTS", "/tmp/ds01hub-screenshots"))

NOTEBOOK_CELLS = [
    "from ds01hub.widgets import ProjectWizard\nProjectWizard(guided=True)",
    "from ds01hub.widgets import ImageBuilder\nImageBuilder(poll_interval=0.5)",
    "from ds01hub.widgets import QuotaPanel\nQuotaPanel()",
]


@pytest.fixture(scope="module")
def wizard_hub(hub_factory, singleuser_image):
    bridge = hub_factory.hub_ip  # the service listens where containers can reach it
    port = free_port(bridge)
    extra = f"""
from ds01hub.hub.services import configure_notebook
configure_notebook(
    c,
    url="http://{bridge}:{port}",
    service_args=[
        "--DS01Service.base_image={singleuser_image}",
        "--DS01Service.ca_bundle=/etc/ssl/certs/ca-certificates.crt",
    ],
)
"""
    hub = hub_factory(extra_config=extra)
    yield hub
    hub.stop()


def _container(hub, docker_client, user):
    """The user's running container, found by this hub's label and the user's name."""
    [container] = [c for c in hub.containers(all=False) if user in c.name]
    return container


def test_wizard_and_image_builder_in_jupyterlab(wizard_hub, chromium, docker_client):
    hub = wizard_hub
    user, other = unique_name("wiz"), unique_name("oth")
    hub.create_user(user)
    hub.create_user(other)
    token = hub.token_for(user)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page = chromium.new_page(viewport={"width": 1400, "height": 1800})
    page.set_default_timeout(120_000)
    try:
        # Log in through the form; the hub spawns the container and lands in JupyterLab.
        log_in(page, hub.hub_url, user, hub.password)
        page.wait_for_url(f"**/user/{user}/**", timeout=240_000)
        page.wait_for_selector(".jp-LabShell, #jp-main-dock-panel", timeout=120_000)

        # A notebook with the three widgets, written through the server's contents API.
        put = hub.user_request(
            token,
            "PUT",
            user,
            "api/contents/ds01-wizards.ipynb",
            json={"type": "notebook", "format": "json", "content": notebook_of(NOTEBOOK_CELLS)},
        )
        assert put.status_code in (200, 201), put.text
        page.goto(hub.user_url(user, path="lab/tree/ds01-wizards.ipynb"))
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
        run_all_cells(page, ".ds01-project-wizard")

        # ProjectWizard: name, next x3 (guided explanations shown), create.
        wizard = page.locator(".ds01-project-wizard")
        wizard.wait_for()
        assert "A project is one folder" in wizard.inner_text()
        wizard.locator(".ds01-project-name input").fill("browser-proj")
        for _ in range(3):
            wizard.locator(".ds01-next").click()
        wizard.locator(".ds01-review").wait_for()
        page.screenshot(path=str(SCREENSHOTS / "project-wizard-review.png"), full_page=True)
        wizard.locator(".ds01-create").click()
        wizard.locator(".ds01-message .ds01-ok").wait_for()
        assert "Project created: browser-proj/" in wizard.locator(".ds01-message").inner_text()

        status = hub.user_request(token, "GET", user, "ds01/status").json()
        container = _container(hub, docker_client, user)
        listing = container.exec_run(["ls", "-a", f"{status['root_dir']}/browser-proj"])
        assert listing.exit_code == 0, listing.output
        names = listing.output.decode().split()
        for expected in ("README.md", ".gitignore", ".git", "data", "notebooks", "src"):
            assert expected in names
        log = container.exec_run(
            ["git", "-C", f"{status['root_dir']}/browser-proj", "log", "--oneline"]
        )
        assert b"Initialise project browser-proj" in log.output

        # ImageBuilder: Custom template + six, live log and progress, result tag.
        builder = page.locator(".ds01-image-builder")
        builder.locator(".ds01-image-name input").fill("tiny")
        builder.locator(".ds01-pip textarea").fill("six")
        builder.locator(".ds01-build").click()
        result = builder.locator(".ds01-build-result .ds01-ok")
        result.wait_for(timeout=300_000)
        tag = f"ds01-{user}/tiny:latest"
        assert f"Your image: {tag}" in result.inner_text()
        builder.locator(".ds01-my-images").get_by_text(tag).wait_for()
        page.screenshot(path=str(SCREENSHOTS / "image-builder-done.png"), full_page=True)

        image = docker_client.images.get(tag)
        assert image.labels["ds01.image.user"] == user
        mine = _service_images(hub, token)
        assert [i["tag"] for i in mine] == [tag]
        assert _service_images(hub, hub.token_for(other)) == []
        panel = page.locator(".ds01-quota-panel")
        assert "My resources" in panel.inner_text()

        # The same notebook in the plain notebook interface (Notebook 7).
        page.goto(hub.user_url(user, path="notebooks/ds01-wizards.ipynb"))
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
        run_all_cells(page, ".ds01-quota-panel")
        assert "Build a custom image" in page.locator(".ds01-image-builder").inner_text()
        page.locator(".ds01-project-wizard .ds01-project-name").wait_for()
        page.screenshot(path=str(SCREENSHOTS / "plain-notebook.png"), full_page=True)
    except Exception:
        page.screenshot(path=str(SCREENSHOTS / "failure.png"), full_page=True)
        raise
    finally:
        page.close()
        for image in docker_client.images.list(filters={"label": f"ds01.image.user={user}"}):
            docker_client.images.remove(image.id, force=True)
        hub.stop_server(user)


def _service_images(hub, token: str) -> list[dict]:
    response = requests.get(
        f"{hub.url}/services/ds01/api/images",
        headers={"Authorization": f"token {token}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return json.loads(response.text)
