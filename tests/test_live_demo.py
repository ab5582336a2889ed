"""The demo as a rehearsal of a real host: `ds01hub demo start` makes Unix accounts for its
logins; as one of them (`su - USER -c ...`) the users' commands create, stop, start, remove and
clean up containers against the demo's own configuration (stopped containers stay); the admin
commands find the demo hub through its environment file; `demo stop --purge` removes the
accounts, workspaces, containers and state."""

from __future__ import annotations

import json
import os
import pwd
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from harness import docker_bridge_ip, free_port
from harness.live import commands  # noqa: F401  (fixture: the users' commands)

from ds01hub.host.demo import DEMO_LABEL

pytestmark = [pytest.mark.root, pytest.mark.e2e, pytest.mark.docker]

if os.geteuid() != 0:  # pragma: no cover
    pytest.skip("needs root to create Unix users", allow_module_level=True)


def demo(*args: str, state: Path, extra: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "ds01hub.cli.admin",
            "demo",
            *args,
            "--state-dir",
            str(state),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_users_commands_against_the_demo_and_purge(
    tmp_path_factory,
    commands,  # noqa: F811 (the fixture imported above)
    singleuser_image,
    docker_client,
):
    top = tmp_path_factory.mktemp("demo")
    state, workspaces = top / "state", Path(f"/tmp/ds01t-demo-ws-{secrets.token_hex(3)}")
    socket_dir = Path(f"/tmp/ds01t-demo-sock-{secrets.token_hex(3)}")
    socket_dir.mkdir(mode=0o755)
    prefix = f"t{secrets.token_hex(2)}"
    extra = [
        "--user-prefix",
        prefix,
        "--workspace-root",
        str(workspaces),
        "--no-commands",
        "--broker-socket",
        str(socket_dir / "broker.sock"),
        "--image",
        singleuser_image,
        "--port",
        str(free_port()),
        "--hub-port",
        str(free_port(docker_bridge_ip())),
        "--proxy-api-port",
        str(free_port()),
    ]
    started = demo("start", "--json", state=state, extra=extra)
    try:
        assert started.returncode == 0, started.stderr + (state / "jupyterhub.log").read_text()
        alice = f"{prefix}alice"
        assert [u["name"] for u in json.loads(started.stdout)["users"]][0] == alice
        entry = pwd.getpwnam(alice)
        assert entry.pw_passwd in ("x", "*", "!")  # no password: su from root is the way in
        assert (workspaces / alice).stat().st_uid == entry.pw_uid
        assert os.readlink(Path(entry.pw_dir) / "workspace") == str(workspaces / alice)

        def run(command: str) -> subprocess.CompletedProcess:
            line = (
                f"export DS01HUB_BROKER_SOCKET={socket_dir / 'broker.sock'}; {commands}/{command}"
            )
            return subprocess.run(
                ["su", "-", alice, "-c", line], capture_output=True, text=True, timeout=300
            )

        for step in ("container-create p1", "container-stop p1 -y"):
            result = run(step)
            assert result.returncode == 0, f"{step}: {result.stderr}"
        listed = json.loads(run("container-list --all --json").stdout)
        [p1] = [c for c in listed if c["project"] == "p1"]
        assert p1["state"] in ("stopped", "exited")  # kept: DockerSpawner.remove = False
        [container] = docker_client.containers.list(
            all=True, filters={"label": f"ds01.user={alice}"}
        )
        assert container.labels[DEMO_LABEL]
        for step in (
            "container-start p1",
            "container-stop p1 -y",
            "container-remove p1 -y",
            "container-create p2",
            "container-stop p2 -y",
            "container-cleanup --all -y",
        ):
            result = run(step)
            assert result.returncode == 0, f"{step}: {result.stderr}"
        assert json.loads(run("container-list --all --json").stdout) == []

        # the admin commands find the demo hub by its environment file
        env = os.environ | {"DS01HUB_ENV_FILE": str(state / "ds01hub.env")}
        status = subprocess.run(
            [sys.executable, "-m", "ds01hub.cli.admin", "cull", "--once", "--dry-run", "--json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert status.returncode == 0, status.stderr
    finally:
        purged = demo("stop", "--purge", state=state, extra=extra)
    assert purged.returncode == 0, purged.stderr
    with pytest.raises(KeyError):
        pwd.getpwnam(f"{prefix}alice")
    assert not state.exists() and not (workspaces / f"{prefix}alice").exists()
    assert not docker_client.containers.list(all=True, filters={"label": f"ds01.user={alice}"})
    socket_dir.rmdir() if socket_dir.exists() and not any(socket_dir.iterdir()) else None
