"""The ds01hub test harness: a real Docker engine, real images, a real JupyterHub.

Fixtures live in tests/conftest.py; the pieces they are made of live here, so a test module can
also use them directly (``from harness import Hub, unique_name``).
"""

from harness.hub import Hub, HubError, HubFactory
from harness.naming import TEST_LABEL, unique_name
from harness.net import docker_bridge_ip, free_port
from harness.wait import WaitTimeout, wait_until, wait_until_async

__all__ = [
    "TEST_LABEL",
    "WaitTimeout",
    "Hub",
    "HubError",
    "HubFactory",
    "docker_bridge_ip",
    "free_port",
    "unique_name",
    "wait_until",
    "wait_until_async",
]
