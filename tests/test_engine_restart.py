"""The Docker engine stopped and started again under a running hub (docs/architecture.md,
"Engine restart"), on a PRIVATE dockerd (harness.engine; the shared engine is never stopped).

One real hub (DS01Spawner, SIMULATED GPUs) with the ds01-ops service and the ds01 notebook
service, one real `ds01hub proxy`, all on the private engine. First bob's container is stopped
behind the hub's back: the hub sees it at once. Then alice has a running GPU server;
slow's GPU spawn is waiting for a Jupyter that never answers. Then dockerd gets SIGTERM (as
`systemctl stop docker` sends) and is started again. What must hold: the hub reports both
servers as they really are (stopped) within a bounded wait while the engine is still down;
slow's spawn fails at once with the engine's message; ops, the notebook service and the proxy
say the engine is unreachable instead of failing; once it is back, the GPU holds of the
containers that stopped with it are given back (release events), everything answers again,
and alice can start her server again.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import docker
import pytest
import requests
from harness import free_port, unique_name, wait_until
from harness.ds01_spawner import Ds01Hub
from harness.engine import PrivateEngine
from test_spawner_e2e import first_progress_message

from ds01hub.gpu.eventlog import EventLog

pytestmark = [pytest.mark.docker, pytest.mark.e2e, pytest.mark.root]

ON_PRIVATE_ENGINE = """
import socket
from ds01hub.spawner import DS01Spawner
from ds01hub.hub.services import configure_ops
from ds01hub.hub.services import configure_notebook as configure_service


class HostNetworkSpawner(DS01Spawner):
    # The private engine has no bridge: containers share the host's network, each Jupyter on
    # a port of its own.
    async def start(self):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        return await super().start()

    async def get_ip_and_port(self):
        return "127.0.0.1", self.port


def _never_answers(spawner):  # a spawn that is still waiting for Jupyter when dockerd stops
    if spawner.user.name.startswith("slow"):
        spawner.cmd = ["sh", "-c", "trap 'exit 0' TERM; sleep 600 & wait"]


c.JupyterHub.spawner_class = HostNetworkSpawner
c.Spawner.pre_spawn_hook = _never_answers
c.DockerSpawner.network_name = "host"
c.DockerSpawner.use_internal_ip = True
c.DockerSpawner.client_kwargs = {{"base_url": {url!r}}}
_environment = {{"DOCKER_HOST": {url!r}}}
configure_ops(
    c,
    url="http://127.0.0.1:{ops_port}",
    state_dir=c.DS01Spawner.state_dir,
    service_args=[
        "--OpsService.limits_path=" + c.DS01Spawner.limits_path,
        "--OpsService.extra_labels=" + c.DS01Spawner.container_label_filter[0],
        "--OpsService.interval=3600",
    ],
    environment=_environment,
)
configure_service(
    c,
    url="http://127.0.0.1:{service_port}",
    service_args=["--DS01Service.state_dir=" + c.DS01Spawner.state_dir],  # the label key
    environment=_environment,
)
"""


@pytest.fixture
def engine(singleuser_image):
    with PrivateEngine() as private:
        private.start()
        private.load_image(singleuser_image)
        yield private


@pytest.fixture
def proxy(engine):
    """A real `ds01hub proxy` in front of the private engine (root: full access)."""
    directory = Path(tempfile.mkdtemp(prefix="ds01p-"))
    sock, log = directory / "proxy.sock", directory / "proxy.log"
    command = [str(Path(sys.executable).parent / "ds01hub"), "proxy", "--listen", str(sock)]
    command += [
        "--state-dir",
        str(directory / "state"),
        "--hub-state-dir",
        str(directory / "state"),
    ]
    with open(log, "w") as out:
        process = subprocess.Popen(
            [*command, "--upstream", str(engine.socket)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_until(sock.exists, 30, 0.05, lambda: "proxy did not start: " + log.read_text())
        yield docker.DockerClient(base_url=f"unix://{sock}", version="1.41", timeout=30), log
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(10)
        subprocess.run(["rm", "-rf", str(directory)], check=False)


def ops_overview(hub, token: str) -> dict:
    response = requests.get(
        f"{hub.url}/services/ds01-ops/api/overview",
        headers={"Authorization": f"token {token}"},
        timeout=60,
    )
    assert response.status_code == 200, response.text[:2000]
    return response.json()


def engine_up_metric(hub) -> float:
    response = requests.get(
        f"{hub.url}/services/ds01-ops/metrics",
        headers={"Authorization": f"token {hub.admin_token}"},
        timeout=60,
    )
    assert response.status_code == 200, response.text[:2000]
    (line,) = [x for x in response.text.splitlines() if x.startswith("ds01_docker_engine_up ")]
    return float(line.split()[1])


def my_images(hub, token: str) -> requests.Response:
    """The notebook service's `api/images` (lists the user's images on the engine)."""
    return requests.get(
        f"{hub.url}/services/ds01/api/images",
        headers={"Authorization": f"token {token}"},
        timeout=60,
    )


def test_the_engine_restarted_under_a_running_hub(hub_factory, engine, proxy, tmp_path):
    client = engine.client()
    gateway, proxy_log = proxy
    config = ON_PRIVATE_ENGINE.format(
        url=engine.url, ops_port=free_port(), service_port=free_port()
    )
    ds01 = Ds01Hub(hub_factory, tmp_path, extra_config=config)
    with ds01.hub as hub:  # stopped before the private engine goes
        check_recovery(ds01, hub, engine, client, gateway, proxy_log)


def check_recovery(ds01, hub, engine, client, gateway, proxy_log) -> None:
    alice, slow, admin = unique_name("ali"), unique_name("slow"), unique_name("adm")
    bob = unique_name("bob")
    for user in (alice, slow, bob):
        hub.create_user(user)
    hub.create_user(admin, admin=True)
    admin_token, alice_token = hub.token_for(admin), hub.token_for(alice)
    events = EventLog(ds01.state_dir / "events.db")

    # A container stopped behind the hub's back is seen at once (its die event), not at the
    # next periodic poll (30 s).
    hub.start_server(bob)
    hub.wait_ready(bob)
    client.containers.get(hub.server(bob)["state"]["object_id"]).stop(timeout=1)
    wait_until(lambda: hub.server(bob) is None, 15, 0.2, hub.log)

    hub.start_server(alice, options={"gpus": 1})
    hub.wait_ready(alice)
    hub.start_server(slow, options={"gpus": 1})
    assert first_progress_message(hub, slow, "waiting for Jupyter", timeout=120), hub.log()
    held = {h.user: h.slot_id for h in ds01.allocator(client).holdings()}
    assert set(held) == {alice, slow}, held
    assert gateway.ping() and my_images(hub, alice_token).status_code == 200
    assert ops_overview(hub, admin_token)["engine"]["up"] is True

    engine.stop()  # SIGTERM: dockerd stops its containers, then exits

    # The hub reports both servers as they are, while the engine is still down.
    wait_until(lambda: hub.server(alice) is None, 30, 0.5, hub.log)
    wait_until(lambda: hub.server(slow) is None, 30, 0.5, hub.log)
    failure = hub.progress_message(slow)
    assert "the Docker engine stopped during your spawn" in failure, failure
    assert "is unreachable" in hub.log(60000)
    # The others say so instead of failing.
    down = ops_overview(hub, admin_token)
    assert down["engine"]["up"] is False and "unreachable since" in down["engine_note"]
    assert engine_up_metric(hub) == 0
    refused = my_images(hub, alice_token)
    assert refused.status_code == 503 and "Docker engine is unreachable" in refused.json()["error"]
    with pytest.raises(docker.errors.APIError) as gateway_error:
        gateway.ping()
    assert gateway_error.value.response.status_code == 502
    assert "unreachable" in str(gateway_error.value)

    engine.start()

    # Holds of the containers that stopped with the engine are given back, with an event.
    allocator = ds01.allocator(client)
    wait_until(
        lambda: not [h for h in allocator.holdings() if h.user in (alice, slow)],
        60,
        0.5,
        lambda: f"{allocator.holdings()}\n{hub.log()}",
    )
    released = [(e.user, e.reason) for e in events.events(kind="release")]
    assert any(u == alice and "the Docker engine stopped at" in r for u, r in released), released
    assert any(u == slow for u, _ in released), released
    # slow's container had started: it held its slot as stopped until the engine was back
    failed = [(e.user, e.reason) for e in events.events(kind="spawn-failure")]
    assert any(u == slow and "stopped during your spawn" in r for u, r in failed), failed
    wait_until(lambda: "answers again" in hub.log(60000), 30, 0.5, hub.log)
    # Everything answers again, without a restart.
    assert gateway.ping()
    assert "unreachable" in proxy_log.read_text()  # the proxy's log names the outage
    wait_until(lambda: my_images(hub, alice_token).status_code == 200, 30, 0.5, hub.log)
    wait_until(lambda: ops_overview(hub, admin_token)["engine"]["up"], 30, 0.5, hub.log)
    assert "was unreachable from" in ops_overview(hub, admin_token)["engine_note"]
    assert engine_up_metric(hub) == 1
    # alice starts again: her container is re-created (its slot was given back).
    hub.start_server(alice, options={"gpus": 1})
    hub.wait_ready(alice)
    assert f"its GPU slot(s) {held[alice]} were given back (the Docker engine stopped at" in (
        hub.log(60000)
    )
