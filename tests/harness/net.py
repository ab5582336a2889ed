"""Ports and addresses for test processes."""

from __future__ import annotations

import fcntl
import socket
import struct

SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now on ``host`` (the kernel picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def interface_ipv4(interface: str) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("256s", interface.encode()[:15])
        return socket.inet_ntoa(fcntl.ioctl(sock.fileno(), SIOCGIFADDR, request)[20:24])


def docker_bridge_ip(docker_client) -> str:
    """The host's address on Docker's default bridge: containers reach the hub there.
    Docker's default bridge often records no gateway, so ask the bridge interface itself."""
    attrs = docker_client.networks.get("bridge").attrs
    for config in attrs.get("IPAM", {}).get("Config") or []:
        if config.get("Gateway"):
            return config["Gateway"]
    interface = attrs.get("Options", {}).get("com.docker.network.bridge.name", "docker0")
    try:
        return interface_ipv4(interface)
    except OSError as error:
        raise RuntimeError(f"no IPv4 address on Docker's bridge {interface}: {error}") from error
