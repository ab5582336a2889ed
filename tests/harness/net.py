"""Ports and addresses for test processes."""

from __future__ import annotations

import socket

from ds01hub.host import bootstrap

#: Ports this test process handed out: the kernel may give a port it just gave back to the
#: very next bind (seen in CI: a hub's proxy and its API got the same port, EADDRINUSE).
_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now on ``host`` (the kernel picks it), never one this process handed
    out before (two ports asked for one hub are always different)."""
    while True:
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def docker_bridge_ip(docker_client=None) -> str:
    """The host's address on Docker's default bridge, where containers reach the hub
    (``ds01hub.host.bootstrap.docker_bridge_ip``; a docker client argument is accepted and
    unused)."""
    del docker_client
    return bootstrap.docker_bridge_ip()
