"""The ds01-ops service's registration in a hub config and its command-line traits."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from types import SimpleNamespace

from traitlets.config import Config

from ds01hub.cli.admin import report_lines
from ds01hub.hub.services import OPS_SCOPES, OPS_SERVICE, configure_ops
from ds01hub.services.ops.app import OpsService
from ds01hub.services.ops.culler import PassReport, ServerReport, Verdict
from ds01hub.services.ops.lifecycle import LifecycleAction
from ds01hub.services.ops.warnings import CullWarning, WarningStore


def test_configure_hub_registers_the_service_its_role_and_the_banner_once(tmp_path):
    c = Config()
    c.JupyterHub.services = [{"name": "other", "api_token": "x"}]
    c.JupyterHub.load_roles = [{"name": "other", "scopes": ["read:users"]}]
    for _ in range(2):  # idempotent: a second call replaces, never duplicates
        configure_ops(
            c,
            url="http://127.0.0.1:9999",
            state_dir=tmp_path,
            service_args=["--OpsService.interval=60"],
        )
    services = {s["name"]: s for s in c.JupyterHub.services}
    assert set(services) == {"other", OPS_SERVICE}
    ops = services[OPS_SERVICE]
    assert ops["url"] == "http://127.0.0.1:9999"
    assert ops["command"] == [
        sys.executable,
        "-m",
        "ds01hub.services.ops",
        f"--OpsService.state_dir={tmp_path}",
        "--OpsService.interval=60",
    ]
    roles = {r["name"]: r for r in c.JupyterHub.load_roles}
    assert roles[OPS_SERVICE] == {
        "name": OPS_SERVICE,
        "services": [OPS_SERVICE],
        "scopes": OPS_SCOPES,
    }
    assert "admin:users" not in OPS_SCOPES  # it stops servers; it never edits users

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


def test_a_pass_prints_as_a_table_with_lifecycle_actions_and_errors():
    at = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
    warned = CullWarning("eve", "", "default._.eve", "idle", "idle 2h", at, at, at)
    report = PassReport(
        at,
        dry_run=True,
        servers=[
            ServerReport("eve", "", "default._.eve", Verdict("warn", "idle", "idle 2h", warned)),
            ServerReport("bob", "train", "train._.bob", Verdict("keep", "busy", "GPU 0 at 90%")),
        ],
        lifecycle=[LifecycleAction("remove", "old", "x._.old", "id", None, (), at, "removed: 48h")],
        errors=["y._.zed: 403 forbidden"],
    )
    lines = report_lines(report)
    assert lines[0] == "DRY RUN: cull pass at 2026-03-02 12:00:00 UTC"
    table = lines[1].splitlines()
    assert table[0].split() == ["USER", "PROJECT", "ACTION", "WHY", "CULL", "AT"]
    assert table[1].split()[:3] == ["eve", "default", "warn"] and at.isoformat() in table[1]
    assert table[2].split()[:3] == ["bob", "train", "keep"]
    assert lines[2:] == ["remove: x._.old (old): removed: 48h", "error: y._.zed: 403 forbidden"]
    assert "\x1b[" not in "\n".join(lines)  # no colour unless asked
    empty = PassReport(at, dry_run=False)
    assert report_lines(empty)[1] == "no running servers"
