"""Mutual TLS to a node's engine, for real: a dockerd of the test's own (`PrivateEngine`) set up
as `ds01hub swarm-tls node` tells a node to be (`--tlsverify` with the cluster CA's server
certificate), reached the way the broker reaches a swarm node (`ds01hub.gpu.swarm_nodes`: the
nodes file's endpoint and certificate directory; the broker's own raw exec connection).
Refused: a client without a certificate, one of another CA, an engine reached by a name its
certificate does not carry."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import docker
import pytest
import requests
from docker.tls import TLSConfig
from harness.cli import busybox_image
from harness.engine import PrivateEngine
from harness.net import free_port

from ds01hub.actions.engines import ExecTarget
from ds01hub.gpu.swarm_nodes import parse_node_endpoints
from ds01hub.host import swarm_tls
from ds01hub.services.broker.app import Broker

pytestmark = [pytest.mark.docker, pytest.mark.root]


class TlsEngine(PrivateEngine):
    """A private dockerd that also listens on 127.0.0.1:PORT with `--tlsverify`."""

    def __init__(self, node_dir: Path, port: int):
        super().__init__()
        self.node_dir, self.port = node_dir, port

    def command(self) -> list[str]:
        tls = swarm_tls.daemon_tls(self.node_dir, self.port)
        return [
            *super().command(),
            f"--host=tcp://127.0.0.1:{self.port}",
            "--tlsverify",
            f"--tlscacert={tls['tlscacert']}",
            f"--tlscert={tls['tlscert']}",
            f"--tlskey={tls['tlskey']}",
        ]


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("swarm-tls") / "tls"
    swarm_tls.make_ca(directory)
    swarm_tls.node_certificate(directory, "node2", ["127.0.0.1"])
    swarm_tls.client_certificate(directory)
    return directory


@pytest.fixture(scope="module")
def engine(certificates):
    with TlsEngine(certificates / "nodes" / "node2", free_port()) as running:
        running.start()
        yield running


def endpoint(engine, certificates, host="127.0.0.1"):
    nodes = {"node2": {"url": f"tcp://{host}:{engine.port}", "tls": str(certificates / "client")}}
    return parse_node_endpoints({"nodes": nodes})["node2"]


def test_the_hub_s_client_certificate_reaches_the_node_s_engine(engine, certificates):
    client = endpoint(engine, certificates).docker_client(timeout=30)
    try:
        assert client.ping()
        assert client.version()["ApiVersion"]
    finally:
        client.close()


REFUSED = (docker.errors.DockerException, requests.exceptions.RequestException)


def _refused(engine, tls: TLSConfig) -> None:
    """A client with `tls` (and no CA of the environment's) cannot talk to the engine."""
    client = docker.DockerClient(f"tcp://127.0.0.1:{engine.port}", tls=tls, version="1.41")
    client.api.trust_env = False
    try:
        with pytest.raises(REFUSED):
            client.ping()
    finally:
        client.close()


def test_a_client_without_a_certificate_is_refused(engine, certificates):
    ca = str(certificates / "client" / "ca.pem")
    _refused(engine, TLSConfig(ca_cert=ca, verify=True))


def test_a_client_certificate_of_another_ca_is_refused(engine, certificates, tmp_path):
    """The client trusts the node (the right CA) but presents another CA's certificate."""
    other = tmp_path / "other"
    swarm_tls.make_ca(other)
    files = swarm_tls.client_certificate(other)
    tls = TLSConfig(
        client_cert=(str(files / "cert.pem"), str(files / "key.pem")),
        ca_cert=str(certificates / "client" / "ca.pem"),
        verify=True,
    )
    _refused(engine, tls)


def test_an_engine_not_named_by_its_certificate_is_refused(engine, certificates):
    """`localhost` is the same engine, but its certificate names only 127.0.0.1."""
    wrong = endpoint(engine, certificates, host="localhost")
    client = wrong.docker_client(timeout=30)
    try:
        with pytest.raises(REFUSED):
            client.ping()
    finally:
        client.close()


def test_the_broker_s_raw_connection_speaks_mutual_tls(engine, certificates):
    """The connection `container-run`'s exec stream takes (`Broker._connect_engine`)."""

    async def ping() -> bytes:
        stream = await Broker()._connect_engine(endpoint(engine, certificates))
        try:
            await stream.write(b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n")
            return await stream.read_until_close()
        finally:
            stream.close()

    answer = asyncio.run(ping())
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"OK")


def test_a_shell_s_output_comes_back_over_mutual_tls(engine, certificates, docker_client):
    """`container-run`'s exec stream (`Broker.open_exec_stream`) to a container on a node
    reached over TLS: the exec starts on that engine and its output comes back."""
    image = busybox_image(docker_client)
    engine.load_image(image)
    node = endpoint(engine, certificates)
    client = node.docker_client()
    container = client.containers.run(
        image, ["sleep", "600"], detach=True, network_mode="host", labels={"ds01.test": "1"}
    )
    try:
        exec_id = client.api.exec_create(
            container.id, ["sh", "-c", "echo over-$((6*7))"], tty=True
        )["Id"]
        broker = Broker()
        target = ExecTarget(node, client.api.api_version)
        broker.context = SimpleNamespace(engine=SimpleNamespace(exec_target=lambda _: target))

        async def run() -> bytes:
            stream = await broker.open_exec_stream(exec_id, tty=True)
            try:
                return await stream.read_until_close()
            finally:
                stream.close()

        assert b"over-42" in asyncio.run(run())
        assert client.api.exec_inspect(exec_id)["ExitCode"] == 0
    finally:
        container.remove(force=True)
        client.close()
