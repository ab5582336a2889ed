"""Every door that resolves a user's limits sees the hub's group properties (issue 17): the
ds01-ops pass writes the snapshot, and the Docker proxy's limits, the users' quota view,
`ds01hub limits` and `ds01hub fairshare` read it; a bad property or an unbelievable snapshot
refuses (never the looser file-only limits). The real hub + proxy run is
tests/test_limits_doors_e2e.py."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ds01hub import paths, provenance
from ds01hub.actions.names import OperationError
from ds01hub.actions.operations import OperationsContext, UserOperations
from ds01hub.dockerproxy.policy import Denied
from ds01hub.dockerproxy.server import limits_loader
from ds01hub.gpu.eventlog import EventLog
from ds01hub.hub.group_limits import GroupLimits
from ds01hub.hub.group_snapshot import SnapshotError, SnapshotReader, write_snapshot
from ds01hub.limits import EXPIRY_EVENT, parse_group_properties, parse_limits
from ds01hub.peer import Caller
from ds01hub.services.ops.culler import Culler
from ds01hub.units import quota_rows

DS01HUB = str(Path(sys.executable).with_name("ds01hub"))
NOW = datetime(2026, 12, 7, 16, 0, tzinfo=UTC)
YAML = (
    "defaults: {memory: 4g, max_cpus: 2, max_containers_per_user: 5, priority: 10}\n"
    "groups:\n  students: {priority: 20}\n"
)


def caller(user: str, *groups: str) -> Caller:
    return Caller(uid=1000, gid=1000, user=user, home=f"/home/{user}", groups=groups)


def snapshot_of(state: Path, **entries: tuple[list[str], object]) -> Path:
    found = GroupLimits()
    for name, (users, ds01) in entries.items():
        found.add(name, {"ds01": ds01}, users)
    path = paths.hub_groups_snapshot(state)
    write_snapshot(path, found, NOW)
    return path


@pytest.fixture
def limits_file(tmp_path: Path) -> Path:
    path = tmp_path / "limits.yaml"
    path.write_text(YAML)
    return path


# ------------------------------------------------------------------------------- the proxy


def test_the_proxy_applies_a_property_tighter_than_the_file(tmp_path, limits_file):
    snapshot = snapshot_of(
        tmp_path, students=(["alice"], {"memory": "1g", "max_containers_per_user": 1})
    )
    limits_for = limits_loader(str(limits_file), snapshot)
    alice = limits_for(caller("alice"))
    assert alice.host_config["Memory"] == 1 << 30 and alice.max_containers == 1
    assert alice.sources["max_containers_per_user"] == "hub_groups.students"
    bob = limits_for(caller("bob"))  # not in the group: the file
    assert bob.host_config["Memory"] == 4 << 30 and bob.max_containers == 5


def test_the_proxy_without_a_snapshot_applies_the_file(tmp_path, limits_file):
    limits_for = limits_loader(str(limits_file), paths.hub_groups_snapshot(tmp_path))
    assert limits_for(caller("alice")).host_config["Memory"] == 4 << 30


def test_the_proxy_refuses_for_a_bad_property_and_an_unbelievable_snapshot(tmp_path, limits_file):
    snapshot = snapshot_of(tmp_path, students=(["alice"], {"memory": "1k"}))
    limits_for = limits_loader(str(limits_file), snapshot)
    with pytest.raises(Denied) as bad:
        limits_for(caller("alice"))
    assert bad.value.status == 409
    assert "JupyterHub group 'students' properties: ds01.memory" in bad.value.message
    assert limits_for(caller("bob")).max_containers == 5  # only the group's members
    snapshot.chmod(0o666)
    with pytest.raises(Denied) as doubted:
        limits_for(caller("bob"))
    assert doubted.value.status == 503 and "writable by others" in doubted.value.message


# ------------------------------------------------------------------------------- the ops pass


class GroupsHub:
    """The hub's REST API as far as the culler's group read goes (GET /groups)."""

    def __init__(self, groups: list[dict]):
        self.groups = groups

    async def request(self, method: str, path: str, params: dict | None = None) -> list[dict]:
        assert (method, path) == ("GET", "/groups")
        offset = int((params or {}).get("offset", 0))
        return self.groups[offset : offset + int((params or {}).get("limit", 200))]


def ops_culler(tmp_path: Path, groups: list[dict], eventlog: EventLog | None = None) -> Culler:
    config = parse_limits({"defaults": {"idle_timeout": "1h"}})
    return Culler(
        GroupsHub(groups),
        None,
        None,
        config,
        eventlog=eventlog,
        state_dir=tmp_path,
        trust=provenance.load(tmp_path),
    )


def test_the_ops_pass_writes_the_snapshot_but_not_in_a_dry_run(tmp_path):
    groups = [
        {"name": f"g{i}", "users": [f"u{i}"], "properties": {"ds01": {"memory": f"{i + 1}g"}}}
        for i in range(250)  # more than one page
    ]
    culler = ops_culler(tmp_path, groups)
    asyncio.run(culler.refresh_group_limits(NOW, write=False))
    assert not culler.snapshot_path.exists() and len(culler.group_limits.layers) == 250
    asyncio.run(culler.refresh_group_limits(NOW))
    snapshot = SnapshotReader(culler.snapshot_path).current()
    assert snapshot is not None and snapshot.written_at == NOW
    assert snapshot.groups_of("u249") == ("g249",)
    assert snapshot.groups.layers["g249"].limits["memory"] == 250 << 30


def test_a_failed_hub_read_keeps_the_last_snapshot(tmp_path):
    culler = ops_culler(tmp_path, [{"name": "g", "users": ["u"], "properties": {}}])
    asyncio.run(culler.refresh_group_limits(NOW))
    before = culler.snapshot_path.read_bytes()

    async def down(*args, **kwargs):
        raise ConnectionError("hub down")

    culler.hub.request = down
    asyncio.run(culler.refresh_group_limits(NOW + timedelta(minutes=5)))
    assert culler.snapshot_path.read_bytes() == before


def test_the_ops_pass_records_a_group_property_expiry_for_each_member_once(tmp_path):
    log = EventLog(tmp_path / "events.db")
    groups = [
        {"name": "course", "users": ["ann", "ben"], "properties": {"ds01": {"max_gpus": 2}}},
        {
            "name": "trial",
            "users": ["ann", "cat"],
            "properties": {"ds01": {"max_gpus": 3, "expires": "2026-12-06"}},
        },
    ]
    culler = ops_culler(tmp_path, groups, log)
    asyncio.run(culler.refresh_group_limits(NOW))
    assert culler.record_expired_groups(NOW) == 2
    assert culler.record_expired_groups(NOW) == 0  # once
    events = log.events(kind=EXPIRY_EVENT)
    assert sorted(e.user for e in events) == ["ann", "cat"]
    assert {e.reason for e in events} == {"hub_groups.trial expired on 2026-12-06"}
    assert {e.at for e in events} == {datetime(2026, 12, 7, tzinfo=UTC)}


# ------------------------------------------------------------------------------- quota views


def test_the_quota_view_names_each_limits_source():
    quota = {
        "limits": {"max_gpus": 1, "memory": 1 << 30, "max_containers_per_user": 1},
        "sources": {"memory": "hub_groups.students", "max_gpus": "defaults"},
        "gpus": [],
    }
    rows = {what: (use, limit) for what, use, limit in quota_rows(quota)}
    assert rows["Memory per container"][1] == "1.0G (hub_groups.students)"
    assert rows["GPUs"][0] == "0 of 1 GPU in use"  # the site's defaults stay plain
    assert rows["Containers"][1] == "1"  # no source given: as before
    del quota["sources"]
    assert quota_rows(quota)[3][2] == "1.0G"


def test_users_operations_name_a_bad_group_property():
    def limits_for(user, groups):
        parse_group_properties("students", {"ds01": {"memory": "1k"}})  # raises LimitsError

    ops = UserOperations(OperationsContext(None, None, None, limits_for=limits_for), "alice")
    with pytest.raises(OperationError) as caught:
        ops.limits(["students"])
    assert caught.value.status == 409 and "JupyterHub group 'students'" in caught.value.message
    assert ops._hold_after_stop(["students"]) is None  # the listing still works


def test_the_users_services_resolve_through_the_snapshot(tmp_path, limits_file):
    """The broker's and the notebook service's resolvers (their own config objects)."""
    from ds01hub.services.broker.app import Broker
    from ds01hub.services.notebook.app import DS01Service

    snapshot_of(tmp_path, students=(["alice"], {"memory": "1g"}))
    broker = Broker(limits_path=str(limits_file), state_dir=str(tmp_path))
    limits_for, _ = broker._limits_and_gpus()
    assert limits_for("alice", ["students"]).sources["memory"] == "hub_groups.students"
    service = DS01Service(limits_path=str(limits_file), state_dir=str(tmp_path))
    service._limits_store = None
    service._hub_groups = SnapshotReader(paths.hub_groups_snapshot(tmp_path))
    assert service.limits_for("alice", []).memory == 1 << 30


# ------------------------------------------------------------------------------- admin commands


def run(*args: object) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "DS01HUB_LIMITS"}
    return subprocess.run(
        [DS01HUB, *map(str, args)], capture_output=True, text=True, env=environment, timeout=60
    )


def test_ds01hub_limits_reads_the_snapshot_and_says_when_there_is_none(tmp_path, limits_file):
    state = tmp_path / "state"
    state.mkdir()
    none = run("limits", "alice", "--limits", limits_file, "--state-dir", state)
    assert none.returncode == 0, none.stderr
    assert "4g " in none.stdout and "no hub group snapshot yet" in none.stdout
    snapshot = snapshot_of(state, students=(["alice"], {"memory": "1g"}))
    shown = run("limits", "alice", "--limits", limits_file, "--state-dir", state)
    line = next(ln for ln in shown.stdout.splitlines() if ln.startswith("Memory:"))
    assert "1g " in line and "(hub_groups.students)" in line
    assert "as of the ds01-ops pass at 2026-12-07 16:00 UTC" in shown.stdout
    data = json.loads(run("limits", "alice", "--json", "--limits", limits_file,
                          "--state-dir", state).stdout)  # fmt: skip
    assert data["memory"] == 1 << 30 and data["group"] == "students"
    snapshot.write_text("{")
    broken = run("limits", "alice", "--limits", limits_file, "--state-dir", state)
    assert broken.returncode == 1 and "hub group snapshot" in broken.stderr
    assert "not a snapshot" in broken.stderr


def test_ds01hub_fairshare_takes_groups_and_priorities_from_the_hub_groups(tmp_path):
    limits = tmp_path / "limits.yaml"
    limits.write_text(
        "defaults: {priority: 20}\ngroups:\n  lab: {priority: 30}\n"
        "gpu_allocation:\n  fairshare: {half_life: 7d, weight: 10}\n"
    )
    log = EventLog(tmp_path / "events.db")
    start = datetime.now(UTC) - timedelta(hours=10)
    for user in ("alice", "bob"):
        log.record("allocate", user, slot="0", container=user, group=None, at=start)
        log.record("release", user, slot="0", container=user, group=None, at=start + timedelta(1))
    before = json.loads(
        run("fairshare", "--limits", limits, "--state-dir", tmp_path, "--json").stdout
    )
    assert {r["user"]: (r["group"], r["priority"]) for r in before["users"]} == {
        "alice": (None, 20),
        "bob": (None, 20),
    }
    snapshot_of(tmp_path, lab=(["alice"], {"priority": 60}))
    after = json.loads(
        run("fairshare", "--limits", limits, "--state-dir", tmp_path, "--json").stdout
    )
    assert {r["user"]: (r["group"], r["priority"]) for r in after["users"]} == {
        "alice": ("lab", 60),
        "bob": (None, 20),
    }
    assert "as of the ds01-ops pass" in after["hub_groups"]


def test_an_unbelievable_snapshot_is_a_named_error_everywhere(tmp_path, limits_file):
    path = snapshot_of(tmp_path, students=(["alice"], {"memory": "1g"}))
    path.write_bytes(b"\x00")
    reader = SnapshotReader(path)
    with pytest.raises(SnapshotError) as caught:
        reader.resolve(parse_limits({}), "alice")
    assert caught.value.status == 503 and caught.value.hint


# ------------------------------------------------------------------------------- hold times


def test_hold_times_follow_the_hub_groups_and_a_bad_snapshot_keeps_the_files(tmp_path):
    """The allocator's gpu_hold_after_stop (and the lifecycle's, through the same resolver)."""
    from types import SimpleNamespace

    from ds01hub.gpu.allocator import GpuAllocator
    from ds01hub.gpu.inventory import discover
    from ds01hub.gpu.simulated_nvml import SimulatedNvml
    from ds01hub.limits import SimulatedGpuSpec

    config = parse_limits({"defaults": {"gpu_hold_after_stop": "1h"}})
    allocator = GpuAllocator(
        None,
        discover(SimulatedNvml([SimulatedGpuSpec()]), simulated=True),
        tmp_path,
        None,
        limits=config,
        container_lister=list,
        trust=provenance.load(tmp_path),
    )
    record = SimpleNamespace(user="alice", group="students")
    assert allocator._hold_of(record, config) == 3600
    path = snapshot_of(tmp_path, students=(["alice"], {"gpu_hold_after_stop": "5m"}))
    assert allocator._hold_of(record, config) == 300
    snapshot_of(tmp_path, students=(["alice"], {"gpu_hold_after_stop": "5m", "memory": 0}))
    assert allocator._hold_of(record, config) == 3600  # a bad property: the file's
    path.write_text("{")
    assert allocator._hold_of(record, config) == 3600  # not believed: the file's


def test_the_admin_page_says_how_fresh_the_other_doors_groups_are(tmp_path):
    from types import SimpleNamespace

    from ds01hub.services.ops.admin_page import overview, render_page

    inventory = SimpleNamespace(simulated=False, reason=None, slots=[])
    reader = SnapshotReader(paths.hub_groups_snapshot(tmp_path))
    page = render_page(overview([], inventory, None, NOW, hub_groups=reader.status(NOW)))
    assert "no hub group snapshot yet" in page
    snapshot_of(tmp_path, students=(["alice"], {"memory": "1g"}))
    later = NOW + timedelta(minutes=7)
    page = render_page(overview([], inventory, None, later, hub_groups=reader.status(later)))
    assert "as of the ds01-ops pass at 2026-12-07 16:00 UTC (7 min ago" in page


def test_the_notebooks_quota_panel_names_the_property():
    from ds01hub.widgets.quota_panel import limits_table

    quota = {
        "limits": {"group": "students", "memory": 64 << 20, "max_containers_per_user": 1},
        "sources": {"memory": "hub_groups.students", "max_containers_per_user": "defaults"},
        "gpus": [],
    }
    html = limits_table(quota)
    assert "64M (hub_groups.students)" in html and "(defaults)" not in html
