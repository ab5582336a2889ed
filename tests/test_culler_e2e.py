"""The culler against a real JupyterHub, real containers and the SIMULATED NVML whose
utilisation and processes the test controls; time moves by an injected clock.

The hub spawns plain DockerSpawner containers; a pre-spawn hook gives them the ds01 labels the
DS01Spawner would (user, project, group, and the GPU slots named in the spawn options), so the
culler finds them exactly as in production."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from harness import unique_name

from ds01hub.culler import Culler, pending_warnings
from ds01hub.eventlog import EventLog
from ds01hub.hubclient import HubClient
from ds01hub.inventory import discover
from ds01hub.limits import SimulatedGpuSpec, parse_limits
from ds01hub.simulated_nvml import SimulatedNvml

pytestmark = [pytest.mark.e2e, pytest.mark.docker]

LABEL_HOOK = """
from ds01hub import labels as _labels

def _ds01_labels(spawner):
    slots = str((spawner.user_options or {}).get("slots", ""))
    kwargs = dict(spawner.extra_create_kwargs)
    kwargs["labels"] = {
        **kwargs.get("labels", {}),
        **_labels.container_labels(
            user=spawner.user.name, project=spawner.name or None, group="students",
            priority=10, gpus=[s for s in slots.split(",") if s],
        ),
    }
    spawner.extra_create_kwargs = kwargs

c.Spawner.pre_spawn_hook = _ds01_labels
"""


class Clock:
    """The real time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


@pytest.fixture(scope="module")
def lab(hub_factory, docker_client):
    """One hub, four running servers: idle (GPU 2), busy (GPU 0 utilisation), training
    (a compute process on GPU 1) and forever (idle_timeout null)."""
    hub = hub_factory(extra_config=LABEL_HOOK)
    users = {role: unique_name(role[:4]) for role in ("idle", "busy", "training", "forever")}
    slots = {"idle": "2", "busy": "0", "training": "1", "forever": ""}
    for role, name in users.items():
        hub.create_user(name)
        hub.start_server(name, options={"slots": slots[role]})
    containers = {}
    for role, name in users.items():
        hub.wait_ready(name)
        (containers[role],) = docker_client.containers.list(
            filters={"label": [f"ds01.user={name}", f"ds01.test.hub={hub.hub_id}"]}
        )
    yield hub, users, containers
    hub.stop()


def make_culler(hub, docker_client, users, tmp_path, clock):
    nvml = SimulatedNvml([SimulatedGpuSpec(), SimulatedGpuSpec(), SimulatedGpuSpec()])
    inventory = discover(nvml, simulated=True)
    limits = parse_limits(
        {
            "defaults": {"idle_timeout": "1h"},
            "user_overrides": {users["forever"]: {"idle_timeout": None}},
        }
    )
    culler = Culler(
        HubClient(f"{hub.url}/hub/api", hub.admin_token),
        docker_client,
        inventory,
        limits,
        eventlog=EventLog(tmp_path / "events.sqlite"),
        state_dir=tmp_path,
        warn_before=600,
        gpu_samples=3,
        gpu_sample_interval=0.05,
        extra_labels=[f"ds01.test.hub={hub.hub_id}"],
        clock=clock,
    )
    return culler, nvml


def verdicts(report) -> dict[str, tuple[str, str]]:
    return {line.user: (line.verdict.action, line.verdict.code) for line in report.servers}


def read_in_container(container, path: str) -> str:
    result = container.exec_run(["cat", path])
    return result.output.decode() if result.exit_code == 0 else ""


async def test_an_idle_server_is_warned_then_culled_after_its_timeout(lab, docker_client, tmp_path):
    hub, users, containers = lab
    idle = users["idle"]
    clock = Clock()
    culler, nvml = make_culler(hub, docker_client, users, tmp_path, clock)
    nvml.set_utilization("0", 90)
    nvml.add_process("1", containers["training"].attrs["State"]["Pid"])
    # A process of *another* container on GPU 2 does not make the idle container busy.
    nvml.add_process("2", containers["forever"].attrs["State"]["Pid"])

    clock.offset = timedelta(minutes=40)  # well inside the hour: not even sampled
    assert verdicts(await culler.run_once())[idle] == ("keep", "active")

    clock.offset = timedelta(hours=1, minutes=1)
    dry = await culler.run_once(dry_run=True)
    assert verdicts(dry)[idle] == ("warn", "idle")
    assert pending_warnings(idle, tmp_path) == []  # a dry run changes nothing

    first = await culler.run_once()
    assert verdicts(first)[idle] == ("warn", "idle")
    (warning,) = pending_warnings(idle, tmp_path)
    assert warning.cull_at == first.at + timedelta(seconds=600)
    assert "will be stopped" in read_in_container(
        containers["idle"], "/tmp/ds01hub/cull-warning.txt"
    )

    clock.offset += timedelta(minutes=5)  # the warning has not stood its 10 minutes yet
    assert verdicts(await culler.run_once())[idle] == ("keep", "warned")

    clock.offset += timedelta(minutes=6)
    assert verdicts(await culler.run_once(dry_run=True))[idle] == ("cull", "idle")
    assert hub.server(idle)["ready"]  # the dry run left it running

    report = await culler.run_once()
    assert verdicts(report)[idle] == ("cull", "idle")
    deadline = time.monotonic() + 60
    while hub.server(idle) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert hub.server(idle) is None
    containers["idle"].reload()
    assert containers["idle"].status == "exited"  # stopped, kept: its holds run their course
    (cull,) = EventLog(tmp_path / "events.sqlite").events(kind="cull", user=idle)
    assert cull.user == idle and cull.container == containers["idle"].name
    assert cull.reason.startswith("idle: no hub activity for 1h")
    assert pending_warnings(idle, tmp_path) == []
    for role in ("busy", "training", "forever"):
        assert hub.server(users[role])["ready"], role


async def test_busy_gpu_training_and_null_timeout_servers_are_never_culled(
    lab, docker_client, tmp_path
):
    hub, users, containers = lab
    clock = Clock()
    culler, nvml = make_culler(hub, docker_client, users, tmp_path, clock)
    nvml.set_utilization("0", 90)
    nvml.add_process("1", containers["training"].attrs["State"]["Pid"])
    for hours in (2, 30, 400):  # no browser open for hours, days, weeks
        clock.offset = timedelta(hours=hours)
        report = await culler.run_once()
        got = verdicts(report)
        assert got[users["busy"]] == ("keep", "busy"), report.to_dict()
        assert got[users["training"]] == ("keep", "busy"), report.to_dict()
        assert got[users["forever"]] == ("keep", "never"), report.to_dict()
    reasons = {line.user: line.verdict.reason for line in report.servers}
    assert "GPU 0 at 90%" in reasons[users["busy"]]
    assert "compute process(es) on GPU 1" in reasons[users["training"]]
    for role in ("busy", "training", "forever"):
        assert hub.server(users[role])["ready"], role
    culled = {event.user for event in EventLog(tmp_path / "events.sqlite").events(kind="cull")}
    assert culled.isdisjoint({users["busy"], users["training"], users["forever"]})
