"""The harness's real JupyterHub (+ configurable-http-proxy) with the ds01 service, for the
notebook tests that need no Docker (service, server extension, widgets): users' single-user
servers, where a test needs them, are local processes (``SimpleLocalProcessSpawner``) that load
the ds01 extension from the shipped ``jupyter-config`` file."""

from __future__ import annotations

import time
from pathlib import Path

import requests

from harness import Hub, HubError, free_port

REPO = Path(__file__).resolve().parents[2]

SERVICE_CONFIG = """
from ds01hub.hub.services import configure_notebook
configure_notebook(c, url="http://127.0.0.1:{port}", service_args={args!r})
"""

LOCAL_SERVERS_CONFIG = """
import sys
c.SimpleLocalProcessSpawner.home_dir_template = "{directory}/homes/{{username}}"
c.Spawner.cmd = [sys.executable, "-m", "jupyterhub.singleuser"]
c.Spawner.args = ["--allow-root"]  # this test machine runs everything as root
c.Spawner.default_url = "/lab"
c.Spawner.http_timeout = 60
c.Spawner.environment = {{
    "JUPYTER_CONFIG_PATH": "{repo}/jupyter-config",
    "DS01_SERVICE_URL": lambda spawner: (
        "http://127.0.0.1:{closed_port}/services/ds01/"
        if spawner.user.name.startswith("down")
        else "http://127.0.0.1:{port}/services/ds01/"
    ),
}}
"""


def start_service_hub(directory: Path, base_image: str = "", local_servers: bool = False) -> Hub:
    """A started hub running the ds01 service (on loopback). With ``local_servers``, users get
    local single-user servers; those whose name starts with ``down`` get a service URL where
    nothing listens (for the 'service unreachable' paths)."""
    port = free_port()
    args = [
        "--DS01Service.ca_bundle=/etc/ssl/certs/ca-certificates.crt",
        f"--DS01Service.state_dir={directory / 'state'}",  # the hub's own (harness.Hub)
    ]
    if base_image:
        args.append(f"--DS01Service.base_image={base_image}")
    config = SERVICE_CONFIG.format(port=port, args=args)
    if local_servers:
        config += LOCAL_SERVERS_CONFIG.format(
            directory=directory, repo=REPO, port=port, closed_port=free_port()
        )
    hub = Hub(directory=directory, hub_ip="127.0.0.1", spawner="simple", extra_config=config)
    hub.start()
    _wait_for_service(hub)
    return hub


def _wait_for_service(hub: Hub, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if service_request(hub, "GET", "api/templates", None).status_code == 403:
                return  # the service answers (and wants a token)
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    hub.stop()
    raise HubError(f"the ds01 service did not come up:\n{hub.log()}")


def service_request(hub: Hub, method: str, path: str, token: str | None, **kw):
    """A request to the ds01 service through the proxy, with ``token`` (or none)."""
    headers = {"Authorization": f"token {token}"} if token else {}
    return requests.request(
        method,
        f"{hub.url}/services/ds01/{path}",
        headers=headers,
        allow_redirects=False,
        timeout=60,
        **kw,
    )


def service_get(hub: Hub, path: str, token: str | None):
    return service_request(hub, "GET", path, token)


def start_server(hub: Hub, user: str) -> None:
    """Start the user's default server and wait until it is ready."""
    hub.start_server(user)
    hub.wait_ready(user, timeout=90)
