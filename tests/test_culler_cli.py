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
