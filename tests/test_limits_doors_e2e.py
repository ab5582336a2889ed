"""A hub group property binds every door, for real (issue 17): an admin sets a JupyterHub group
property tighter than the limits file over the hub's REST API; after a ds01-ops pass (`ds01hub
cull --once`, the service's own code) `docker run` by a real Unix user through a real `ds01hub
proxy` gets the property's memory, a second container is refused with the property's source,
and the user's `container-stats` (through a real broker) and `ds01hub limits` show it.
Before the pass the proxy applies the file: the snapshot is as fresh as the last pass."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from harness.cli import BUSYBOX_IMAGE, BrokerProcess, run_as, unix_user
from harness.cli import busybox_image as shared_busybox_image
from harness.ds01_spawner import SPAWNER_LABEL, Ds01Hub

from ds01hub import paths

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.root]
DS01HUB = str(Path(sys.executable).with_name("ds01hub"))
DOCKER = shutil.which("docker") or "/usr/local/bin/docker"


def admin_docker(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DOCKER_HOST"}
    return subprocess.run(
        [DOCKER, *args], capture_output=True, text=True, check=check, env=env, timeout=120
    )


@contextmanager
def proxy(limits: Path, hub_state: Path) -> Iterator[Path]:
    """A real `ds01hub proxy` reading the hub's state directory (label key, group snapshot)."""
    directory = Path(tempfile.mkdtemp(prefix="ds01t-lmd-"))
    directory.chmod(0o755)
    sock, log = directory / "docker.sock", directory / "proxy.log"
    command = [
        *(DS01HUB, "proxy", "--listen", str(sock), "--upstream", "/var/run/docker.sock"),
        *("--limits", str(limits), "--hub-state-dir", str(hub_state)),
        *("--state-dir", str(directory / "state"), "--shared-image", BUSYBOX_IMAGE),
    ]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield sock
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)


def docker_as(sock: Path, user: str, *args: str) -> subprocess.CompletedProcess:
    line = f"export DOCKER_HOST=unix://{sock}; {shlex.join([DOCKER, *args])}"
    return subprocess.run(
        ["su", "-s", "/bin/sh", user, "-c", line], capture_output=True, text=True, timeout=120
    )


def memory_of(container_id: str) -> int:
    host = admin_docker("inspect", "-f", "{{json .HostConfig}}", container_id).stdout
    return json.loads(host)["Memory"]


def test_a_group_property_binds_docker_run_through_the_proxy_and_the_quota_views(
    hub_factory, docker_client, tmp_path
):
    shared_busybox_image(docker_client)
    ds01 = Ds01Hub(hub_factory, tmp_path)  # the file: memory 512m, 2 containers per user
    hub, state = ds01.hub, ds01.state_dir
    state.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "JUPYTERHUB_API_TOKEN": hub.admin_token}
    environment.pop("DS01HUB_LIMITS", None)
    run = ("run", "-d", "--memory", "1g", BUSYBOX_IMAGE, "sleep", "300")
    with unix_user("lmd") as user, proxy(ds01.limits_path, state) as sock:
        try:
            hub.create_user(user.name, groups=["students"])
            properties = {"ds01": {"memory": "64m", "max_containers_per_user": 1}}
            response = hub.api("PUT", "/groups/students/properties", json=properties)
            assert response.status_code == 200, response.text

            # no ops pass yet: the proxy applies the file (the property binds hub spawns)
            first = docker_as(sock, user.name, *run)
            assert first.returncode == 0, first.stderr
            assert memory_of(first.stdout.strip()) == 512 << 20
            admin_docker("rm", "-f", first.stdout.strip())

            cull = subprocess.run(
                [
                    *(DS01HUB, "cull", "--once", "--keep-stopped"),
                    *(f"--hub-api={hub.url}/hub/api", f"--limits={ds01.limits_path}"),
                    *(f"--state-dir={state}", f"--label={SPAWNER_LABEL}={ds01.tag}"),
                ],
                capture_output=True,
                text=True,
                env=environment,
                timeout=300,
            )
            assert cull.returncode == 0, cull.stdout + cull.stderr
            snapshot = paths.hub_groups_snapshot(state)
            assert oct(snapshot.stat().st_mode & 0o777) == "0o644"

            # after the pass: the property binds `docker run` through the proxy
            made = docker_as(sock, user.name, *run)
            assert made.returncode == 0, made.stderr
            assert memory_of(made.stdout.strip()) == 64 << 20
            refused = docker_as(sock, user.name, *run)
            assert refused.returncode != 0
            assert "(max_containers_per_user: 1 from hub_groups.students)" in refused.stderr

            # the admin's command and the user's quota view show the property as the source
            shown = subprocess.run(
                [DS01HUB, "limits", user.name, "--limits", str(ds01.limits_path)]
                + ["--state-dir", str(state)],
                capture_output=True,
                text=True,
                env=environment,
                timeout=60,
            )
            memory = next(ln for ln in shown.stdout.splitlines() if ln.startswith("Memory:"))
            assert "64m" in memory and "(hub_groups.students)" in memory, shown.stdout
            broker = BrokerProcess(
                f"{hub.url}/hub/api",
                hub.admin_token,
                f"--Broker.limits_path={ds01.limits_path}",
                f"--Broker.state_dir={state}",
            )
            try:
                stats = run_as(user, broker.socket_path, "container-stats")
            finally:
                broker.stop()
            assert stats.returncode == 0, stats.stdout + stats.stderr + broker.log()
            quota = stats.stdout.splitlines()[0]
            assert "memory per container 64M (hub_groups.students)" in quota, quota
            assert "containers 1 (hub_groups.students) (1 running, 1 total)" in quota, quota
        finally:
            mine = admin_docker("ps", "-aq", "--filter", f"label=ds01.user={user.name}")
            if mine.stdout.split():
                admin_docker("rm", "-f", *mine.stdout.split(), check=False)
