"""How the hub side reaches each swarm node's own Docker engine, and with which credentials.

The manager's API knows services, tasks and nodes, but a task's *container* lives in its node's
engine: `container-run` (exec), `container-stats` and a forced `container-stop` must talk to
that engine. A node's engine is root on that node, so the way there is authenticated both
ways: Docker's own TLS setup (`dockerd --tlsverify`, docs.docker.com "Protect the Docker daemon
socket"), the engine on `tcp://ADDR:2376` with a server certificate, ds01hub with a client
certificate, both signed by a CA of the cluster's own (`ds01hub swarm-tls` makes it). The
engine refuses any client without a certificate of that CA; ds01hub refuses any engine whose
certificate is not of that CA and for that address. Nothing else is accepted over TCP: an
endpoint `tcp://` without a certificate directory is refused at load. A `unix://` endpoint
(a node's socket forwarded or mounted onto the manager, as the tests do) is trusted by its file
permissions and needs none.

The map is one file (`/etc/ds01hub/swarm-nodes.yaml`, read strictly like the limits file):

    nodes:
      node2: {url: "tcp://10.0.0.2:2376", tls: /etc/ds01hub/swarm-tls}
      node3: {url: "tcp://10.0.0.3:2376", tls: /etc/ds01hub/swarm-tls}

`tls` is a directory in Docker's `DOCKER_CERT_PATH` layout: `ca.pem`, `cert.pem`, `key.pem`.
A node not in the map, or a certificate file missing, is a named error when it is needed
(`NodeEngineError`), never a fall back to another engine.
"""

from __future__ import annotations

import os
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field

from ds01hub.bodies import Body, BodyError, parse_data
from ds01hub.errors import Ds01hubError
from ds01hub.strict_yaml import StrictYamlError, read_yaml_file

__all__ = [
    "TLS_FILES",
    "NodeEndpoint",
    "NodeEngineError",
    "NodeEngines",
    "load_node_endpoints",
    "parse_node_endpoints",
]

#: Docker's client certificate layout (`DOCKER_CERT_PATH`, `docker --tlsverify`)
TLS_FILES = ("ca.pem", "cert.pem", "key.pem")
#: the Engine API version spoken to a node (Docker 20.10's, the oldest engine ds01hub runs on;
#: later engines serve it too)
ENGINE_API_VERSION = "1.41"
#: what the hint of an error says to do
MAP_HINT = (
    "list every swarm node in the nodes file (`nodes: {HOST: {url: tcp://ADDR:2376, tls: DIR}}`;"
    " README, 'More than one machine')"
)


class NodeEngineError(Ds01hubError):
    """A node's engine cannot be reached as configured (not in the map, no certificate)."""

    status = 503


class NodeEntry(Body):
    url: str = Field(
        description="the node's engine: tcp://ADDR:PORT (with tls) or unix:///PATH",
        min_length=1,
        max_length=512,
    )
    tls: str | None = Field(
        None,
        description="a directory with ca.pem, cert.pem and key.pem (Docker's DOCKER_CERT_PATH "
        "layout); required for tcp://",
        max_length=4096,
    )


class NodesFile(Body):
    nodes: dict[str, NodeEntry] = Field(
        description="swarm node hostname -> {url, tls}, one per node",
    )


@dataclass(frozen=True)
class NodeEndpoint:
    """One node's engine: its URL and, for TCP, the directory of its TLS credentials."""

    hostname: str
    url: str
    tls: Path | None = None

    def tls_files(self) -> tuple[Path, Path, Path]:
        """(ca, cert, key), each checked to exist and be readable now (NodeEngineError)."""
        if self.tls is None:
            raise NodeEngineError(f"node {self.hostname}'s engine {self.url} has no TLS directory")
        files = tuple(self.tls / name for name in TLS_FILES)
        for path in files:
            if not os.access(path, os.R_OK):
                raise NodeEngineError(
                    f"node {self.hostname}: {path} is missing or unreadable",
                    hint=f"put the cluster CA's ca.pem and this hub's client cert.pem and key.pem "
                    f"in {self.tls} (`ds01hub swarm-tls client --out {self.tls}`)",
                )
        ca, cert, key = files
        return ca, cert, key

    def docker_client(self, timeout: int = 60) -> Any:
        """A docker-py client of this engine: mutual TLS (docker-py's `TLSConfig`, the CA's
        certificate verified, ours presented) for TCP, the socket itself for unix.

        The environment is not trusted (`trust_env = False`): requests would otherwise put
        `$REQUESTS_CA_BUNDLE` (common where a site CA intercepts TLS) in place of the cluster's
        CA, and send the engine's API through `$HTTPS_PROXY`. Hence also a fixed API version
        (no negotiation before the setting applies)."""
        import docker
        from docker.tls import TLSConfig

        tls: TLSConfig | bool = False
        if self.tls is not None:
            ca, cert, key = self.tls_files()
            tls = TLSConfig(client_cert=(str(cert), str(key)), ca_cert=str(ca), verify=True)
        client = docker.DockerClient(
            base_url=self.url, tls=tls, timeout=timeout, version=ENGINE_API_VERSION
        )
        client.api.trust_env = False
        return client

    def ssl_context(self) -> ssl.SSLContext | None:
        """The same mutual TLS for a raw connection (the broker's exec stream); None: unix."""
        if self.tls is None:
            return None
        ca, cert, key = self.tls_files()
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
        context.load_cert_chain(str(cert), str(key))
        return context

    @property
    def address(self) -> tuple[str, int] | str:
        """(host, port) of a TCP endpoint, or the path of a unix one."""
        parts = urlsplit(self.url)
        if parts.scheme == "unix":
            return parts.path
        return str(parts.hostname), int(parts.port or 2376)


def _endpoint(hostname: str, entry: NodeEntry) -> NodeEndpoint:
    parts = urlsplit(entry.url)
    if parts.scheme == "unix":
        if not parts.path.startswith("/") or parts.netloc:
            raise NodeEngineError(
                f"node {hostname}: {entry.url!r} is not unix:///ABSOLUTE/PATH", status=400
            )
        return NodeEndpoint(hostname, entry.url, Path(entry.tls) if entry.tls else None)
    if parts.scheme != "tcp" or not parts.hostname or parts.path not in ("", "/"):
        raise NodeEngineError(
            f"node {hostname}: {entry.url!r} is neither tcp://ADDR:PORT nor unix:///PATH",
            hint=MAP_HINT,
            status=400,
        )
    if not entry.tls:
        raise NodeEngineError(
            f"node {hostname}: {entry.url} without `tls`: a node's engine over TCP is reached "
            "only with mutual TLS",
            hint="give the node `tls: DIR` (ca.pem, cert.pem, key.pem) and run its dockerd with "
            "--tlsverify (README, 'More than one machine')",
            status=400,
        )
    try:
        parts.port  # noqa: B018 (a bad port raises here)
    except ValueError:
        raise NodeEngineError(f"node {hostname}: bad port in {entry.url!r}", status=400) from None
    return NodeEndpoint(hostname, f"tcp://{parts.netloc}", Path(entry.tls))


def parse_node_endpoints(
    data: object, what: str = "the swarm nodes file"
) -> dict[str, NodeEndpoint]:
    """hostname -> NodeEndpoint from the file's data; a BodyError or NodeEngineError (400)
    naming the node and the fix for anything else."""
    parsed = parse_data(NodesFile, data, what)
    return {host: _endpoint(host, entry) for host, entry in parsed.nodes.items()}


def load_node_endpoints(path: str | os.PathLike) -> dict[str, NodeEndpoint]:
    """Read and check the nodes file (strict YAML: bounded, duplicate keys refused)."""
    try:
        document = read_yaml_file(path)
    except OSError as e:
        raise NodeEngineError(
            f"cannot read the swarm nodes file {path}: {e.strerror}", hint=MAP_HINT
        ) from None
    except StrictYamlError as e:
        raise NodeEngineError(
            f"the swarm nodes file {path}: {e.message}", hint=MAP_HINT, status=400
        ) from None
    try:
        return parse_node_endpoints(document.data, f"the swarm nodes file {path}")
    except BodyError as e:
        raise NodeEngineError(e.message, hint=e.hint or MAP_HINT, status=400) from None


class NodeEngines:
    """The engines of the swarm's nodes, by hostname: one docker-py client each, made on first
    use (thread-safe) from the map; `endpoint(host)` refuses a node the map lacks."""

    def __init__(self, endpoints: Mapping[str, NodeEndpoint]):
        self.endpoints = dict(endpoints)
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()

    def endpoint(self, hostname: str) -> NodeEndpoint:
        found = self.endpoints.get(hostname)
        if found is None:
            raise NodeEngineError(
                f"swarm node {hostname!r} has no engine endpoint in the nodes file",
                hint=MAP_HINT,
            )
        return found

    def client(self, hostname: str) -> Any:
        endpoint = self.endpoint(hostname)
        with self._lock:
            if hostname not in self._clients:
                self._clients[hostname] = endpoint.docker_client()
            return self._clients[hostname]
