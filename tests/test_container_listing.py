"""`container-list` from Docker's list call: which containers still need an inspect (only
those whose start or stop time the user is shown), and how a list entry reads."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import docker.errors
import requests
from harness.inspect_docs import TRUST

from ds01hub import labels
from ds01hub.actions import operations
from ds01hub.cli.user import views

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def entry(project: str, state: str, gpus: list[str], status: str) -> dict[str, Any]:
    """A `/containers/json` entry of alice's container for `project` (signed labels)."""
    name = labels.container_name("alice", project)
    return {
        "Id": f"id-{project}",
        "Names": [f"/{name}"],
        "Image": "img",
        "Labels": TRUST.sign(
            labels.container_labels(
                user="alice", project=project, group=None, priority=0, gpus=gpus, image="img"
            ),
            name,
        ),
        "State": state,
        "Status": status,
    }


class CountingApi:
    """docker-py's low-level API over fixed list entries; counts the inspects asked for."""

    def __init__(self, entries: list[dict[str, Any]]):
        self.entries = entries
        self.inspected: list[str] = []

    def containers(self, all: bool, filters: dict[str, Any]) -> list[dict[str, Any]]:
        return list(self.entries)

    def inspect_container(self, container_id: str) -> dict[str, Any]:
        self.inspected.append(container_id)
        summary = next(e for e in self.entries if e["Id"] == container_id)
        finished = (NOW - timedelta(minutes=30)).isoformat()
        return {
            "Id": container_id,
            "Name": summary["Names"][0],
            "Config": {"Labels": summary["Labels"], "Image": "img"},
            "State": {
                "Status": summary["State"],
                "StartedAt": (NOW - timedelta(hours=2)).isoformat(),
                "FinishedAt": finished,
            },
        }


class Hub:
    async def get_user(self, user: str) -> dict[str, Any]:
        return {"name": user, "servers": {}, "groups": []}


def listing(entries: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    api = CountingApi(entries)
    ctx = operations.OperationsContext(
        hub=Hub(),  # type: ignore[arg-type]
        docker=type("Client", (), {"api": api})(),
        trust=TRUST,
        clock=lambda: NOW,
        limits_for=lambda user, groups: type("L", (), {"gpu_hold_after_stop": 3600})(),
    )
    rows = asyncio.run(operations.UserOperations(ctx, "alice").list_containers())
    return rows, api.inspected


def test_only_running_containers_and_stopped_gpu_holders_are_inspected():
    entries = [entry(f"p{i:03d}", "exited", [], f"Exited (0) {i + 1} hours ago") for i in range(50)]
    entries += [
        entry("run", "running", [], "Up 2 hours"),
        entry("held", "exited", ["0"], "Exited (0) 30 minutes ago"),
        entry("fresh", "created", ["1"], "Created"),
    ]
    rows, inspected = listing(entries)
    assert sorted(inspected) == ["id-held", "id-run"]
    by_project = {row["project"]: row for row in rows}
    assert len(rows) == 53
    assert by_project["run"]["uptime_s"] == 7200 and by_project["run"]["state"] == "running"
    assert by_project["held"]["held_until"] == "2026-11-22T12:30:00Z"
    assert by_project["p004"]["state"] == "stopped" and by_project["p004"]["stopped_for_s"] is None
    assert views.time_cell(by_project["p004"]) == "stopped 5 hours ago"


def test_a_container_removed_between_list_and_inspect_is_left_out():
    entries = [entry("run", "running", [], "Up 2 hours"), entry("old", "exited", [], "Exited")]
    api = CountingApi(entries)

    def gone(container_id: str) -> dict[str, Any]:
        response = requests.Response()
        response.status_code = 404
        raise docker.errors.NotFound("gone", response=response)

    api.inspect_container = gone  # type: ignore[method-assign]
    ctx = operations.OperationsContext(
        hub=Hub(),  # type: ignore[arg-type]
        docker=type("Client", (), {"api": api})(),
        trust=TRUST,
        clock=lambda: NOW,
    )
    rows = asyncio.run(operations.UserOperations(ctx, "alice").list_containers())
    assert [row["project"] for row in rows] == ["old"]


def test_an_unsigned_entry_is_not_listed_nor_inspected():
    forged = entry("forged", "running", [], "Up 1 hour")
    forged["Labels"] = {**forged["Labels"], labels.GPUS: "0,1"}  # signature no longer holds
    rows, inspected = listing([forged, entry("mine", "exited", [], "Exited (1) 2 days ago")])
    assert [row["project"] for row in rows] == ["mine"] and inspected == []
    assert views.time_cell(rows[0]) == "stopped 2 days ago"


def test_time_cell_ignores_a_status_line_it_does_not_know():
    assert views.time_cell({"status": "Created"}) == "-"
    assert views.time_cell({"status": "Exited (0) " + "x" * 500}) == "-"


def test_mig_profiles_are_the_slices_this_machine_has():
    from ds01hub.gpu.inventory import discover
    from ds01hub.gpu.simulated_nvml import SimulatedNvml
    from ds01hub.limits import SimulatedGpuSpec

    specs = [
        SimulatedGpuSpec(),
        SimulatedGpuSpec(mig=("2g.20gb", "1g.10gb", "1g.10gb")),
    ]
    inventory = discover(SimulatedNvml(specs, "unit"), simulated=True)
    assert operations.mig_profiles(inventory) == ["1g.10gb", "2g.20gb"]
    no_mig = discover(SimulatedNvml(specs, "unit"), enable_mig=False, simulated=True)
    assert operations.mig_profiles(no_mig) == []
    assert operations.mig_profiles(None) is None  # unknown here: nothing is offered
