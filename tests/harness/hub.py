"""A real JupyterHub (+ configurable-http-proxy) for tests, driven through its REST API.

The hub runs as its own process from the test venv, with its database, cookie secret, config and
log in a temporary directory. The proxy listens on loopback; the hub's own port listens on the
Docker bridge address so that containers can reach it (and nothing outside this host can).
An admin service token drives the REST API. Containers started by the hub carry the labels
``ds01.test=1`` and ``ds01.test.hub=<hub id>``; ``Hub.stop()`` removes them, also after a failure.
Each hub has its own state directory (``Hub.state_dir``, its ``$DS01HUB_STATE_DIR``), hence its
own label key and deployment id: test hubs on one engine never count each other's containers.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import requests

from harness.naming import HUB_LABEL, SESSION_PID_LABEL, TEST_LABEL
from harness.net import free_port

ADMIN_SERVICE = "ds01-test-admin"
DEFAULT_PASSWORD = "ds01-test-password"

CONFIG_TEMPLATE = """\
# Written by tests/harness/hub.py for one test hub; extra config follows in extra_config.py.
import os
import sys

c = get_config()  # noqa: F821
c.JupyterHub.bind_url = {bind_url!r}
c.JupyterHub.hub_bind_url = {hub_bind_url!r}
c.JupyterHub.hub_connect_url = {hub_bind_url!r}
c.ConfigurableHTTPProxy.api_url = {proxy_api_url!r}
c.ConfigurableHTTPProxy.pid_file = {proxy_pid_file!r}
c.JupyterHub.pid_file = {hub_pid_file!r}
c.JupyterHub.db_url = {db_url!r}
c.JupyterHub.cookie_secret_file = {cookie_secret_file!r}
c.JupyterHub.allow_named_servers = True
c.JupyterHub.cleanup_servers = True

c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = {password!r}
c.Authenticator.allow_all = True

c.JupyterHub.services = [{{"name": {admin_service!r}, "api_token": {admin_token!r}}}]
c.JupyterHub.load_roles = [{{"name": "admin", "services": [{admin_service!r}]}}]

c.JupyterHub.spawner_class = {spawner!r}
c.DockerSpawner.image = {image!r}
c.DockerSpawner.prefix = {container_prefix!r}
c.DockerSpawner.remove = False
c.DockerSpawner.extra_create_kwargs = {{"labels": {labels!r}}}
c.Spawner.start_timeout = 180
c.Spawner.http_timeout = 120

load_subconfig({extra_config_file!r})  # noqa: F821
"""


class HubError(AssertionError):
    """The hub did not do what a test asked; the message carries the hub log's tail."""


@dataclass
class Hub:
    """One JupyterHub process; see the module docstring."""

    directory: Path
    hub_ip: str
    image: str = ""
    spawner: str = "docker"
    extra_config: str = ""
    docker_client: object | None = None
    password: str = DEFAULT_PASSWORD
    extra_env: dict[str, str] = field(default_factory=dict)
    hub_id: str = field(default_factory=lambda: secrets.token_hex(4))
    admin_token: str = field(default_factory=lambda: secrets.token_hex(24))
    labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.hub_url = f"{self.url}/hub/"
        self.hub_port = free_port(self.hub_ip)
        self.proxy_api_port = free_port()
        self.state_dir = self.directory / "state"
        self.labels = {
            TEST_LABEL: "1",
            HUB_LABEL: self.hub_id,
            SESSION_PID_LABEL: str(os.getpid()),
            **self.labels,
        }
        self.process: subprocess.Popen | None = None

    # -- process ------------------------------------------------------------------------------

    @property
    def config_file(self) -> Path:
        return self.directory / "jupyterhub_config.py"

    @property
    def log_file(self) -> Path:
        return self.directory / "hub.log"

    def render_config(self) -> str:
        return CONFIG_TEMPLATE.format(
            bind_url=self.url,
            hub_bind_url=f"http://{self.hub_ip}:{self.hub_port}",
            proxy_api_url=f"http://127.0.0.1:{self.proxy_api_port}",
            proxy_pid_file=str(self.directory / "proxy.pid"),
            hub_pid_file=str(self.directory / "hub.pid"),
            db_url=f"sqlite:///{self.directory / 'jupyterhub.sqlite'}",
            cookie_secret_file=str(self.directory / "cookie_secret"),
            password=self.password,
            admin_service=ADMIN_SERVICE,
            admin_token=self.admin_token,
            spawner=self.spawner,
            image=self.image,
            container_prefix=f"ds01test-{self.hub_id}",
            labels=self.labels,
            extra_config_file=str(self.directory / "extra_config.py"),
        )

    def start(self, timeout: float = 90) -> Hub:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "extra_config.py").write_text(
            "c = get_config()  # noqa: F821\n" + self.extra_config
        )
        self.config_file.write_text(self.render_config())
        env = os.environ | {"PYTHONUNBUFFERED": "1", "DS01HUB_STATE_DIR": str(self.state_dir)}
        env |= self.extra_env
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "jupyterhub", "-f", str(self.config_file)],
                cwd=self.directory,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise HubError(f"jupyterhub exited with {self.process.returncode}:\n{self.log()}")
            with contextlib.suppress(requests.ConnectionError, requests.Timeout):
                if self.api("GET", "/", timeout=5).status_code == 200:
                    return self
            time.sleep(0.3)
        self.stop()
        raise HubError(f"jupyterhub did not answer within {timeout:.0f}s:\n{self.log()}")

    def log(self, chars: int = 6000) -> str:
        if not self.log_file.exists():
            return "(no hub log)"
        return self.log_file.read_text(errors="replace")[-chars:]

    def stop(self, timeout: float = 60) -> None:
        """Stop the hub (it stops its servers and its proxy), then remove what is left of our
        containers. Safe to call twice and after a failed start."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._stop_orphaned_proxy()
        self.remove_containers()

    def _stop_orphaned_proxy(self) -> None:
        pid_file = self.directory / "proxy.pid"
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            pid = int(pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if (
                b"configurable-http-proxy" in cmdline
                and str(self.proxy_api_port).encode() in cmdline
            ):
                os.kill(pid, signal.SIGTERM)

    def containers(self, all: bool = True) -> list:
        """This hub's containers (needs the docker client)."""
        if self.docker_client is None:
            return []
        return self.docker_client.containers.list(
            all=all, filters={"label": f"{HUB_LABEL}={self.hub_id}"}
        )

    def container_of(self, user: str, name: str = ""):
        """The Docker container of a (running or pending) server, from the spawner's state."""
        server = self.server(user, name)
        if not server or not server.get("state", {}).get("object_id"):
            raise HubError(f"server {user}/{name!r} has no container: {server}")
        return self.docker_client.containers.get(server["state"]["object_id"])

    def remove_containers(self) -> None:
        for container in self.containers():
            with contextlib.suppress(Exception):
                container.remove(force=True, v=True)

    def __enter__(self) -> Hub:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- REST API -----------------------------------------------------------------------------

    def api(self, method: str, path: str, token: str | None = None, **kwargs) -> requests.Response:
        """Call ``/hub/api{path}`` with the admin service token (or ``token``)."""
        headers = {"Authorization": f"token {token or self.admin_token}"} | kwargs.pop(
            "headers", {}
        )
        kwargs.setdefault("timeout", 30)
        return requests.request(method, f"{self.url}/hub/api{path}", headers=headers, **kwargs)

    def _check(self, response: requests.Response, *ok: int) -> requests.Response:
        if response.status_code not in ok:
            raise HubError(
                f"{response.request.method} {response.url} -> {response.status_code} "
                f"{response.text[:2000]}\n--- hub log ---\n{self.log()}"
            )
        return response

    def create_user(self, name: str, admin: bool = False, groups=()) -> dict:
        """Create a user (or reuse one) and add it to ``groups`` (created when missing)."""
        response = self.api("POST", f"/users/{quote(name)}", json={"admin": admin})
        self._check(response, 201, 409)
        for group in groups:
            self._check(self.api("POST", f"/groups/{quote(group)}"), 201, 409)
            self._check(
                self.api("POST", f"/groups/{quote(group)}/users", json={"users": [name]}), 200
            )
        return self.user(name)

    def user(self, name: str) -> dict:
        return self._check(self.api("GET", f"/users/{quote(name)}"), 200).json()

    def token_for(self, name: str, scopes: list[str] | None = None, note: str = "test") -> str:
        """A new API token of the user (their default scopes unless ``scopes``)."""
        body = {"note": note} | ({"scopes": scopes} if scopes is not None else {})
        response = self.api("POST", f"/users/{quote(name)}/tokens", json=body)
        return self._check(response, 201).json()["token"]

    @staticmethod
    def _server_path(user: str, name: str) -> str:
        return (
            f"/users/{quote(user)}/servers/{quote(name)}"
            if name
            else f"/users/{quote(user)}/server"
        )

    def start_server(
        self, user: str, name: str = "", options: dict | None = None, check: bool = True
    ) -> requests.Response:
        """Ask the hub to start a (named) server with ``options`` (the spawner's user_options).
        With ``check`` a refusal raises; without, the response is returned as it is."""
        response = self.api("POST", self._server_path(user, name), json=options or {})
        return self._check(response, 201, 202) if check else response

    def server(self, user: str, name: str = "") -> dict | None:
        """The server model, or None when the hub has no such server."""
        return self.user(user).get("servers", {}).get(name)

    def wait_ready(self, user: str, name: str = "", timeout: float = 180) -> dict:
        """Wait until the server is ready; a failed spawn raises at once with the reason."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            server = self.server(user, name)
            if server and server.get("ready"):
                return server
            if not server or not server.get("pending"):
                raise HubError(
                    f"server {user}/{name!r} is not starting (spawn failed?): {server}\n"
                    f"{self.progress_message(user, name)}\n--- hub log ---\n{self.log()}"
                )
            time.sleep(0.5)
        raise HubError(f"server {user}/{name!r} not ready after {timeout:.0f}s\n{self.log()}")

    def progress_message(self, user: str, name: str = "") -> str:
        """The last event of the server's progress stream (why a spawn failed, say)."""
        path = f"/users/{quote(user)}/servers/{quote(name)}/progress"
        with contextlib.suppress(requests.RequestException):
            response = self.api("GET", path, stream=True, timeout=10)
            last = ""
            for line in response.iter_lines(decode_unicode=True):
                if line and line.startswith("data:"):
                    last = json.loads(line[5:]).get("message", "")
            return last
        return ""

    def stop_server(self, user: str, name: str = "", timeout: float = 120) -> None:
        """Stop a server and wait until the hub says it is stopped."""
        self._check(self.api("DELETE", self._server_path(user, name)), 202, 204, 400, 404)
        self._wait_stopped(user, name, timeout)

    def delete_server(self, user: str, name: str, timeout: float = 120) -> None:
        """Stop and forget a named server (the spawner may remove its container)."""
        path = self._server_path(user, name)
        self._check(self.api("DELETE", path, json={"remove": True}), 202, 204, 404)
        self._wait_stopped(user, name, timeout)

    def _wait_stopped(self, user: str, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            server = self.server(user, name)
            if not server or (not server.get("pending") and not server.get("ready")):
                return
            time.sleep(0.5)
        raise HubError(f"server {user}/{name!r} did not stop within {timeout:.0f}s\n{self.log()}")

    # -- as a user ----------------------------------------------------------------------------

    def user_url(self, user: str, name: str = "", path: str = "") -> str:
        server = f"{quote(user)}/{quote(name)}/" if name else f"{quote(user)}/"
        return f"{self.url}/user/{server}{path.lstrip('/')}"

    def user_request(
        self, token: str, method: str, user: str, path: str, name: str = "", **kwargs
    ) -> requests.Response:
        """A request to the user's server through the proxy, with ``token``."""
        kwargs.setdefault("timeout", 30)
        kwargs.setdefault("allow_redirects", False)
        headers = {"Authorization": f"token {token}"} | kwargs.pop("headers", {})
        return requests.request(method, self.user_url(user, name, path), headers=headers, **kwargs)

    def login(self, user: str, password: str | None = None) -> requests.Session:
        """A browser-like session logged in through the login form (DummyAuthenticator)."""
        session = requests.Session()
        session.get(f"{self.hub_url}login", timeout=30)
        response = session.post(
            f"{self.hub_url}login",
            data={
                "username": user,
                "password": password or self.password,
                "_xsrf": session.cookies.get("_xsrf", ""),
            },
            allow_redirects=False,
            timeout=30,
        )
        if response.status_code != 302:
            raise HubError(f"login of {user} failed: {response.status_code} {response.text[:500]}")
        return session


@dataclass
class HubFactory:
    """Starts hubs for tests and stops every one of them at the end of the session."""

    base_directory: Path
    hub_ip: str
    image: str
    docker_client: object | None = None
    hubs: list[Hub] = field(default_factory=list)

    def __call__(
        self,
        extra_config: str = "",
        spawner: str = "docker",
        image: str | None = None,
        env: dict[str, str] | None = None,
        labels: dict[str, str] | None = None,
    ) -> Hub:
        directory = self.base_directory / f"hub-{len(self.hubs)}-{secrets.token_hex(2)}"
        hub = Hub(
            directory=directory,
            hub_ip=self.hub_ip,
            image=self.image if image is None else image,
            spawner=spawner,
            extra_config=extra_config,
            docker_client=self.docker_client,
            extra_env=env or {},
            labels=labels or {},
        )
        self.hubs.append(hub)
        return hub.start()

    def stop_all(self) -> None:
        for hub in self.hubs:
            hub.stop()

    def remove_containers_of_dead_sessions(self) -> list[str]:
        """Containers left by test hubs of pytest sessions that no longer run (killed)."""
        removed = []
        for container in self.docker_client.containers.list(
            all=True, filters={"label": SESSION_PID_LABEL}
        ):
            if not _is_pytest_process(container.labels.get(SESSION_PID_LABEL, "")):
                with contextlib.suppress(Exception):
                    container.remove(force=True, v=True)
                    removed.append(container.name)
        return removed


def _is_pytest_process(pid: str) -> bool:
    try:
        return b"pytest" in Path(f"/proc/{int(pid)}/cmdline").read_bytes()
    except (ValueError, OSError):
        return False
