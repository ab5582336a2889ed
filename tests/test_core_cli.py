"""`ds01hub limits | check-config | gpus | status`, run as the installed command."""

import csv
import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from ds01hub import labels, provenance

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).parent.parent
# This checkout's command (the venv running the tests), never another install on PATH.
DS01HUB = str(Path(sys.executable).with_name("ds01hub"))


def run(*args, env=None):
    environment = {k: v for k, v in os.environ.items() if k != "DS01HUB_LIMITS"}
    environment.update(env or {})
    return subprocess.run(
        [DS01HUB, *map(str, args)], capture_output=True, text=True, env=environment, timeout=60
    )


def test_limits_prints_the_resolved_table():
    result = run("limits", "henry", "--limits", FIXTURES / "limits-thesis-override.yaml")
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines())
    fields = {k.strip(): v.strip() for k, v in lines.items()}
    for label in (
        "User",
        "Group",
        "Priority",
        "Max GPUs",
        "Max CPUs",
        "Memory",
        "Shared Memory",
        "Max Containers",
        "Idle Timeout",
        "GPU Hold After Stop",
        "Container Hold After Stop",
    ):
        assert label in fields
    assert fields["Priority"] == "100" and fields["Memory"] == "96g"
    assert fields["GPU Hold After Stop"] == "3d" and fields["Reason"].startswith("Thesis")
    assert "\x1b[" not in result.stdout  # no colour when not a TTY


def test_limits_json_and_docker_args_and_groups_from_the_caller():
    config = FIXTURES / "limits-university.yaml"
    as_json = json.loads(
        run("limits", "zoe", "--group", "faculty", "--limits", config, "--json").stdout
    )
    assert as_json["group"] == "faculty" and as_json["idle_timeout"] is None
    assert as_json["memory"] == 128 << 30
    args = run("limits", "ana", "--docker-args", "--limits", config).stdout.split()
    assert args == ["--cpus=4", "--memory=16g", "--memory-swap=16g", "--shm-size=4g"]


def test_limits_file_from_the_environment():
    env = {"DS01HUB_LIMITS": str(FIXTURES / "limits-small-lab.yaml")}
    result = run("limits", "s07", "--json", env=env)
    assert json.loads(result.stdout)["group"] == "students"


def test_check_config_exit_codes_and_messages():
    good = run("check-config", FIXTURES / "limits-ds01-production.yaml")
    assert good.returncode == 0 and good.stdout.startswith("OK ")
    assert "storage_workspace: DS01 key accepted but not enforced" in good.stdout
    bad = run("check-config", FIXTURES / "limits-broken.yaml")
    assert bad.returncode == 1
    assert (
        "defaults.memroy: unknown key (found 'memroy'). Fix: did you mean 'memory'?" in bad.stdout
    )
    report = json.loads(run("check-config", FIXTURES / "limits-broken.yaml", "--json").stdout)
    assert report["valid"] is False and len(report["problems"]) == 7
    missing = run("check-config", "/nonexistent/limits.yaml")
    assert missing.returncode == 1 and "file not found" in missing.stdout


def test_broken_limits_fail_other_commands_with_a_hint():
    result = run("limits", "x", "--limits", FIXTURES / "limits-broken.yaml")
    assert result.returncode == 1
    assert "7 problems" in result.stderr and "ds01hub check-config" in result.stderr


def test_usage_errors_exit_2():
    assert run("limits").returncode == 2
    assert run("limits", "x", "--json", "--docker-args").returncode == 2


def test_gpus_shows_the_simulated_inventory():
    config = REPO / "config" / "resource-limits.yaml"
    data = json.loads(run("gpus", "--json", "--limits", config).stdout)
    assert data["simulated"] is True
    assert [s["id"] for s in data["slots"]] == ["0", "1", "2:0", "2:1", "2:2"]
    assert {s["profile"] for s in data["slots"][2:]} == {"2g.20gb"}
    text = run("gpus", "--limits", config).stdout
    assert text.startswith("SIMULATED inventory: 3 GPU(s), 5 slot(s)")
    assert "2:1   2g.20gb" in text and "(simulated)" in text


def test_gpus_without_nvidia_and_without_a_limits_file_says_why(tmp_path):
    result = run("gpus", "--json", env={"DS01HUB_LIMITS": ""})
    assert result.returncode == 0
    data = json.loads(result.stdout)
    if not data["gpus"]:
        assert data["reason"].startswith("NVML unavailable")


@pytest.mark.docker
def test_status_shows_holders_ghosts_and_conflicts(tmp_path, docker_client, base_image):
    config = tmp_path / "limits.yaml"
    config.write_text("gpu_allocation:\n  simulate: {gpus: 8, seed: status-test}\n")
    run_label = f"ds01.test.status={uuid.uuid4().hex[:8]}"
    key, _, value = run_label.partition("=")
    trust = provenance.load(tmp_path / "state")

    def container(name, user, slot, command):
        managed = labels.container_labels(
            user=user, project=name, group=None, priority=10, gpus=[slot]
        )
        full_name = f"{name}-{value}._.{user}"
        return docker_client.containers.create(
            base_image,
            command,
            name=full_name,
            labels={**trust.sign(managed, full_name), "ds01.test": "1", key: value},
        )

    status = ("status", "--limits", config, "--state-dir", tmp_path / "state", "--label", run_label)
    made = [
        container("ran", "grace", "7", ["true"]),  # ran and stopped: holds for its hold
        container("ghost", "gil", "6", ["true"]),  # never started, nothing claims it
    ]
    try:
        made[0].start()
        made[0].wait(timeout=60)
        result = run(*status, "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        rows = {row["slot"]: row for row in report["slots"]}
        assert len(rows) == 8 and report["conflicts"] == [] and report["revoked"] == []
        assert rows["7"]["user"] == "grace" and rows["7"]["container"] == made[0].name
        assert rows["7"]["state"] == "stopped" and rows["7"]["held_until"]
        assert rows["6"]["user"] is None  # a ghost holds nothing
        assert [g["name"] for g in report["ghosts"]] == [made[1].name]
        text = run(*status).stdout
        assert text.startswith(f"deployment {trust.deployment}\nSIMULATED GPUs")
        assert any(line.startswith("7 ") and "grace" in line for line in text.splitlines())
        assert f"ghost: {made[1].name} (gil)" in text

        reconciled = run(*status, "--reconcile", "--json")
        assert reconciled.returncode == 0, reconciled.stderr
        [action] = json.loads(reconciled.stdout)["reconciled"]
        assert action["container"] == made[1].name and action["slots"] == ["6"]
        assert not docker_client.containers.list(all=True, filters={"name": made[1].name})
        made.pop()

        for user in ("xena", "yann"):  # two started behind the allocator's back on slot 5
            made.append(container("both", user, "5", ["sleep", "60"]))
            made[-1].start()
        result = run(*status)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "CONFLICT: slot 5 is held by more than one container" in result.stdout
        assert all(c.name in result.stdout for c in made[-2:])
    finally:
        for item in made:
            item.remove(force=True)


def test_status_shows_who_holds_which_slot_in_its_own_deployment_only(
    tmp_path, docker_client, base_image
):
    """Two deployments (state directories) on one engine, and a container that only claims a
    slot (as an image's labels or a build step would): each status sees its own holder only;
    --all-deployments shows the others as claims."""
    config = tmp_path / "limits.yaml"
    config.write_text("gpu_allocation:\n  simulate: {gpus: 8, seed: status-test}\n")
    ours, theirs = provenance.load(tmp_path / "state"), provenance.load(tmp_path / "other")
    run_id = uuid.uuid4().hex[:8]

    def create(user: str, slot: str, trust=None, command=("sleep", "60")):
        name = f"status-{run_id}._.{user}"
        found = labels.container_labels(
            user=user, project="status", group=None, priority=10, gpus=[slot]
        )
        found = trust.sign(found, name) if trust else found | {"ds01.deployment": ours.deployment}
        return docker_client.containers.create(
            base_image, list(command), name=name, labels=found | {"ds01.test": "1"}
        )

    made = [
        create("grace", "7", ours, ["true"]),
        create("heidi", "6", theirs, ["true"]),
        create("mallory", "5"),
    ]
    try:
        for started in made[:2]:  # they ran and stopped: each holds for its hold (in its own
            started.start()  # deployment; a never-started container holds nothing)
            started.wait(timeout=60)
        result = run("status", "--json", "--limits", config, "--state-dir", tmp_path / "state")
        assert result.returncode == 0, result.stderr
        found = json.loads(result.stdout)
        rows = {row["slot"]: row for row in found["slots"]}
        assert len(rows) == 8 and found["deployment"] == ours.deployment
        assert rows["7"]["user"] == "grace" and rows["7"]["container"] == made[0].name
        assert rows["7"]["state"] == "stopped" and rows["7"]["held_until"]
        assert rows["6"]["user"] is None and rows["5"]["user"] is None
        assert found["revoked"] == [] and "other_claims" not in found
        text = run("status", "--limits", config, "--state-dir", tmp_path / "state").stdout
        assert text.startswith(f"deployment {ours.deployment}\nSIMULATED GPUs")
        assert any(line.startswith("7 ") and "grace" in line for line in text.splitlines())
        theirs_view = run("status", "--json", "--limits", config, "--state-dir", tmp_path / "other")
        rows = {row["slot"]: row for row in json.loads(theirs_view.stdout)["slots"]}
        assert rows["6"]["user"] == "heidi" and rows["7"]["user"] is None

        every = run(
            "status",
            "--json",
            "--all-deployments",
            "--limits",
            config,
            "--state-dir",
            tmp_path / "state",
        )
        claims = {c["container"]: c for c in json.loads(every.stdout)["other_claims"]}
        assert claims[made[1].name]["verdict"] == "other deployment"
        assert claims[made[1].name]["deployment"] == theirs.deployment
        assert claims[made[2].name]["verdict"] == "unsigned or forged"
        assert claims[made[2].name]["claimed_user"] == "mallory"
        assert made[0].name not in claims
        text = run(
            "status", "--all-deployments", "--limits", config, "--state-dir", tmp_path / "state"
        ).stdout
        assert "not this deployment's" in text and "unsigned or forged" in text
    finally:
        for container in made:
            container.remove(force=True)


def test_usage_reports_gpu_hours_from_the_event_log(tmp_path):
    from datetime import UTC, datetime, timedelta

    from ds01hub.gpu.eventlog import EventLog

    start = datetime.now(UTC) - timedelta(hours=10)
    log = EventLog(tmp_path / "events.db")
    log.record("allocate", "alice", slot="0", container="a", group="lab", at=start)
    log.record(
        "release", "alice", slot="0", container="a", group="lab", at=start + timedelta(hours=3)
    )
    log.record("allocate", "bob", slot="1", container="b", group="lab", at=start)
    log.record(
        "release", "bob", slot="1", container="b", group="lab", at=start + timedelta(hours=1)
    )
    data = json.loads(run("usage", "--state-dir", tmp_path, "--json").stdout)
    assert data["gpu_hours"] == {"alice": 3.0, "bob": 1.0}
    by_group = json.loads(run("usage", "--by", "group", "--state-dir", tmp_path, "--json").stdout)
    assert by_group["gpu_hours"] == {"lab": 4.0}
    text = run("usage", "--state-dir", tmp_path).stdout.splitlines()
    assert text[0].split() == ["USER", "GPU-HOURS"] and text[1].split() == ["alice", "3.00"]
    future = run("usage", "--since", "2999-01-01", "--state-dir", tmp_path)
    assert future.returncode == 0 and future.stdout.startswith("no GPU time recorded")
    assert run("usage", "--since", "yesterday", "--state-dir", tmp_path).returncode == 2
    log.record("allocate", "=cmd|x", slot="2", container="c", at=start)
    log.record("release", "=cmd|x", slot="2", container="c", at=start + timedelta(hours=2))
    table = run("usage", "--state-dir", tmp_path, "--csv").stdout
    rows = list(csv.reader(io.StringIO(table)))
    assert rows == [
        ["user", "gpu_hours"],
        ["alice", "3.0000"],
        ["'=cmd|x", "2.0000"],  # shown as text in a spreadsheet, never run
        ["bob", "1.0000"],
    ]
    assert run("usage", "--csv", "--json", "--state-dir", tmp_path).returncode == 2
    missing = run("usage", "--state-dir", tmp_path / "nowhere")
    assert missing.returncode == 1 and "no event log" in missing.stderr


def test_fairshare_shows_usage_factor_and_effective_priority(tmp_path):
    from datetime import UTC, datetime, timedelta

    from ds01hub.gpu.eventlog import EventLog

    limits = tmp_path / "limits.yaml"
    limits.write_text(
        "defaults: {priority: 20}\n"
        "groups:\n  lab: {members: [alice, bob], priority: 30}\n"
        "gpu_allocation:\n  fairshare: {half_life: 7d, weight: 10}\n"
    )
    start = datetime.now(UTC) - timedelta(hours=10)
    log = EventLog(tmp_path / "events.db")
    for user, hours in (("alice", 6), ("bob", 1), ("carol", 3)):
        group = None if user == "carol" else "lab"
        log.record("allocate", user, slot="0", container=user, group=group, at=start)
        end = start + timedelta(hours=hours)
        log.record("release", user, slot="0", container=user, group=group, at=end)
    result = run("fairshare", "--limits", limits, "--state-dir", tmp_path, "--json")
    data = json.loads(result.stdout)
    assert data["enabled"] and data["weight"] == 10
    users = {row["user"]: row for row in data["users"]}
    assert [row["user"] for row in data["users"]] == ["bob", "carol", "alice"]  # by factor
    assert users["alice"]["priority"] == 30 and users["carol"]["priority"] == 20
    assert users["bob"]["factor"] > users["alice"]["factor"]
    assert users["alice"]["effective"] == pytest.approx(30 + 10 * users["alice"]["factor"], 1e-3)
    text = run("fairshare", "--limits", limits, "--state-dir", tmp_path).stdout.splitlines()
    assert text[0].split()[:2] == ["USER", "GROUP"] and text[1].split()[:2] == ["bob", "lab"]
    limits.write_text("defaults: {priority: 20}\n")
    off = run("fairshare", "--limits", limits, "--state-dir", tmp_path)
    assert off.returncode == 0 and off.stdout.startswith("fair share is off")
    missing = run("fairshare", "--limits", limits, "--state-dir", tmp_path / "nowhere")
    assert missing.returncode == 1 and "no event log" in missing.stderr
