"""Ports and addresses for test processes."""

from __future__ import annotations

import socket

from ds01hub.host import bootstrap


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now on ``host`` (the kernel picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def docker_bridge_ip(docker_client=None) -> str:
    """The host's address on Docker's default bridge, where containers reach the hub
    (``ds01hub.host.bootstrap.docker_bridge_ip``; a docker client argument is accepted and
    unused)."""
    del docker_client
    return bootstrap.docker_bridge_ip()
