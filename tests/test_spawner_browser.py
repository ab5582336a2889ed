"""The DS01Spawner options form in a real headless Chromium: log in, pick a GPU profile, start,
land in JupyterLab; the container got the profile's (SIMULATED) GPU."""

from __future__ import annotations

import pytest
from harness import unique_name
from harness.browser import log_in
from harness.ds01_spawner import Ds01Hub

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.docker]

PROFILES = """
c.DS01Spawner.profile_list = [
    {"display_name": "CPU only", "slug": "cpu", "default": True},
    {"display_name": "One GPU", "slug": "gpu", "description": "a whole (simulated) A100",
     "ds01_override": {"gpus": 1}},
    {"display_name": "Two GPUs", "slug": "two", "ds01_override": {"gpus": 2}},
]
"""


def test_pick_a_gpu_profile_in_the_form_and_land_in_jupyterlab(hub_factory, tmp_path, chromium):
    ds01 = Ds01Hub(hub_factory, tmp_path, extra_config=PROFILES)
    hub = ds01.hub
    user = unique_name("web")
    hub.create_user(user, groups=["students"])
    context = chromium.new_context()
    try:
        page = context.new_page()
        log_in(page, hub.hub_url, user, hub.password)
        page.wait_for_url("**/hub/spawn**", timeout=60_000)
        assert page.is_checked("#profile-cpu")
        assert page.is_disabled("#profile-two")  # students: 1 GPU per container
        assert "Not available to you" in page.inner_text("#ds01-options")
        assert "SIMULATED" in page.inner_text("#ds01-options")
        gpu_choices = page.locator("#ds01-gpu option").all_inner_texts()
        assert any(
            text.startswith("1 whole GPU (SIMULATED) - 4 of 4 free now") for text in gpu_choices
        )
        page.check("#profile-gpu")
        page.click("input[type=submit], button[type=submit]")
        page.wait_for_url(f"**/user/{user}/lab**", timeout=240_000)
        page.wait_for_selector("#jp-main-dock-panel", timeout=120_000)
        server = hub.server(user)
        assert server["ready"] and server["user_options"]["profile"] == "gpu"
        container = hub.container_of(user)
        [request] = container.attrs["HostConfig"]["DeviceRequests"]
        slot = container.labels["ds01.gpus"]
        assert request["DeviceIDs"] == [ds01.inventory().slot(slot).uuid]
    finally:
        context.close()
        hub.stop()
