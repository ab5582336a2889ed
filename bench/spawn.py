"""Time-to-ready of a spawn: plain DockerSpawner vs DS01Spawner, side by side in one run.

    .venv/bin/python bench/spawn.py [--spawns 5]

Starts two real JupyterHubs (+ configurable-http-proxy) on the same single-user image (the
test suite's, built if missing): one with `spawner_class = "docker"`, one with "ds01" (a limits
YAML with a SIMULATED inventory). Each round spawns, in turn (the order alternating between
rounds, so drift in the machine's load hits both alike), a fresh user's server on:

  docker         plain DockerSpawner (with the same CPU/memory caps as the DS01 hub's users)
  ds01           DS01Spawner, no GPU (limits, quota check, labels)
  ds01+gpu       DS01Spawner with one (simulated) GPU: also the queue and the allocator

Two times per spawn, from the REST POST: `serving`, when the container's Jupyter first answers
on its published port (polled every 20 ms), and `ready`, the `ready` event of the hub's
progress stream (the hub itself polls the server with exponential backoff, which rounds that
figure up by as much as seconds). Then the server is stopped and its container removed (not
timed). Prints medians, the ratio to plain DockerSpawner, the difference in milliseconds and
the median of the same-round differences ("paired").
Goal: DS01Spawner adds under 5% or under 150 ms. On a shared, loaded machine whole spawns vary
by a second or more, so the table also shows what the DS01 hub logs for each spawn: the time
its own steps took (limits, options, quota, queue + allocator, plan, commit) beside
DockerSpawner's start, measured inside the hub without that noise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from harness import Hub, unique_name  # noqa: E402
from harness.ds01_spawner import Ds01Hub  # noqa: E402
from harness.naming import SESSION_PID_LABEL  # noqa: E402

from ds01hub.host import bootstrap  # noqa: E402

CONFIG = 'c.Spawner.cmd = ["jupyterhub-singleuser"]\n'


class BenchHubs:
    """Starts harness hubs without the pytest-session label: every new test session removes
    containers whose session pid is not a live pytest, which would take this benchmark's
    containers away mid-spawn whenever a colleague starts tests (Hub.stop still removes
    them by hub id). Same call as the `hub_factory` fixture."""

    def __init__(self, directory: Path, image: str, docker_client):
        self.directory, self.image, self.docker_client = directory, image, docker_client
        self.hubs: list[Hub] = []

    def __call__(self, extra_config: str = "", spawner: str = "docker", labels=None) -> Hub:
        hub = Hub(
            directory=self.directory / f"hub-{len(self.hubs)}",
            hub_ip=bootstrap.docker_bridge_ip(),
            image=self.image,
            spawner=spawner,
            extra_config=extra_config,
            docker_client=self.docker_client,
            labels=labels or {},
        )
        del hub.labels[SESSION_PID_LABEL]
        self.hubs.append(hub)
        return hub.start()

    def stop_all(self) -> None:
        for hub in self.hubs:
            hub.stop()


def spawn_timed(hub, docker_client, user: str, options: dict | None) -> tuple[float, float]:
    """(serving, ready) seconds from the spawn request: `serving` when the container's Jupyter
    first answers HTTP on its published port (polled every 20 ms), `ready` when the hub's
    progress stream says so (the hub polls with exponential backoff, which rounds `ready` up
    by up to seconds and hides small differences)."""
    hub.create_user(user, groups=["researchers"])
    started = time.perf_counter()
    request = threading.Thread(target=hub.start_server, args=(user,), kwargs={"options": options})
    request.start()
    serving = time_to_serving(docker_client, user, started)
    request.join()
    response = hub.api("GET", f"/users/{user}/server/progress", stream=True, timeout=300)
    for line in response.iter_lines(decode_unicode=True):
        if line and line.startswith("data:"):
            event = json.loads(line[5:])
            if event.get("ready"):
                response.close()
                return serving, time.perf_counter() - started
            if event.get("failed"):
                raise RuntimeError(f"spawn of {user} failed: {event.get('message')}")
    raise RuntimeError(f"progress of {user} ended without ready:\n{hub.log()}")


def time_to_serving(docker_client, user: str, started: float, port: int = 8888) -> float:
    url = None
    while time.perf_counter() < started + 300:
        if url is None:
            for entry in docker_client.api.containers(filters={"name": user, "status": "running"}):
                published = [
                    p
                    for p in entry["Ports"]
                    if p.get("PrivatePort") == port and p.get("PublicPort")
                ]
                if published:
                    url = f"http://127.0.0.1:{published[0]['PublicPort']}/user/{user}/api"
        else:
            with contextlib.suppress(requests.RequestException):
                requests.get(url, timeout=1)
                return time.perf_counter() - started
        time.sleep(0.02)
    raise RuntimeError(f"the server of {user} never answered")


OWN_STEPS = re.compile(r"ds01 (\S+): own steps ([\d.]+) ms, DockerSpawner.start ([\d.]+) ms")


def logged_steps(hub, user: str) -> tuple[float, float]:
    """(DS01Spawner's own steps, DockerSpawner.start) in seconds, from the hub log."""
    found = [m for m in OWN_STEPS.finditer(hub.log(10_000_000)) if m.group(1) == user]
    if not found:
        raise RuntimeError(f"no timing line for {user} in the hub log")
    return float(found[-1].group(2)) / 1000, float(found[-1].group(3)) / 1000


def clean_up(hub, docker_client, user: str) -> None:
    container = hub.container_of(user)
    hub.stop_server(user)
    container.remove(force=True)
    hub.api("DELETE", f"/users/{user}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spawns", type=int, default=5, help="spawns per variant (default 5)")
    args = parser.parse_args(argv)

    import docker

    bootstrap.ensure_docker_engine()
    client = docker.from_env(timeout=300)
    base = bootstrap.ensure_base_image().tag
    ca_bundle = bootstrap.HOST_CA_BUNDLE if bootstrap.HOST_CA_BUNDLE.exists() else None
    image = bootstrap.ensure_singleuser_image(base, ca_bundle=ca_bundle).tag
    directory = Path(tempfile.mkdtemp(prefix="ds01-bench-spawn-"))
    factory = BenchHubs(directory, image, client)
    try:
        # The same CPU/memory caps as the DS01 hub's researchers, so both containers start
        # under the same limits and only the spawners differ.
        plain = factory(
            CONFIG + "c.DockerSpawner.cpu_limit = 1.5\nc.DockerSpawner.mem_limit = '768M'\n",
            spawner="docker",
        )
        ds01 = Ds01Hub(factory, directory, extra_config=CONFIG).hub
        variants = [("docker", plain, None), ("ds01", ds01, None), ("ds01+gpu", ds01, {"gpus": 1})]
        serving: dict[str, list[float]] = {name: [] for name, _, _ in variants}
        ready: dict[str, list[float]] = {name: [] for name, _, _ in variants}
        steps: dict[str, list[tuple[float, float]]] = {"ds01": [], "ds01+gpu": []}
        for round_number in range(args.spawns):
            order = variants if round_number % 2 == 0 else variants[::-1]
            for name, hub, options in order:
                user = unique_name("bench")
                times = spawn_timed(hub, client, user, options)
                serving[name].append(times[0])
                ready[name].append(times[1])
                if name in steps:
                    steps[name].append(logged_steps(hub, user))
                clean_up(hub, client, user)
            print(
                f"round {round_number + 1}/{args.spawns}: "
                + ", ".join(
                    f"{n} {serving[n][-1] * 1000:.0f}/{ready[n][-1] * 1000:.0f} ms"
                    for n, _, _ in variants
                )
                + " (serving/ready)",
                file=sys.stderr,
            )
    finally:
        factory.stop_all()
    print(f"\n{args.spawns} spawns each, image {image}")
    print_times("time to serving (the container's Jupyter answers HTTP)", serving)
    print_times("time to ready (the hub's progress stream)", ready)
    print_steps(steps)
    return 0


def print_times(title: str, times: dict[str, list[float]]) -> None:
    baseline = statistics.median(times["docker"])
    print(f"\n{title}")
    print(
        f"{'spawner':<10} {'median ms':>10} {'min ms':>8} {'max ms':>8} {'ratio':>7} {'+ms':>7}"
        f" {'paired +ms':>11}"
    )
    for name, values in times.items():
        median = statistics.median(values)
        # Same-round differences cancel most of the drift in the machine's load.
        paired = statistics.median(v - d for v, d in zip(values, times["docker"], strict=True))
        print(
            f"{name:<10} {median * 1000:>10.0f} {min(values) * 1000:>8.0f} "
            f"{max(values) * 1000:>8.0f} {median / baseline:>7.3f} "
            f"{(median - baseline) * 1000:>+7.0f} {paired * 1000:>+11.0f}"
        )


def print_steps(steps: dict[str, list[tuple[float, float]]]) -> None:
    print("\nmeasured inside the DS01 hub (its log), per spawn")
    print(
        f"{'spawner':<10} {'own steps median ms':>20} {'max ms':>8} {'DockerSpawner.start ms':>23}"
    )
    for name, values in steps.items():
        own = [v[0] for v in values]
        docker_start = [v[1] for v in values]
        print(
            f"{name:<10} {statistics.median(own) * 1000:>20.1f} {max(own) * 1000:>8.1f} "
            f"{statistics.median(docker_start) * 1000:>23.1f}"
        )


if __name__ == "__main__":
    sys.exit(main())
