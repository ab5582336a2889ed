"""The DS01Spawner options form in a real headless Chromium: log in, pick a GPU profile, start,
land in JupyterLab; the container got the profile's (SIMULATED) GPU. And what the pages say
when no GPU is free (the wait, with its countdown) or the allocator refuses: the numbers and
sentences on the page are the allocator's. Screenshots go to $DS01_SCREENSHOTS."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from harness import unique_name, wait_until
from harness.browser import log_in
from harness.ds01_spawner import Ds01Hub

from ds01hub.gpu.decision import GpuRequest
from ds01hub.limits import parse_limits

SCREENSHOTS = Path(os.environ.get("DS01_SCREENSHOTS", "/tmp/ds01hub-screenshots"))

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.docker]

PROFILES = """
c.DS01Spawner.profile_list = [
    {"display_name": "CPU only", "slug": "cpu", "default": True},
    {"display_name": "One GPU", "slug": "gpu", "description": "a whole (simulated) A100",
     "ds01_override": {"gpus": 1}},
    {"display_name": "Two GPUs", "slug": "two", "ds01_override": {"gpus": 2}},
    {"display_name": "MIG slice", "slug": "mig", "ds01_override": {"mig": "2g.20gb"}},
]
from ds01hub.hub.services import configure_pages
configure_pages(c)
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


def test_the_form_the_wait_and_the_refusal_say_what_the_allocator_says(
    hub_factory, tmp_path, chromium, docker_client
):
    ds01 = Ds01Hub(hub_factory, tmp_path, extra_config=PROFILES)
    hub = ds01.hub
    # Another process (this test) holds GPUs through the same allocation state: reservations
    # of a live owner, for as long as the test needs them.
    allocator = ds01.allocator(docker_client)
    allocator.reservation_ttl = 3600
    filler = parse_limits({"defaults": {"max_gpus": 8, "max_gpus_per_container": 1}})
    waiter, refused = unique_name("wai"), unique_name("ref")

    def hold(user: str, container: str, **kw) -> None:
        request = GpuRequest(user, container, count=1, **kw)
        assert allocator.allocate(request, filler.resolve(user)).ok

    for n in range(3):
        hold("filler", f"f{n}._.filler", whole_gpu=True)
    hold(refused, f"other._.{refused}", mig_profile="2g.20gb")
    for user in (waiter, refused):
        hub.create_user(user, groups=["students"])
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    context = chromium.new_context()
    try:
        page = context.new_page()
        log_in(page, hub.hub_url, waiter, hub.password)
        page.wait_for_url("**/hub/spawn**", timeout=60_000)
        slots = ds01.inventory().slots
        held = {h.slot_id for h in allocator.holdings()}
        whole = [s.id for s in slots if s.profile is None]
        mig = [s.id for s in slots if s.profile == "2g.20gb"]
        badge = page.locator("label[for=profile-gpu] .ds01-free")
        assert badge.inner_text() == f"{len(set(whole) - held)} of {len(whole)} free now"
        mig_badge = page.locator("label[for=profile-mig] .ds01-free").inner_text()
        assert mig_badge == f"{len(set(mig) - held)} of {len(mig)} free now"
        assert "1 whole GPU (SIMULATED), 1 CPU, 512m memory" in page.inner_text(
            "label[for=profile-gpu]"
        )
        assert page.is_disabled("#ds01-gpu")  # a profile brings its GPU: one choice
        page.check("#profile-custom")
        assert page.is_enabled("#ds01-gpu")
        page.check("#profile-gpu")
        page.screenshot(path=str(SCREENSHOTS / "spawn-form.png"), full_page=True)

        hold("filler", "f3._.filler", whole_gpu=True)  # now every whole GPU is held
        page.click("button[type=submit]")
        message = page.locator("#progress-message .ds01-headline")
        message.wait_for(timeout=60_000)
        assert message.inner_text() == (
            "You are next in line for a whole GPU (SIMULATED); "
            "a MIG 2g.20gb slice is free now."  # of two: another user holds one
        )
        countdown = page.locator("#progress-message .ds01-countdown")
        wait_until(
            lambda: re.fullmatch(
                r"\(gives up in \d+m\d\ds, at \d\d:\d\d UTC\)", countdown.inner_text()
            ),
            10,
            0.2,
            lambda: f"the countdown does not tick: {countdown.inner_text()!r}",
        )
        details = page.locator("#progress-message details.ds01-details")
        assert details.get_attribute("open") is None  # folded behind "details"
        assert details.text_content().count(": filler (f") == 4  # who holds the whole GPUs
        page.screenshot(path=str(SCREENSHOTS / "spawn-wait.png"), full_page=True)
        page.click("#stop-server-btn")  # the way out of a wait: the hub's own button
        wait_until(lambda: hub.server(waiter) is None, 60, 0.5, hub.log)
        page.close()

        context.close()
        context = chromium.new_context()
        page = context.new_page()
        log_in(page, hub.hub_url, refused, hub.password)
        page.wait_for_url("**/hub/spawn**", timeout=60_000)
        page.check("#profile-mig")
        page.click("button[type=submit]")
        headline = page.get_by_text("You already hold 1 of your 1 GPU")
        headline.first.wait_for(timeout=60_000)
        text = page.inner_text("body")
        assert "You already hold 1 of your 1 GPU, so you cannot have another." in text
        assert "SpawnException" not in text and "503" not in text
        page.screenshot(path=str(SCREENSHOTS / "spawn-refused.png"), full_page=True)
        page.locator("a.ds01-back").first.click()
        page.wait_for_url(f"**/hub/spawn/{refused}*", timeout=30_000)
        page.locator("#profile-mig").wait_for()  # back at the form
    finally:
        context.close()
        for name in ("f0", "f1", "f2", "f3"):
            allocator.release(f"{name}._.filler")
        allocator.release(f"other._.{refused}")
        hub.stop()
