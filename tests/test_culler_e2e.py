"""The culler against a real JupyterHub, real containers and the SIMULATED NVML whose
utilisation and processes the test controls; time moves by an injected clock.

Most tests spawn plain DockerSpawner containers, which a pre-spawn hook labels as DS01Spawner
would (user, project, group, the GPU slots named in the spawn options), so that the test picks
each container's slots; the last one runs the real DS01Spawner end to end."""

from __future__ import annotations

import io
import tarfile
import time
from datetime import UTC, datetime, timedelta

import pytest
from harness import free_port, unique_name, wait_until
from prometheus_client import CollectorRegistry

from ds01hub import labels, provenance
from ds01hub.gpu.eventlog import EventLog
from ds01hub.gpu.inventory import discover
from ds01hub.gpu.simulated_nvml import SimulatedNvml
from ds01hub.hub.client import HubClient
from ds01hub.limits import SimulatedGpuSpec, parse_limits
from ds01hub.services.ops.culler import Culler
from ds01hub.services.ops.warnings import pending_warnings

pytestmark = [pytest.mark.e2e, pytest.mark.docker]

LABEL_HOOK = """
from ds01hub import labels as _labels, provenance as _provenance

def _ds01_labels(spawner):
    slots = str((spawner.user_options or {}).get("slots", ""))
    kwargs = dict(spawner.extra_create_kwargs)
    own = _labels.container_labels(
        user=spawner.user.name, project=spawner.name or None, group="students",
        priority=10, gpus=[s for s in slots.split(",") if s],
    )
    # signed as DS01Spawner signs, with the hub's key ($DS01HUB_STATE_DIR)
    signed = _provenance.load().sign(own, spawner.object_name)
    kwargs["labels"] = {**kwargs.get("labels", {}), **signed}
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
        trust=provenance.load(hub.state_dir),
    )
    return culler, nvml


def verdicts(report) -> dict[str, tuple[str, str]]:
    return {line.user: (line.verdict.action, line.verdict.code) for line in report.servers}


def read_in_container(container, path: str) -> str:
    """A file's text from a container, running or stopped (through Docker's archive API)."""
    stream, _ = container.get_archive(path)
    with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
        return tar.extractfile(tar.getmembers()[0]).read().decode()


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
    wait_until(lambda: hub.server(idle) is None, 60, 0.5, hub.log)
    containers["idle"].reload()
    assert containers["idle"].status == "exited"  # stopped, kept: its holds run their course
    assert read_in_container(containers["idle"], "/tmp/ds01hub/cull-warning.txt") == ""
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


DS01_LIMITS = """\
defaults: {{max_gpus: 1, memory: 512m, idle_timeout: 1h, gpu_hold_after_stop: 6h}}
user_overrides:
  {forever}: {{idle_timeout: null}}
groups:
  students: {{members: [{trainer}, {forever}], priority: 10}}
gpu_allocation:
  simulate:
    seed: {seed}
    gpus:
      - {{name: NVIDIA A100-SXM4-80GB, memory: 80g, count: 2}}
"""


async def test_with_the_ds01_spawner_a_gpu_server_is_culled_only_once_its_gpu_is_idle(
    hub_factory, docker_client, tmp_path
):
    """The whole chain: DS01Spawner allocates a (SIMULATED) GPU and labels the container, the
    culler keeps it while the GPU is busy, culls it when idle, the lifecycle pass records the
    hold's expiry; all in the spawner's own state directory and event log."""
    from ds01hub.gpu.inventory import load_inventory
    from ds01hub.limits import load_limits
    from ds01hub.services.ops.app import build_components
    from ds01hub.services.ops.metrics import StateCollector

    trainer, forever, tag = unique_name("trn"), unique_name("for"), unique_name("cu")
    limits_path, state_dir = tmp_path / "limits.yaml", tmp_path / "state"
    limits_path.write_text(DS01_LIMITS.format(trainer=trainer, forever=forever, seed=tag))
    label = f"ds01.test.culler={tag}"
    config = f"""
c.DS01Spawner.limits_path = {str(limits_path)!r}
c.DS01Spawner.state_dir = {str(state_dir)!r}
c.DS01Spawner.container_label_filter = [{label!r}]
c.Spawner.cmd = ["jupyterhub-singleuser"]
"""
    with hub_factory(config, spawner="ds01", labels={"ds01.test.culler": tag}) as hub:
        for user, options in ((trainer, {"gpus": 1}), (forever, {})):
            hub.create_user(user)
            hub.start_server(user, options=options)
        for user in (trainer, forever):
            hub.wait_ready(user)
        (container,) = docker_client.containers.list(filters={"label": f"ds01.user={trainer}"})
        (slot,) = container.labels["ds01.gpus"].split(",")

        inventory = load_inventory(load_limits(limits_path).gpu_allocation)  # SIMULATED
        clock = Clock()
        parts = build_components(
            HubClient(f"{hub.url}/hub/api", hub.admin_token),
            docker_client,
            limits_path,
            state_dir,
            inventory=inventory,
            extra_labels=[label],
            clock=clock,
            warn_before=0,
            gpu_sample_interval=0.01,
        )
        inventory.nvml.set_utilization(slot, 85)
        clock.offset = timedelta(hours=3)  # nobody at the browser for three hours
        got = verdicts(await parts.culler.run_once())
        assert got == {trainer: ("keep", "busy"), forever: ("keep", "never")}

        inventory.nvml.set_utilization(slot, 0)  # the training run finished
        got = verdicts(await parts.culler.run_once())
        assert got == {trainer: ("cull", "idle"), forever: ("keep", "never")}
        wait_until(lambda: hub.server(trainer) is None, 60, 0.5, hub.log)
        assert hub.server(forever)["ready"]
        parts.allocator.sweep()  # as the next pass would: the stop is recorded as a hold

        # stopped, the container holds its GPU for gpu_hold_after_stop, then the hold expires
        held = {row.slot_id: row.holding for row in parts.allocator.status()}[slot]
        assert (held.user, held.state) == (trainer, "stopped")
        registry = CollectorRegistry()
        registry.register(StateCollector(parts.allocator, parts.eventlog))
        assert registry.get_sample_value("ds01_gpu_slots_held", {"group": "students"}) == 1
        container.reload()
        finished = labels.parse_docker_time(container.attrs["State"]["FinishedAt"])
        clock.offset = finished + timedelta(hours=6, seconds=5) - datetime.now(UTC)
        report = await parts.culler.run_once()
        assert [(a.kind, a.slots) for a in report.lifecycle] == [("expire", (slot,))]
        assert registry.get_sample_value("ds01_gpu_slots_held", {"group": "students"}) is None
        kinds = [e.kind for e in parts.eventlog.events(user=trainer)]
        # the spawner's stop records the hold, the culler its cull once the stop returned
        assert kinds[0] == "allocate" and kinds[-1] == "expire"
        assert sorted(kinds[1:-1]) == ["cull", "hold"]
        assert registry.get_sample_value("ds01_culls_total", {"reason": "idle"}) == 1


async def test_hub_activity_keeps_a_server_and_its_absence_lets_it_go(lab, docker_client, tmp_path):
    """Real time, a 4 s timeout: activity reported to the hub (as the proxy, the single-user
    server and `container-run` do) keeps the server; without it the server goes."""
    hub, _, _ = lab
    user = unique_name("act")
    hub.create_user(user)
    hub.start_server(user)
    hub.wait_ready(user)
    limits = parse_limits(
        {"defaults": {"idle_timeout": None}, "user_overrides": {user: {"idle_timeout": "4s"}}}
    )
    client = HubClient(f"{hub.url}/hub/api", hub.admin_token)
    culler = Culler(
        client,
        docker_client,
        discover(SimulatedNvml([SimulatedGpuSpec()]), simulated=True),
        limits,
        state_dir=tmp_path,
        warn_before=0,
        gpu_sample_interval=0,
        extra_labels=[f"ds01.test.hub={hub.hub_id}"],
        trust=provenance.load(hub.state_dir),
    )
    time.sleep(5)  # longer than the timeout since the spawn...
    await client.record_activity(user, "", datetime.now(UTC).isoformat())  # ...but just used
    assert verdicts(await culler.run_once())[user] == ("keep", "active")
    time.sleep(5)
    assert verdicts(await culler.run_once())[user] == ("cull", "idle")
    wait_until(lambda: hub.server(user) is None, 60, 0.5, hub.log)


async def test_a_cull_the_hub_refuses_is_reported_and_tried_again(lab, docker_client, tmp_path):
    """A token without the `servers` scope cannot stop the server: the pass reports the error,
    keeps the warning, and a later pass with a proper token culls."""
    hub, users, _ = lab
    user, operator = unique_name("ref"), unique_name("opr")
    hub.create_user(user)
    hub.create_user(operator, admin=True)
    hub.start_server(user)
    hub.wait_ready(user)
    read_only = hub.token_for(operator, scopes=["list:users", "read:users", "read:servers"])
    clock = Clock()
    culler, _ = make_culler(hub, docker_client, users, tmp_path, clock)
    culler.limits = parse_limits(
        {"defaults": {"idle_timeout": None}, "user_overrides": {user: {"idle_timeout": "1h"}}}
    )
    culler.hub = HubClient(f"{hub.url}/hub/api", read_only)
    clock.offset = timedelta(hours=2)
    assert verdicts(await culler.run_once())[user] == ("warn", "idle")
    clock.offset += timedelta(minutes=11)
    refused = await culler.run_once()
    assert verdicts(refused)[user] == ("cull", "idle")
    assert len(refused.errors) == 1 and "403" in refused.errors[0]
    assert hub.server(user)["ready"]
    assert [w.user for w in pending_warnings(user, tmp_path)] == [user]  # still stands

    culler.hub = HubClient(f"{hub.url}/hub/api", hub.admin_token)
    report = await culler.run_once()
    assert verdicts(report)[user] == ("cull", "idle") and report.errors == []
    wait_until(lambda: hub.server(user) is None, 60, 0.5, hub.log)
    assert pending_warnings(user, tmp_path) == []


def test_the_managed_service_culls_an_idle_server_by_itself(hub_factory, tmp_path):
    """The deployment's shape: the ds01-ops managed service, started by the hub, culls on its
    own schedule (here every 2 s, a 1 s idle_timeout, no warning lead)."""
    tag = unique_name("svc")
    limits, state = tmp_path / "limits.yaml", tmp_path / "state"
    limits.write_text("defaults:\n  idle_timeout: 1s\n")
    config = LABEL_HOOK + (
        "from ds01hub.hub.services import configure_ops\n"
        f"configure_ops(c, url='http://127.0.0.1:{free_port()}', state_dir={str(state)!r},"
        f" service_args=['--OpsService.limits_path={limits}', '--OpsService.interval=2',"
        f" '--OpsService.warn_before=0', '--OpsService.gpu_sample_interval=0',"
        f" '--OpsService.extra_labels=ds01.test.opsrun={tag}'])\n"
    )
    environment = {"DS01HUB_STATE_DIR": str(state)}  # the label hook signs with the ops' key
    with hub_factory(config, labels={"ds01.test.opsrun": tag}, env=environment) as hub:
        user = unique_name("svu")
        hub.create_user(user)
        hub.start_server(user)
        # No wait_ready: the service may cull the server (1 s timeout) before a poll sees it
        # ready. The cull event below proves it ran and was culled as idle.
        wait_until(lambda: hub.server(user) is None, 90, 0.5, hub.log)
        # The service records the cull once the hub's stop has returned: wait for the event
        # too (reading it at once raced the service's write).
        events = EventLog(state / "events.db")
        (event,) = wait_until(lambda: events.events(kind="cull", user=user), 30, 0.2, hub.log)
        assert event.reason.startswith("idle: no hub activity")
