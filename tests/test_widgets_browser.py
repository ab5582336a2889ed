"""The notebook widgets in a real single-user server that a real hub (DS01Spawner) started with
a (SIMULATED) GPU, in a real headless Chromium: the QuotaPanel's numbers are the allocator's
(read from it here, never written into the test), the project wizard creates its project, and
the image builder's Cancel stops a build. A screenshot is kept under the test's tmp dir."""

from __future__ import annotations

import threading

import pytest
from harness import free_port, unique_name, wait_until
from harness.browser import log_in, notebook_of, run_all_cells
from harness.ds01_spawner import LIMITS_YAML, Ds01Hub

from ds01hub.actions.builds import HostBuildLocks
from ds01hub.gpu.decision import GpuRequest
from ds01hub.limits import load_limits, parse_limits

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.docker]

#: Students may hold 2 GPUs and have no CPU limit (an "unlimited" on the panel).
LIMITS = LIMITS_YAML.replace("  max_gpus: 1\n", "  max_gpus: 2\n", 1).replace(
    "  max_cpus: 1\n", "", 1
)
CELLS = [
    "from ds01hub.widgets import QuotaPanel\nQuotaPanel()",
    "from ds01hub.widgets import ProjectWizard\nProjectWizard()",
    "from ds01hub.widgets import ImageBuilder\nImageBuilder(poll_interval=0.5)",
]


def _notebook_config(hub_factory, singleuser_image: str, directory) -> str:
    """The ds01 service on the hub's bridge (containers reach it there), on the spawner's
    limits and state directory, with one build slot on the host (the test can hold it)."""
    bridge = hub_factory.hub_ip
    args = [
        f"--DS01Service.base_image={singleuser_image}",
        f"--DS01Service.limits_path={directory / 'limits.yaml'}",
        f"--DS01Service.state_dir={directory / 'state'}",
        "--DS01Service.max_concurrent_builds=1",
    ]
    return f"""
from ds01hub.hub.services import configure_notebook
configure_notebook(c, url="http://{bridge}:{free_port(bridge)}", service_args={args!r})
"""


def _panel_rows(page) -> dict[str, list[str]]:
    """The QuotaPanel's limits table: row title -> its cells (in use, limit)."""
    rows = page.locator(".ds01-quota-panel table.ds01-limits tbody tr").evaluate_all(
        "rows => rows.map(r => [...r.cells].map(c => c.innerText.trim()))"
    )
    return {row[0]: row[1:] for row in rows}


def _allocator_says(ds01: Ds01Hub, allocator, user: str) -> tuple[str, str]:
    """(GPUs in use, GPUs free now) as sentences made from the allocator's own status."""
    inventory = ds01.inventory()
    status = allocator.status()
    mine = [row.slot_id for row in status if row.holding and row.holding.user == user]
    max_gpus = load_limits(ds01.limits_path).resolve(user, ["students"]).max_gpus
    slots = "; ".join(f"slot {s}: {inventory.slot(s).name} (SIMULATED)" for s in mine)
    in_use = f"{len(mine)} of {max_gpus} GPUs in use ({slots})"
    whole = [row for row in status if row.profile is None]
    mig = [row for row in status if row.profile == "2g.20gb"]
    free = (
        f"{sum(r.holding is None for r in whole)} of {len(whole)} whole GPUs; "
        f"{sum(r.holding is None for r in mig)} of {len(mig)} MIG 2g.20gb slices (SIMULATED)"
    )
    return in_use, free


def test_widgets_in_a_gpu_server_show_what_the_allocator_says(
    hub_factory, singleuser_image, tmp_path, chromium, docker_client
):
    ds01 = Ds01Hub(
        hub_factory,
        tmp_path,
        extra_config=_notebook_config(hub_factory, singleuser_image, tmp_path),
        limits_yaml=LIMITS,
    )
    hub = ds01.hub
    user = unique_name("nb")
    hub.create_user(user, groups=["students"])
    allocator = ds01.allocator(docker_client)
    allocator.reservation_ttl = 3600
    filler = parse_limits({"defaults": {"max_gpus": 8, "max_gpus_per_container": 1}})
    held: list[str] = []

    def hold(container: str, **kw) -> None:
        request = GpuRequest("filler", container, count=1, **kw)
        assert allocator.allocate(request, filler.resolve("filler")).ok
        held.append(container)

    build_slot = HostBuildLocks(tmp_path / "state", 1)
    slot_fd = None
    page = chromium.new_page(viewport={"width": 1400, "height": 2000})
    page.set_default_timeout(120_000)
    try:
        hold("m0._.filler", mig_profile="2g.20gb")
        hub.start_server(user, options={"gpus": 1})
        hub.wait_ready(user, timeout=300)
        log_in(page, hub.hub_url, user, hub.password)
        page.wait_for_url(f"**/user/{user}/**", timeout=120_000)
        put = hub.user_request(
            hub.token_for(user),
            "PUT",
            user,
            "api/contents/ds01-widgets.ipynb",
            json={"type": "notebook", "format": "json", "content": notebook_of(CELLS)},
        )
        assert put.status_code in (200, 201), put.text
        page.goto(hub.user_url(user, path="lab/tree/ds01-widgets.ipynb"))
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
        run_all_cells(page, ".ds01-image-builder .ds01-build")

        # The panel: the user's GPU (slot and name), the free slots, "unlimited" CPUs.
        page.locator(".ds01-quota-panel table.ds01-limits").wait_for()
        in_use, free = _allocator_says(ds01, allocator, user)
        rows = _panel_rows(page)
        assert rows["GPUs"][0] == in_use
        assert rows["GPUs free now"][0] == free
        assert load_limits(ds01.limits_path).resolve(user, ["students"]).max_cpus is None
        assert rows["CPUs per container"] == ["", "unlimited"]
        assert "None" not in page.locator(".ds01-quota-panel").inner_text()
        screenshot = tmp_path / "quota-panel.png"
        page.screenshot(path=str(screenshot), full_page=True)
        assert screenshot.stat().st_size > 0

        # Someone takes another whole GPU: Refresh shows the allocator's new count.
        hold("w0._.filler", whole_gpu=True)
        _, free_now = _allocator_says(ds01, allocator, user)
        assert free_now != free
        page.locator(".ds01-quota-panel button", has_text="Refresh").click()
        wait_until(
            lambda: _panel_rows(page).get("GPUs free now") == [free_now, ""],
            60,
            0.5,
            lambda: f"the panel shows {_panel_rows(page)}, the allocator {free_now!r}",
        )

        # The project wizard, in the GPU server.
        wizard = page.locator(".ds01-project-wizard")
        wizard.locator(".ds01-project-name input").fill("gpu-proj")
        for _ in range(3):
            wizard.locator(".ds01-next").click()
        wizard.locator(".ds01-create").click()
        wizard.locator(".ds01-message .ds01-ok").wait_for()
        assert "Project created: gpu-proj/" in wizard.locator(".ds01-message").inner_text()

        # The image builder: the host's one build slot is taken (here), so the build waits in
        # line, deterministically, until Cancel stops it.
        slot_fd = build_slot.take_slot(threading.Event(), lambda: None)
        assert slot_fd is not None
        builder = page.locator(".ds01-image-builder")
        builder.locator(".ds01-image-name input").fill("never")
        builder.locator(".ds01-build").click()
        builder.get_by_text("waiting for a free build slot").wait_for()
        assert builder.locator(".ds01-build").is_disabled()
        builder.locator(".ds01-cancel").click()
        builder.locator(".ds01-build-status", has_text="Build cancelled").wait_for()
        assert builder.locator(".ds01-cancel").is_disabled()
        assert builder.locator(".ds01-build").is_enabled()
        assert docker_client.images.list(filters={"label": f"ds01.image.user={user}"}) == []
        page.screenshot(path=str(tmp_path / "widgets-done.png"), full_page=True)
    except Exception:
        page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
        raise
    finally:
        HostBuildLocks.release(slot_fd)
        page.close()
        for container in held:
            allocator.release(container)
        hub.stop()
