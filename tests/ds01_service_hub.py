"""A real JupyterHub (+ configurable-http-proxy) running the ds01 service, for the notebook
tests (service, server extension, widgets). Users' single-user servers, where a test needs them,
are local processes (``SimpleLocalProcessSpawner``) with the ds01 extension enabled."""

import secrets
import subprocess
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceHub:
    """A JupyterHub with the ds01 service, driven by an admin service token."""

    def __init__(self, directory, base_image: str = "", extra_config: str = ""):
        self.directory = directory
        self.port, self.hub_port, self.api_port, self.service_port = (
            _free_port() for _ in range(4)
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_token = secrets.token_hex(16)
        self.base_image = base_image
        self.extra_config = extra_config
        self.process = None

    def config(self) -> str:
        args = [f"--DS01Service.base_image={self.base_image}"] if self.base_image else []
        args.append("--DS01Service.ca_bundle=/etc/ssl/certs/ca-certificates.crt")
        return f"""
import sys
from ds01hub.service import configure_hub
c.JupyterHub.bind_url = "{self.url}"
c.JupyterHub.hub_bind_url = "http://127.0.0.1:{self.hub_port}"
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{self.api_port}"
c.JupyterHub.allow_named_servers = True
c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = "pw"
c.Authenticator.allow_all = True
c.JupyterHub.db_url = "sqlite:///{self.directory}/hub.sqlite"
c.JupyterHub.cookie_secret_file = "{self.directory}/cookie_secret"
c.ConfigurableHTTPProxy.pid_file = "{self.directory}/proxy.pid"
c.JupyterHub.services = [{{"name": "test-admin", "api_token": "{self.admin_token}"}}]
c.JupyterHub.load_roles = [{{"name": "test-admin", "services": ["test-admin"],
    "scopes": ["admin:users", "tokens", "admin:servers"]}}]
configure_hub(c, url="http://127.0.0.1:{self.service_port}", service_args={args!r})
{self.extra_config}
"""

    def start(self) -> "ServiceHub":
        config = self.directory / "jupyterhub_config.py"
        config.write_text(self.config())
        log = open(self.directory / "hub.log", "wb")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub", "-f", str(config)],
            cwd=self.directory,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log()
            try:
                if self.service_get("api/templates", self.admin_token).status_code in (200, 403):
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        raise AssertionError("hub/service did not come up:\n" + self.log())

    def log(self) -> str:
        return (self.directory / "hub.log").read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(20)

    def api(self, method: str, path: str, **kw) -> requests.Response:
        headers = {"Authorization": f"token {self.admin_token}"}
        return requests.request(method, f"{self.url}/hub/api{path}", headers=headers, **kw)

    def create_user(self, name: str) -> None:
        assert self.api("POST", f"/users/{name}").status_code in (201, 409)

    def token_for(self, name: str, scopes: list[str] | None = None) -> str:
        body = {"note": "test"} | ({"scopes": scopes} if scopes is not None else {})
        response = self.api("POST", f"/users/{name}/tokens", json=body)
        assert response.status_code == 201, response.text
        return response.json()["token"]

    def service_request(self, method: str, path: str, token: str | None, **kw):
        headers = {"Authorization": f"token {token}"} if token else {}
        return requests.request(
            method,
            f"{self.url}/services/ds01/{path}",
            headers=headers,
            allow_redirects=False,
            timeout=30,
            **kw,
        )

    def service_get(self, path: str, token: str | None) -> requests.Response:
        return self.service_request("GET", path, token)

    def start_server(self, name: str, timeout: float = 60) -> None:
        """Start the user's default server and wait until the hub says it is ready."""
        response = self.api("POST", f"/users/{name}/server")
        assert response.status_code in (201, 202), response.text
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            server = self.api("GET", f"/users/{name}").json()["servers"].get("", {})
            if server.get("ready"):
                return
            time.sleep(0.3)
        raise AssertionError(f"server of {name} did not become ready:\n" + self.log())

    def stop_server(self, name: str) -> None:
        self.api("DELETE", f"/users/{name}/server")


def local_servers_hub(directory: Path) -> ServiceHub:
    """A hub whose users get local single-user servers that load the ds01 extension from the
    shipped ``jupyter-config`` file. Users whose name starts with ``down`` get a service URL
    where nothing listens (for the 'service unreachable' paths)."""
    hub = ServiceHub(directory)
    closed_port = _free_port()
    hub.extra_config = f"""
c.JupyterHub.spawner_class = "simple"
c.SimpleLocalProcessSpawner.home_dir_template = "{directory}/homes/{{username}}"
c.Spawner.cmd = [sys.executable, "-m", "jupyterhub.singleuser"]
c.Spawner.args = ["--allow-root"]  # this test machine runs everything as root
c.Spawner.default_url = "/lab"
c.Spawner.http_timeout = 60
c.Spawner.environment = {{
    "JUPYTER_CONFIG_PATH": "{REPO}/jupyter-config",
    "DS01_SERVICE_URL": lambda spawner: (
        "http://127.0.0.1:{closed_port}/services/ds01/"
        if spawner.user.name.startswith("down")
        else "http://127.0.0.1:{hub.service_port}/services/ds01/"
    ),
}}
"""
    return hub
