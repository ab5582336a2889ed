"""The ds01-ops service's registration in a hub config and its command-line traits."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from types import SimpleNamespace

from traitlets.config import Config

from ds01hub.culler import CullWarning, WarningStore
from ds01hub.ops_service import SERVICE_NAME, SERVICE_SCOPES, OpsService, configure_hub


def test_configure_hub_registers_the_service_its_role_and_the_banner_once(tmp_path):
    c = Config()
    c.JupyterHub.services = [{"name": "other", "api_token": "x"}]
    c.JupyterHub.load_roles = [{"name": "other", "scopes": ["read:users"]}]
    for _ in range(2):  # idempotent: a second call replaces, never duplicates
        configure_hub(
            c,
            url="http://127.0.0.1:9999",
            state_dir=tmp_path,
            service_args=["--OpsService.interval=60"],
        )
    services = {s["name"]: s for s in c.JupyterHub.services}
    assert set(services) == {"other", SERVICE_NAME}
    ops = services[SERVICE_NAME]
    assert ops["url"] == "http://127.0.0.1:9999"
    assert ops["command"] == [
        sys.executable,
        "-m",
        "ds01hub.ops_service",
        f"--OpsService.state_dir={tmp_path}",
        "--OpsService.interval=60",
    ]
    roles = {r["name"]: r for r in c.JupyterHub.load_roles}
    assert roles[SERVICE_NAME] == {
        "name": SERVICE_NAME,
        "services": [SERVICE_NAME],
        "scopes": SERVICE_SCOPES,
    }
    assert "admin:users" not in SERVICE_SCOPES  # it stops servers; it never edits users

    announcement = c.JupyterHub.template_vars.get_value({})["announcement"]  # lazy: merged
    soon = datetime.now(UTC)
    WarningStore(tmp_path).save(
        [CullWarning("eve", "<b>x</b>", "c", "idle", "idle 2h", soon, soon, soon)]
    )
    assert "will be stopped" in announcement(SimpleNamespace(name="eve"))
    assert "&lt;b&gt;x&lt;/b&gt;" in announcement(SimpleNamespace(name="eve"))  # escaped
    assert announcement(SimpleNamespace(name="mallory")) == ""
    assert announcement(None) == ""  # logged out


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
