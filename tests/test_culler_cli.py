"""`ds01hub cull` as an admin runs it: the real command against a real hub and containers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import unique_name, wait_until
from test_culler_e2e import LABEL_HOOK

from ds01hub.gpu.eventlog import EventLog

DS01HUB = str(Path(sys.executable).with_name("ds01hub"))


def cull(*args: str, token: str = "", cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTERHUB_")}
    if token:
        env["JUPYTERHUB_API_TOKEN"] = token
    return subprocess.run(
        [DS01HUB, "cull", *args], capture_output=True, text=True, env=env, timeout=120, cwd=cwd
    )


def test_usage_errors_exit_2_and_a_missing_token_says_how_to_fix_it(tmp_path):
    assert cull("--interval", "soon").returncode == 2
    missing = cull("--once", "--limits", str(tmp_path / "none.yaml"))
    assert missing.returncode == 1
    assert "no hub API token" in missing.stderr and "JUPYTERHUB_API_TOKEN" in missing.stderr


def test_cull_is_the_ops_service_with_its_settings_and_no_copies_of_them():
    """`ds01hub cull` declares only what a shell needs (--once, --json, the hub URL and token);
    every culling setting is the ds01-ops service's, set by the same option."""
    from traitlets.config import Application

    from ds01hub.cli.admin import CullCommand
    from ds01hub.services.ops.app import OpsService

    service = set(OpsService.class_traits(config=True)) - set(Application.class_traits(config=True))
    assert set(CullCommand.class_own_traits(config=True)) == {
        "once",
        "json",
        "hub_api",
        "token_file",
    }
    app = CullCommand()
    app.initialize(
        ["--once", "--label=a=b", "--label", "c=d", "--gpu-threshold", "7", "--cpu-threshold=2"]
        + ["--gpu-samples=5", "--gpu-sample-interval=0.5", "--keep-stopped", "--warn-before=0"]
    )
    assert (app.extra_labels, app.gpu_threshold, app.cpu_threshold) == (["a=b", "c=d"], 7, 2)
    assert (app.gpu_samples, app.gpu_sample_interval, app.remove_stopped) == (5, 0.5, False)
    assert app.warn_before == 0 and app.once
    aliased = {target.split(".")[1] for target in CullCommand.aliases.values()}
    flagged = {k for config, _ in CullCommand.flags.values() for k in config.get("OpsService", {})}
    assert service <= aliased | flagged  # every setting of the service has its option


@pytest.mark.e2e
@pytest.mark.docker
def test_cull_once_dry_run_reports_and_a_real_pass_culls(hub_factory, tmp_path):
    hub = hub_factory(extra_config=LABEL_HOOK)
    user = unique_name("cli")
    hub.create_user(user)
    hub.start_server(user)
    hub.wait_ready(user)
    limits = tmp_path / "limits.yaml"
    limits.write_text("defaults:\n  idle_timeout: 1s\n")
    common = [
        "--once",
        "--json",
        "--warn-before=0",
        f"--limits={limits}",
        f"--state-dir={hub.state_dir}",  # the hub's: its label key signed the container
        f"--hub-api={hub.url}/hub/api",
        f"--label=ds01.test.hub={hub.hub_id}",
    ]
    time.sleep(2)  # idle for longer than the 1 s timeout

    dry = cull(*common, "--dry-run", token=hub.admin_token)
    assert dry.returncode == 0, dry.stderr
    report = json.loads(dry.stdout)
    assert report["dry_run"] is True
    (line,) = [s for s in report["servers"] if s["user"] == user]
    assert (line["action"], line["code"], line["project"]) == ("cull", "idle", "default")
    assert hub.server(user)["ready"]  # nothing done

    text = cull(*[a for a in common if a != "--json"], "--dry-run", token=hub.admin_token)
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("DRY RUN: cull pass at")
    (row,) = [line for line in text.stdout.splitlines() if line.startswith(user)]
    assert row.split()[1:3] == ["default", "cull"]

    real = cull(*common, token=hub.admin_token)
    assert real.returncode == 0, real.stderr
    assert [s["action"] for s in json.loads(real.stdout)["servers"] if s["user"] == user] == [
        "cull"
    ]
    wait_until(lambda: hub.server(user) is None, 60, 0.5, hub.log)
    (event,) = EventLog(hub.state_dir / "events.db").events(kind="cull", user=user)
    assert event.reason.startswith("idle:")

    refused = cull(*common, token="not-a-token")
    assert refused.returncode == 1 and "the hub refused" in refused.stderr
