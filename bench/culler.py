"""Culler benchmark: what one cull pass costs, stage by stage.

    .venv/bin/python bench/culler.py [--containers 200] [--servers 10000]

Rows, side by side in one run:

- decide (pure): `culler.decide` for `--servers` servers (a mix of active, busy and idle);
- GPU sampling: `Culler.gpu_activity` for K real running containers holding SIMULATED GPUs
  with one compute process each (3 NVML samples, no pause between them), i.e. the NVML calls
  plus the pid -> /proc/PID/cgroup -> container mapping;
- CPU sampling before: one `docker stats` per container, all at once on 32 threads (what the
  culler did): Docker needs 1-2 s per sample, so this dominated a pass;
- CPU sampling now: `Culler.cpu_activity`, each container's cgroup counter read twice (the
  pause between, `cpu_sample_interval`, set to 0 here: the culler spends it sleeping, beside
  the GPU samples' pauses);
- a pass's own time over K containers: GPU + CPU sampling (now) + K decisions.

Only servers whose hub activity is older than `idle_timeout - warn_before` are sampled at all;
the others cost one `decide`. Containers are made from the base image (`sleep`), labelled
`ds01.test=1` + a run label, and removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import docker

from ds01hub import labels
from ds01hub.gpu.inventory import discover
from ds01hub.gpu.simulated_nvml import SimulatedNvml
from ds01hub.host import bootstrap
from ds01hub.limits import SimulatedGpuSpec, parse_limits
from ds01hub.services.ops.culler import Culler, CullPolicy, ServerActivity, decide

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def bench_decide(servers: int) -> float:
    """Microseconds per decision."""
    policy = CullPolicy(idle_timeout=7200, warn_before=600)
    activities = [
        ServerActivity(
            user=f"u{i}",
            server="",
            container=f"default._.u{i}",
            started=NOW - timedelta(days=1),
            last_activity=NOW - timedelta(seconds=(i * 37) % 20000),
            gpu_samples={"0": (0, (i * 13) % 100, 0)},
            gpu_processes={"0": ()},
            cpu_percent=float(i % 20),
        )
        for i in range(servers)
    ]
    start = time.perf_counter()
    for activity in activities:
        decide(activity, policy, NOW)
    return (time.perf_counter() - start) / servers * 1e6


def start_containers(client, trust, image: str, count: int, run_label: str) -> list:
    key, _, value = run_label.partition("=")
    containers = []
    for index in range(count):
        name = f"default._.bench{index}-{value}"
        managed = labels.container_labels(
            user=f"bench{index}", project=None, group=None, priority=10, gpus=[str(index)]
        )
        containers.append(
            client.containers.run(
                image,
                ["sleep", "600"],
                name=name,
                labels={**trust.sign(managed, name), "ds01.test": "1", key: value},
                detach=True,
            )
        )
    for container in containers:
        container.reload()
    return containers


def timed(function, repeat: int = 3) -> float:
    """Median seconds of `repeat` calls."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--containers", type=int, default=200, help="running containers (K)")
    parser.add_argument("--servers", type=int, default=10000, help="servers for decide()")
    args = parser.parse_args()

    client = docker.from_env()
    image = bootstrap.ensure_base_image().tag
    run_label = f"ds01.bench.culler={uuid.uuid4().hex[:8]}"
    nvml = SimulatedNvml([SimulatedGpuSpec() for _ in range(args.containers)], "bench")
    inventory = discover(nvml, simulated=True)
    state_dir = tempfile.mkdtemp(prefix="ds01-bench-culler-")  # its own label key, deployment
    culler = Culler(
        None,
        client,
        inventory,
        parse_limits({}),
        state_dir=state_dir,
        gpu_sample_interval=0,
        cpu_sample_interval=0,
    )
    containers = start_containers(client, culler.trust, image, args.containers, run_label)
    try:
        for index, container in enumerate(containers):
            nvml.add_process(str(index), container.attrs["State"]["Pid"])
        slots = {c.id: (str(i),) for i, c in enumerate(containers)}
        ids = list(slots)

        def gpu() -> None:
            _, processes = asyncio.run(culler.gpu_activity(slots))
            assert all(processes[cid][slot] for cid, (slot,) in slots.items())

        def cpu_before() -> None:
            with ThreadPoolExecutor(32) as pool:
                assert None not in list(pool.map(culler.cpu_percent, ids))

        async def cpu_now() -> None:
            assert None not in (await culler.cpu_activity(ids)).values()

        def own_time() -> None:
            gpu()
            asyncio.run(cpu_now())
            bench_decide(len(ids))

        before = timed(cpu_before, 1)
        now = timed(lambda: asyncio.run(cpu_now()))
        rows = [
            (
                f"decide (pure), {args.servers} servers",
                f"{bench_decide(args.servers):.1f} us/server",
            ),
            (
                f"GPU sampling, {args.containers} containers x 3 samples",
                f"{timed(gpu) * 1000:.1f} ms",
            ),
            (
                f"CPU sampling before, {args.containers} containers (docker stats, 32 at once)",
                f"{before * 1000:.0f} ms",
            ),
            (
                f"CPU sampling now, {args.containers} containers (cgroup counters, 2 reads)",
                f"{now * 1000:.1f} ms ({before / now:.0f}x faster)",
            ),
            (
                f"pass's own time, {args.containers} containers (GPU + CPU + decide)",
                f"{timed(own_time) * 1000:.0f} ms",
            ),
        ]
    finally:
        for container in containers:
            container.remove(force=True)
        shutil.rmtree(state_dir, ignore_errors=True)
    width = max(len(name) for name, _ in rows)
    print(f"{'stage':<{width}}  cost")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
