"""The docker CLI direct vs through the ds01hub socket proxy, side by side in one run.

    sudo .venv/bin/python bench/proxy.py [--containers 200] [--runs 15] [--log-lines 200000]

Creates a Unix user owning --containers ds01-labelled containers (created, not started), one
running container (inspect, exec) and one stopped chatty container with --log-lines lines of
logs, and starts `ds01hub proxy` on a temporary socket. Then, alternating the three ways on every
run so that machine noise hits them alike, times the same docker CLI command:

  direct        root on the engine's own socket
  proxy/root    root through the proxy (an admin: passed through, no policy look-ups)
  proxy/user    the user through the proxy (identified by SO_PEERCRED; policy applied:
                ownership look-ups, the container list filtered, exec ids checked)

Latency rows show the median wall time of the whole CLI command (process start included, as a
user experiences it); the logs row shows throughput. The ratio is proxy/user against direct
(for throughput: direct rate / proxied rate); the goal is at most 1.2x. Everything it creates
(containers, user, socket) is removed at the end. Needs root (useradd) and a Docker engine.
"""

from __future__ import annotations

import argparse
import os
import pwd
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import docker

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from harness.cli import busybox_image, unix_user  # noqa: E402

from ds01hub import labels as ds01labels  # noqa: E402
from ds01hub import provenance  # noqa: E402

DOCKER = shutil.which("docker") or "/usr/local/bin/docker"
GOAL = 1.2
LOG_LINE = "ds01hub proxy benchmark: a line of container output, about eighty characters long"


@dataclass(frozen=True)
class Way:
    """One way of reaching the engine: who runs the CLI, and against which socket."""

    name: str
    socket: str
    uid: int = 0
    gid: int = 0
    home: str = "/root"

    def run(self, args: list[str]) -> tuple[float, int]:
        """(seconds, bytes of stdout) for one CLI command; fails loudly on a non-zero exit."""
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": self.home,
            "DOCKER_HOST": f"unix://{self.socket}",
        }
        start = time.perf_counter()
        result = subprocess.run(
            [DOCKER, *args],
            env=env,
            user=self.uid,
            group=self.gid,
            extra_groups=[] if self.uid else None,
            capture_output=True,
            timeout=300,
        )
        elapsed = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(
                f"{self.name}: docker {' '.join(args)} failed: "
                f"{result.stderr.decode(errors='replace').strip()}"
            )
        return elapsed, len(result.stdout)


@contextmanager
def running_proxy(directory: Path) -> Iterator[str]:
    socket_path = directory / "docker.sock"
    command = [
        sys.executable,
        "-c",
        "import sys; from ds01hub.cli.admin import main; sys.exit(main(sys.argv[1:]))",
        "proxy",
        "--listen",
        str(socket_path),
        "--state-dir",
        str(directory / "state"),
        "--hub-state-dir",  # the label key the bench containers are signed with
        str(directory / "state"),
    ]
    # at its default level, as deployed: a line per forwarded request, to a file
    log = open(directory / "proxy.log", "w")  # noqa: SIM115 -- closed with the process
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not socket_path.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the proxy did not start")
            time.sleep(0.05)
        yield str(socket_path)
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


@contextmanager
def bench_containers(client, state_dir: Path, user: str, image: str, count: int, log_lines: int):
    """(running container id, chatty container id), `user`'s (labels signed with the key in
    `state_dir`, the proxy's); all removed afterwards."""
    tag = secrets.token_hex(3)
    trust = provenance.load(state_dir)
    own = ds01labels.container_labels(user=user, project=None, group=None, priority=0)

    def labels(name: str) -> dict[str, str]:
        return trust.sign(own, name) | {"ds01.test": "1", "ds01.bench": tag}

    made: list[str] = []
    try:
        for index in range(count):
            name = f"bench-{tag}-{index}"
            made.append(
                client.api.create_container(image, ["true"], labels=labels(name), name=name)["Id"]
            )
        name = f"bench-{tag}-running"
        running = client.containers.run(
            image, ["sleep", "3600"], labels=labels(name), name=name, detach=True
        )
        made.append(running.id)
        name = f"bench-{tag}-chatty"
        chatty = client.containers.run(
            image,
            ["sh", "-c", f"/bin/busybox yes '{LOG_LINE}' | /bin/busybox head -n {log_lines}"],
            labels=labels(name),
            name=name,
            detach=True,
        )
        made.append(chatty.id)
        chatty.wait(timeout=120)
        yield running.id, chatty.id
    finally:
        for cid in made:
            client.api.remove_container(cid, force=True)


def measure(ways: list[Way], args: list[str], runs: int) -> dict[str, list[tuple[float, int]]]:
    samples: dict[str, list[tuple[float, int]]] = {way.name: [] for way in ways}
    for way in ways:
        way.run(args)  # warm-up: page cache, the engine's caches
    for _ in range(runs):
        for way in ways:
            samples[way.name].append(way.run(args))
    return samples


def latency_row(label: str, samples: dict[str, list[tuple[float, int]]]) -> list[str]:
    medians = {name: statistics.median(s for s, _ in runs) for name, runs in samples.items()}
    ratio = medians["proxy/user"] / medians["direct"]
    cells = [f"{medians[n] * 1000:9.1f} ms" for n in ("direct", "proxy/root", "proxy/user")]
    return [label, *cells, f"{ratio:5.2f}x", "ok" if ratio <= GOAL else "OVER"]


def throughput_row(label: str, samples: dict[str, list[tuple[float, int]]]) -> list[str]:
    rates = {
        name: statistics.median(size / s for s, size in runs) / 1e6
        for name, runs in samples.items()
    }
    ratio = rates["direct"] / rates["proxy/user"]
    cells = [f"{rates[n]:7.1f} MB/s" for n in ("direct", "proxy/root", "proxy/user")]
    return [label, *cells, f"{ratio:5.2f}x", "ok" if ratio <= GOAL else "OVER"]


def print_table(rows: list[list[str]]) -> None:
    header = ["operation", "direct", "proxy/root", "proxy/user", "user/direct", f"<= {GOAL}x"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print(
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--containers", type=int, default=200, help="containers the user owns")
    parser.add_argument("--runs", type=int, default=15, help="timed runs per operation and way")
    parser.add_argument(
        "--log-lines",
        type=int,
        default=200_000,
        help="lines of output in the chatty container's log",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/proxy.py needs root (it creates a Unix user)", file=sys.stderr)
        return 2
    client = docker.from_env()
    image = busybox_image(client)
    with unix_user("pxbench") as user, tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        directory.chmod(0o755)
        with (
            running_proxy(directory) as proxied,
            bench_containers(
                client, directory / "state", user.name, image, args.containers, args.log_lines
            ) as (
                running,
                chatty,
            ),
        ):
            entry = pwd.getpwnam(user.name)
            ways = [
                Way("direct", "/var/run/docker.sock"),
                Way("proxy/root", proxied),
                Way("proxy/user", proxied, entry.pw_uid, entry.pw_gid, user.home),
            ]
            listing = ["ps", "-a", "--filter", f"label=ds01.user={user.name}"]
            rows = [
                latency_row(
                    f"docker ps -a ({args.containers + 2} containers)",
                    measure(ways, listing, args.runs),
                ),
                latency_row("docker inspect", measure(ways, ["inspect", running], args.runs)),
                latency_row(
                    "docker exec true", measure(ways, ["exec", running, "true"], args.runs)
                ),
            ]
            logs = measure(ways, ["logs", chatty], max(3, args.runs // 3))
            size = logs["direct"][0][1] / 1e6
            rows.append(throughput_row(f"docker logs ({size:.0f} MB)", logs))
    print(
        f"docker CLI {DOCKER}, {args.runs} runs per cell (logs: {max(3, args.runs // 3)}), "
        "median; alternating ways each run"
    )
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
