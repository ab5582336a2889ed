"""`container-list` latency with 200 containers, side by side.

    sudo .venv/bin/python bench/container_list.py [--containers 200] [--running 10] [--runs 10]

Starts a real JupyterHub (+ configurable-http-proxy) with the ds01 broker as its managed
service and two real Unix users: one owning N containers (a few running, the rest stopped),
one owning 3 of them (the usual case: many containers on the host, few of them yours). Then
times, for each user, over --runs runs:

  cli            `container-list --all` run as the user (process start, broker, hub, Docker)
  broker         the broker's /v1/containers over its unix socket (no process start)
  ops/before     UserOperations.list_containers in-process as it was: one inspect per
                 container (8 at once, the broker's default) for start/stop times
  ops/now        the same as it is: Docker's list call + labels, inspecting only running
                 containers (uptime) and stopped GPU holders (hold)
  docker-list    Docker's list call alone (label filter, no inspect): the floor

Everything it creates (containers, user, hub) is removed at the end. Needs root (useradd).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import docker

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from harness import Hub  # noqa: E402
from harness.cli import busybox_image, command_line, unix_user, user_env  # noqa: E402

from ds01hub import labels, provenance  # noqa: E402
from ds01hub.actions.operations import OperationsContext, UserOperations  # noqa: E402
from ds01hub.cli.user.backends import BrokerBackend  # noqa: E402
from ds01hub.hub.client import HubClient  # noqa: E402


class InspectEach(UserOperations):
    """The listing as it was before it read the list call: inspect every container."""

    def _listed(self):
        return [(attrs, None) for attrs in self._containers()]


class BenchHub:
    """A real JupyterHub (the test harness's) with the broker, in a temporary directory."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="ds01-bench-"))
        self.directory.chmod(0o755)
        self.socket_path = str(self.directory / "broker.sock")
        self.state_dir = self.directory / "hub" / "state"  # the harness hub's own
        extra = (
            "from ds01hub.hub.services import configure_broker\n"
            f"configure_broker(c, socket_path={self.socket_path!r}, "
            f"broker_args=['--Broker.state_dir={self.state_dir}'])\n"
        )
        self.hub = Hub(
            directory=self.directory / "hub",
            hub_ip="127.0.0.1",
            spawner="simple",
            extra_config=extra,
        ).start()
        self.url, self.token = self.hub.url, self.hub.admin_token
        deadline = time.monotonic() + 60
        while not os.path.exists(self.socket_path):
            if time.monotonic() > deadline:
                raise SystemExit(self.hub.log())
            time.sleep(0.2)

    def stop(self) -> None:
        self.hub.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def make_containers(
    client, trust, user: str, image: str, count: int, running: int, tag: str
) -> None:
    for i in range(count):
        project = f"p{i:03d}"
        name = f"{labels.container_name(user, project)}-{tag}"
        container_labels = labels.container_labels(
            user=user, project=project, group=None, priority=0, gpus=[], image=image
        )
        container_labels = trust.sign(container_labels, name)
        container_labels.update({"ds01.test": "1", "ds01.bench": tag})
        kwargs = dict(name=name, labels=container_labels, command=["sleep", "100000"])
        if i < running:
            client.containers.run(image, detach=True, **kwargs)
        else:
            client.containers.create(image, **kwargs)


def timed(function, runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        function()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--containers", type=int, default=200)
    parser.add_argument("--running", type=int, default=10)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark creates a Unix user")

    client = docker.from_env()
    image = busybox_image(client)
    tag = secrets.token_hex(3)
    hub = BenchHub()
    try:
        with unix_user("d01b") as heavy, unix_user("d01b") as light:
            trust = provenance.load(hub.state_dir)
            make_containers(client, trust, heavy.name, image, args.containers, args.running, tag)
            make_containers(client, trust, light.name, image, 3, 1, tag)
            results = {
                f"{args.containers} yours": measure(hub, client, heavy, args.runs, args.containers),
                "3 yours": measure(hub, client, light, args.runs, 3),
            }
    finally:
        for c in client.containers.list(all=True, filters={"label": f"ds01.bench={tag}"}):
            c.remove(force=True)
        hub.stop()
    print_table(results, args)


def measure(hub: BenchHub, client, person, runs: int, expected: int) -> dict[str, list[float]]:
    def cli() -> None:
        result = subprocess.run(
            command_line("container-list", "--all", "--json"),
            user=person.uid,
            group=person.gid,
            extra_groups=[],
            env=user_env(person.home, hub.socket_path),
            capture_output=True,
            text=True,
            check=True,
        )
        assert result.stdout.count('"project"') == expected, result.stderr

    broker = BrokerBackend(hub.socket_path, act_for=person.name)

    def via_broker() -> None:
        assert len(broker.list_containers(include_stopped=True)) == expected

    def operations(kind: type[UserOperations]):
        loop = asyncio.new_event_loop()

        async def make() -> UserOperations:
            context = OperationsContext(
                hub=HubClient(f"{hub.url}/hub/api", hub.token),
                docker=client,
                trust=provenance.load(hub.state_dir),
            )
            return kind(context, person.name)

        ops = loop.run_until_complete(make())

        def run() -> None:
            rows = loop.run_until_complete(ops.list_containers(include_stopped=True))
            assert len(rows) == expected

        return run

    trust = provenance.load(hub.state_dir)
    wanted = {"label": trust.label_filters([f"{labels.USER}={person.name}"])}

    def docker_list() -> None:
        assert len(client.api.containers(all=True, filters=wanted)) == expected

    via_broker()  # first call creates the hub user; not timed
    return {
        "cli": timed(cli, runs),
        "broker": timed(via_broker, runs),
        "ops/before": timed(operations(InspectEach), runs),
        "ops/now": timed(operations(UserOperations), runs),
        "docker-list": timed(docker_list, runs),
    }


def print_table(results: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> None:
    total = args.containers + 3
    print(
        f"container-list --all: {total} containers on the host ({args.running + 1} running), "
        f"{args.runs} runs each, {os.cpu_count()} CPUs; milliseconds, median (p95)"
    )
    scenarios = list(results)
    print(f"{'path':14}" + "".join(f"{name:>18}" for name in scenarios))
    for path in results[scenarios[0]]:
        cells = []
        for name in scenarios:
            samples = sorted(results[name][path])
            p95 = samples[min(len(samples) - 1, round(0.95 * (len(samples) - 1)))]
            cells.append(f"{statistics.median(samples):8.0f} ({p95:5.0f})")
        print(f"{path:14}" + "".join(f"{c:>18}" for c in cells))
    ratios = [
        statistics.median(results[name]["ops/before"]) / statistics.median(results[name]["ops/now"])
        for name in scenarios
    ]
    print(f"{'before/now':14}" + "".join(f"{r:>17.1f}x" for r in ratios))


if __name__ == "__main__":
    main()
