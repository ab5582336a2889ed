"""The widgets' logic, driven in-process against a real server extension on a real hub (the
browser test shows them rendered in JupyterLab), plus fast tests of their pure parts."""

import uuid

import pytest
from harness import free_port
from harness.service_hub import start_server, start_service_hub

from ds01hub.widgets import Ds01Client, Ds01Error, ImageBuilder, ProjectWizard, QuotaPanel
from ds01hub.widgets.client import _loopback
from ds01hub.widgets.quota_panel import containers_table, limits_table

# ---------------------------------------------------------------- fast


def test_loopback_rewrites_wildcard_hosts():
    assert _loopback("http://0.0.0.0:8888/user/a/") == "http://127.0.0.1:8888/user/a/"
    assert _loopback("http://10.0.0.5:8888/x/") == "http://10.0.0.5:8888/x/"


def test_discover_uses_the_hub_environment(monkeypatch):
    monkeypatch.setenv("JUPYTERHUB_SERVICE_URL", "http://0.0.0.0:8888/user/a/")
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "t0k")
    client = Ds01Client.discover()
    assert (client.server_url, client.token) == ("http://127.0.0.1:8888/user/a/", "t0k")


def test_limits_and_containers_tables_escape_and_show_use():
    quota = {
        "limits": {"group": "<students>", "max_gpus": 2, "memory": 32 * 1024**3},
        "gpus_held": 1,
        "gpus": [{"slot": "0", "name": "NVIDIA A100"}],
        "running": 1,
        "containers": 2,
    }
    text = limits_table(quota)
    assert "&lt;students&gt;" in text and "<students>" not in text
    assert "1 of 2 GPUs in use (slot 0: NVIDIA A100)" in text
    assert "32G" in text and "1 running, 2 total" in text
    assert "None" not in text and text.count("unlimited") == 3  # per container, CPUs, count
    assert "until the container is removed" in text
    assert "No resource limits" in limits_table({"limits": None})
    rows = containers_table([{"project": "p", "state": "running", "gpus": ["0:1"], "image": "i"}])
    assert "slot 0:1" in rows and "running" in rows
    assert "none" in containers_table([{"project": "p", "state": "stopped", "gpus": []}])


def test_wizard_steps_validate_before_moving_on():
    wizard = ProjectWizard(guided=True, client=Ds01Client("http://127.0.0.1:9"))
    assert wizard.step == 0 and "A project is one folder" in wizard.guidance.value
    wizard.next_button.click()
    assert wizard.step == 0 and "invalid project name ''" in wizard.message.value
    wizard.project_name.value = "cells"
    wizard.next_button.click()
    assert wizard.step == 1 and "use case" in wizard.guidance.value
    wizard.use_case.value = "nlp"
    wizard.next_button.click()
    wizard.next_button.click()
    assert wizard.step == 3
    assert "data/corpora/" in wizard.review.value and "git repository" in wizard.review.value
    assert wizard.create_button.layout.display is None
    assert wizard.next_button.layout.display == "none"
    wizard.back_button.click()
    assert wizard.step == 2


def test_build_log_shows_the_newest_lines_escaped():
    from ds01hub.widgets.image_builder import log_html

    text = log_html([f"line {i} <x>" for i in range(30)], tail=5)
    assert "line 29 &lt;x&gt;" in text and "line 25" in text and "line 24" not in text
    assert "25 earlier lines" in text


def test_unguided_wizard_explains_nothing():
    assert ProjectWizard(client=Ds01Client("http://127.0.0.1:9")).guidance.value == ""


def test_unreachable_server_is_a_readable_message():
    client = Ds01Client(f"http://127.0.0.1:{free_port()}/user/x/", timeout=5)
    panel = QuotaPanel(client=client)
    assert "did not answer" in panel.limits_html.value
    assert "restart your server" in panel.limits_html.value
    builder = ImageBuilder(client=client)
    assert builder.template.options[-1] == ("Custom", "custom")  # templates still offered
    assert "did not answer" in builder.status.value


def test_image_builder_refuses_bad_packages_before_sending():
    builder = ImageBuilder(client=Ds01Client(f"http://127.0.0.1:{free_port()}/", timeout=5))
    builder.image_name.value = "ok"
    builder.pip_packages.value = "six\nnumpy; curl evil"
    assert builder.start_build() is None
    assert "invalid pip package" in builder.status.value


# ---------------------------------------------------------------- real hub


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    hub = start_service_hub(tmp_path_factory.mktemp("widget-hub"), local_servers=True)
    yield hub
    hub.stop()


def _user_client(hub, prefix: str = "wid") -> tuple[str, Ds01Client]:
    name = f"{prefix}{uuid.uuid4().hex[:6]}"
    hub.create_user(name)
    start_server(hub, name)
    return name, Ds01Client(f"{hub.url}/user/{name}/", hub.token_for(name))


@pytest.mark.e2e
def test_wizard_creates_the_project_through_the_extension(hub):
    name, client = _user_client(hub)
    wizard = ProjectWizard(client=client)
    wizard.project_name.value = "wizard-made"
    wizard.project_description.value = "made by the widget"
    for _ in range(3):
        wizard.next_button.click()
    wizard.create_button.click()
    assert "Project created: wizard-made/" in wizard.message.value, wizard.message.value
    root = hub.directory / "homes" / name / "wizard-made"
    assert "made by the widget" in (root / "README.md").read_text()
    assert (root / ".git").is_dir()
    hub.stop_server(name)


@pytest.mark.e2e
def test_panels_show_the_users_own_data(hub):
    name, client = _user_client(hub)
    panel = QuotaPanel(client=client)
    assert "You have no containers" in panel.containers_html.value
    builder = ImageBuilder(client=client)
    assert [key for _, key in builder.template.options] == ["general", "cv", "nlp", "rl", "custom"]
    assert "no custom images yet" in builder.images_html.value
    hub.stop_server(name)


@pytest.mark.e2e
def test_widgets_say_when_the_hub_service_is_down(hub):
    name, client = _user_client(hub, prefix="down")
    panel = QuotaPanel(client=client)
    assert "ds01 service is not reachable" in panel.limits_html.value
    assert "administrator" in panel.limits_html.value
    with pytest.raises(Ds01Error) as raised:
        client.get("api/quota")
    assert raised.value.unreachable
    hub.stop_server(name)


@pytest.mark.docker
@pytest.mark.e2e
def test_the_builders_cancel_stops_its_build(hub):
    """The host's build slots are all taken (here), so the build waits in line until Cancel."""
    import threading

    from ds01hub.actions.builds import CANCELLED, MAX_CONCURRENT_BUILDS, HostBuildLocks

    name, client = _user_client(hub, prefix="can")
    locks = HostBuildLocks(hub.directory / "state", MAX_CONCURRENT_BUILDS)
    slots = [locks.take_slot(threading.Event(), lambda: None) for _ in range(MAX_CONCURRENT_BUILDS)]
    try:
        builder = ImageBuilder(client=client, poll_interval=0.2)
        assert builder.cancel_button.disabled and builder.cancel_build() is None  # no build
        builder.image_name.value = "waits"
        assert builder.start_build() is not None
        assert not builder.cancel_button.disabled and builder.build_button.disabled
        assert builder.cancel_build()["image"] == "waits"  # stopping: the follower sees it end
        state = builder.wait(30)
        assert state["status"] == "error" and builder.log_lines[-1] == CANCELLED
        assert "Build cancelled" in builder.status.value
        assert builder.cancel_button.disabled and not builder.build_button.disabled
    finally:
        for slot in slots:
            HostBuildLocks.release(slot)
        hub.stop_server(name)
