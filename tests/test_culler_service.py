"""The ds01-ops service's registration in a hub config and its command-line traits."""

from __future__ import annotations

import sys

from traitlets.config import Config

from ds01hub.ops_service import SERVICE_NAME, SERVICE_SCOPES, OpsService, configure_hub


def test_configure_hub_registers_the_service_and_its_role_once():
    c = Config()
    c.JupyterHub.services = [{"name": "other", "api_token": "x"}]
    c.JupyterHub.load_roles = [{"name": "other", "scopes": ["read:users"]}]
    for _ in range(2):  # idempotent: a second call replaces, never duplicates
        configure_hub(c, url="http://127.0.0.1:9999", service_args=["--OpsService.interval=60"])
    services = {s["name"]: s for s in c.JupyterHub.services}
    assert set(services) == {"other", SERVICE_NAME}
    ops = services[SERVICE_NAME]
    assert ops["url"] == "http://127.0.0.1:9999"
    assert ops["command"] == [
        sys.executable,
        "-m",
        "ds01hub.ops_service",
        "--OpsService.interval=60",
    ]
    roles = {r["name"]: r for r in c.JupyterHub.load_roles}
    assert roles[SERVICE_NAME] == {
        "name": SERVICE_NAME,
        "services": [SERVICE_NAME],
        "scopes": SERVICE_SCOPES,
    }
    assert "admin:users" not in SERVICE_SCOPES  # it stops servers; it never edits users


def test_service_traits_come_from_the_command_line():
    app = OpsService()
    app.initialize(
        [
            "--OpsService.interval=60",
            "--OpsService.extra_labels=ds01.test.hub=abc",
            "--dry-run",
            "--warn-before=30",
        ]
    )
    assert (app.interval, app.warn_before, app.dry_run) == (60.0, 30.0, True)
    assert app.extra_labels == ["ds01.test.hub=abc"]
    assert app.log_level == 20  # INFO: culls and removals are logged
