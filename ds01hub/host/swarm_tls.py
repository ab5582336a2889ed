"""`ds01hub swarm-tls`: the cluster's own CA and the certificates for mutual TLS between the hub
and each node's Docker engine (Docker's documented `--tlsverify` setup, docs.docker.com
"Protect the Docker daemon socket"), made with certipy (JupyterHub's own tool for its
internal TLS).

    ds01hub swarm-tls ca                                # once, on the manager
    ds01hub swarm-tls node node2 --address 10.0.0.2     # per node: copy nodes/node2/ there
    ds01hub swarm-tls client                            # the hub's: the nodes file's `tls:`

Layout under DIR (default /etc/ds01hub/swarm-tls, the CA's key only there, 0700):
`store/` (certipy's: the CA key), `nodes/HOST/{ca.pem,server-cert.pem,server-key.pem}` (the
node's dockerd: `tlsverify`, `tlscacert`, `tlscert`, `tlskey` in its daemon.json, which the
command prints), `client/{ca.pem,cert.pem,key.pem}` (Docker's DOCKER_CERT_PATH layout:
`ds01hub.gpu.swarm_nodes`). A node's certificate names its addresses (IP or DNS): the hub
checks that the engine it reached is the one the nodes file names.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import secrets
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ds01hub.errors import Ds01hubError, render

__all__ = [
    "DEFAULT_DIR",
    "client_certificate",
    "daemon_tls",
    "make_ca",
    "node_certificate",
    "run_command",
]

DEFAULT_DIR = Path("/etc/ds01hub/swarm-tls")
CA_NAME = "ds01hub-swarm-ca"
CLIENT_NAME = "ds01hub-hub"
DOCKER_TLS_PORT = 2376
HOSTNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}")


class SwarmTlsError(Ds01hubError):
    """A certificate cannot be made as asked (no CA yet, a bad address)."""


def _certipy(directory: Path) -> Any:
    from certipy import Certipy

    store = directory / "store"
    store.mkdir(parents=True, exist_ok=True)
    store.chmod(0o700)
    return Certipy(store_dir=str(store))


def _serial() -> int:
    return secrets.randbits(63) | 1  # unique and positive, as RFC 5280 asks


def make_ca(directory: Path) -> Path:
    """The cluster's CA (its key stays in DIR/store); returns its certificate. An existing CA
    is kept: replacing it would lock the hub out of every node until all are re-issued."""
    certipy = _certipy(directory)
    record = certipy.store.get_record(CA_NAME) if _has(certipy, CA_NAME) else None
    if record is None:
        record = certipy.create_ca(CA_NAME, serial=_serial())
    return Path(record["files"]["cert"])


def _has(certipy: Any, name: str) -> bool:
    try:
        certipy.store.get_record(name)
    except Exception:  # certipy raises a bare CertNotFoundError (its own, not exported)
        return False
    return True


def _ca_cert(directory: Path) -> tuple[Any, Path]:
    certipy = _certipy(directory)
    if not _has(certipy, CA_NAME):
        raise SwarmTlsError(
            f"no cluster CA in {directory}",
            hint=f"make it first: ds01hub swarm-tls ca --dir {directory}",
        )
    return certipy, Path(certipy.store.get_record(CA_NAME)["files"]["cert"])


def _alt_name(address: str) -> str:
    try:
        return f"IP:{ipaddress.ip_address(address)}"
    except ValueError:
        pass
    labels = address.split(".")
    if (
        not address
        or len(address) > 253
        or not all(
            label and len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii()
            for label in labels
        )
    ):
        raise SwarmTlsError(
            f"{address!r} is neither an IP address nor a DNS name",
            hint="give the address the hub uses in the nodes file's url (tcp://ADDRESS:2376)",
        )
    return f"DNS:{address.lower()}"


def _issue(certipy: Any, name: str, alt_names: list[str]) -> tuple[Path, Path]:
    record = certipy.create_signed_pair(
        name, CA_NAME, alt_names=alt_names or None, serial=_serial(), overwrite=True
    )
    return Path(record["files"]["cert"]), Path(record["files"]["key"])


def _install(target: Path, files: dict[str, Path]) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    target.chmod(0o700)
    for name, source in files.items():
        destination = target / name
        shutil.copyfile(source, destination)
        destination.chmod(0o600 if "key" in name else 0o644)
    return target


def node_certificate(directory: Path, hostname: str, addresses: Sequence[str]) -> Path:
    """A server certificate for node `hostname`'s dockerd, valid for `addresses`; returns the
    directory to copy to the node."""
    if not HOSTNAME.fullmatch(hostname):
        raise SwarmTlsError(
            f"{hostname!r} is not a swarm node hostname",
            hint="give the node's hostname as `docker node ls` shows it",
        )
    if not addresses:
        raise SwarmTlsError(
            f"node {hostname}: no --address",
            hint="give every address the hub reaches the node's engine by (IP or DNS name)",
        )
    alt_names = [_alt_name(a) for a in addresses]
    certipy, ca = _ca_cert(directory)
    cert, key = _issue(certipy, f"node-{hostname}", alt_names)
    return _install(
        directory / "nodes" / hostname,
        {"ca.pem": ca, "server-cert.pem": cert, "server-key.pem": key},
    )


def client_certificate(directory: Path) -> Path:
    """The hub's client certificate (what the nodes file's `tls:` names)."""
    certipy, ca = _ca_cert(directory)
    cert, key = _issue(certipy, CLIENT_NAME, [])
    return _install(directory / "client", {"ca.pem": ca, "cert.pem": cert, "key.pem": key})


def daemon_tls(node_directory: Path, port: int = DOCKER_TLS_PORT) -> dict[str, Any]:
    """The node's daemon.json keys for mutual TLS (its certificate files where they are now)."""
    return {
        "tlsverify": True,
        "tlscacert": str(node_directory / "ca.pem"),
        "tlscert": str(node_directory / "server-cert.pem"),
        "tlskey": str(node_directory / "server-key.pem"),
        "hosts": ["unix:///var/run/docker.sock", f"tcp://0.0.0.0:{port}"],
    }


def run_command(args: argparse.Namespace) -> int:
    directory: Path = args.dir
    old = os.umask(0o077)
    try:
        if args.what == "ca":
            print(f"cluster CA: {make_ca(directory)}")
        elif args.what == "client":
            print(
                f"the hub's client certificate: {client_certificate(directory)} "
                "(the nodes file's `tls:`)"
            )
        else:
            if not args.hostname:
                raise SwarmTlsError(
                    "which node?", hint="ds01hub swarm-tls node HOST --address ADDR"
                )
            target = node_certificate(directory, args.hostname, args.address)
            print(
                f"copy {target} to {args.hostname} (e.g. /etc/docker/tls) and merge into its "
                "/etc/docker/daemon.json (paths there):"
            )
            print(json.dumps(daemon_tls(Path("/etc/docker/tls")), indent=2))
    except (Ds01hubError, OSError) as error:
        print(render(error, "ds01hub swarm-tls"), file=sys.stderr)
        return 1
    finally:
        os.umask(old)
    return 0
