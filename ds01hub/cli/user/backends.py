"""How the users' commands reach the control plane.

On the host: the ds01 broker's unix socket (no token; the kernel tells the broker who we are).
Remotely (or inside a container): the JupyterHub REST API with the user's own token, which can
list, start, stop and remove servers but not reach Docker (no stats, shell or image builds).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from ds01hub import paths
from ds01hub.cli.output import EXIT_FAILURE, EXIT_USAGE, CliError
from ds01hub.services.broker.protocol import API_PREFIX, DEFAULT_SOCKET, EXEC_UPGRADE

BROKER_BROKE_OFF = (
    "see what happened with container-list --all; if it persists, tell your admin "
    "(the hub's log says why)"
)


def error_from_reply(status: int, body: Any) -> CliError:
    """A broker/hub JSON error -> CliError; 400 (bad input) exits 2, the rest 1."""
    if isinstance(body, dict) and body.get("error"):
        message, hint = str(body["error"]), body.get("hint")
    else:
        message, hint = f"the ds01 broker answered HTTP {status}", None
    return CliError(message, hint, EXIT_USAGE if status == 400 else EXIT_FAILURE)


def decode_json(data: bytes) -> Any:
    """A reply body as JSON; None when empty or not JSON (then the status code speaks)."""
    try:
        return json.loads(data) if data else None
    except ValueError:
        return None


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a unix socket (the broker)."""

    def __init__(self, path: str, timeout: float | None = None):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError as e:
            sock.close()
            raise CliError(
                f"cannot reach the ds01 broker at {self.socket_path}: {e.strerror or e}",
                hint="is JupyterHub running? Ask your admin, or set DS01HUB_BROKER_SOCKET",
            ) from None
        self.sock = sock


class BrokerBackend:
    """The broker's API (see ds01hub.services.broker.app) as plain method calls."""

    remote = False

    def __init__(self, socket_path: str, act_for: str | None = None, timeout: float = 120.0):
        self.socket_path = socket_path
        self.act_for = act_for
        self.timeout = timeout

    def _path(self, path: str, **params: Any) -> str:
        query = {k: v for k, v in params.items() if v not in (None, False)}
        if self.act_for:
            query["user"] = self.act_for
        query = {k: ("1" if v is True else v) for k, v in query.items()}
        return f"{API_PREFIX}{path}" + (f"?{urlencode(query)}" if query else "")

    @contextlib.contextmanager
    def _answer(self) -> Iterator[None]:
        """A broker that hangs up, times out or garbles its answer is a named failure (the
        work may or may not have happened: the user is told to look), never a traceback."""
        try:
            yield
        except TimeoutError:
            raise CliError(
                f"the ds01 broker at {self.socket_path} did not answer within {self.timeout:g} s",
                hint=BROKER_BROKE_OFF,
            ) from None
        except (http.client.HTTPException, OSError, ValueError) as e:
            raise CliError(
                f"the ds01 broker at {self.socket_path} broke off its answer "
                f"({type(e).__name__}{': ' + str(e) if str(e) else ''})",
                hint=BROKER_BROKE_OFF,
            ) from None

    def _open(self, method: str, path: str, body: Any = None, timeout: float | None = None):
        conn = UnixHTTPConnection(self.socket_path, timeout=timeout or self.timeout)
        payload = None if body is None else json.dumps(body)
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        with self._answer():
            conn.request(method, path, body=payload, headers=headers)
            return conn, conn.getresponse()

    def call(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        conn, response = self._open(method, self._path(path, **params), body)
        try:
            with self._answer():
                data = response.read()
        finally:
            conn.close()
        decoded = decode_json(data)
        if response.status >= 400:
            raise error_from_reply(response.status, decoded)
        return decoded

    def events(self, method: str, path: str, body: Any = None) -> Iterator[dict[str, Any]]:
        """Newline-delimited JSON events of a long request; an error event raises CliError."""
        conn, response = self._open(method, self._path(path), body, timeout=None)
        try:
            if response.status >= 400:
                with self._answer():
                    data = response.read()
                raise error_from_reply(response.status, decode_json(data))
            while True:
                with self._answer():
                    line = response.readline()
                    event = json.loads(line) if line.strip() else None
                if not line:
                    return
                if event is None:
                    continue
                if event.get("event") == "error":
                    raise error_from_reply(int(event.get("status") or 500), event)
                yield event
        finally:
            conn.close()

    def whoami(self) -> dict[str, Any]:
        return self.call("GET", "/whoami")

    def cull_warnings(self) -> list[dict[str, Any]]:
        return self.call("GET", "/warnings")

    def list_containers(self, include_stopped: bool) -> list[dict[str, Any]]:
        return self.call("GET", "/containers", all=include_stopped)

    def describe(self, project: str) -> dict[str, Any]:
        return self.call("GET", f"/containers/{quote(project, safe='')}")

    def start(
        self, project: str, options: dict[str, Any] | None, create: bool
    ) -> Iterator[dict[str, Any]]:
        body = {"options": options or {}, "create": create}
        return self.events("POST", f"/containers/{quote(project, safe='')}/start", body)

    def stop(self, project: str, timeout: float | None, force: bool) -> dict[str, Any]:
        body = {"timeout": timeout, "force": force}
        return self.call("POST", f"/containers/{quote(project, safe='')}/stop", body)

    def remove(self, project: str, force: bool) -> dict[str, Any]:
        return self.call("DELETE", f"/containers/{quote(project, safe='')}", force=force)

    def cleanup(self, include_running: bool) -> list[dict[str, Any]]:
        return self.call("POST", "/cleanup", {"all": include_running})

    def stats(self) -> list[dict[str, Any]]:
        return self.call("GET", "/stats")

    def quota(self) -> dict[str, Any]:
        return self.call("GET", "/quota")

    def images(self) -> list[dict[str, Any]]:
        return self.call("GET", "/images")

    def image_templates(self) -> list[dict[str, Any]]:
        return self.call("GET", "/images/templates")

    def build_image(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        return self.events("POST", "/images", request)

    def delete_image(self, name: str) -> dict[str, Any]:
        return self.call("DELETE", f"/images/{quote(name, safe='')}")

    def cancel_build(self) -> dict[str, Any]:
        return self.call("DELETE", "/builds/current")

    def open_exec(self, project: str, request: dict[str, Any]) -> tuple[socket.socket, str, bytes]:
        """Upgrade a connection to a shell in the container: returns the raw socket, the exec id
        and any output that arrived with the broker's 101 answer."""
        conn = UnixHTTPConnection(self.socket_path, timeout=self.timeout)
        conn.connect()
        sock = conn.sock
        body = json.dumps(request).encode()
        path = self._path(f"/containers/{quote(project, safe='')}/exec")
        head = (
            f"POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n"
            f"Upgrade: {EXEC_UPGRADE}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        sock.sendall(head + body)
        status, headers, rest = read_response_head(sock)
        if status != 101:
            sock.close()
            raise error_from_reply(status, decode_json(rest))
        sock.settimeout(None)
        return sock, headers.get("x-ds01-exec-id", ""), rest

    def exec_status(self, exec_id: str) -> dict[str, Any]:
        return self.call("GET", f"/exec/{exec_id}")


def read_response_head(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read an HTTP response head from a raw socket; returns status, lower-cased headers and
    the bytes already received after the head (the start of the relayed stream or the body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise CliError("the ds01 broker closed the connection unexpectedly")
        data += chunk
        if len(data) > 65536:
            raise CliError("the ds01 broker sent an oversized response head")
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    if status != 101 and "content-length" in headers:
        wanted = int(headers["content-length"])
        while len(rest) < wanted:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
    return status, headers, rest


def host_only(what: str) -> CliError:
    return CliError(
        f"{what} needs the ds01 broker on the host (Docker is not reachable remotely)",
        hint="run the command on the host over SSH",
    )


def read_token(env: dict[str, str]) -> str | None:
    """The user's hub token: $DS01HUB_TOKEN, $JUPYTERHUB_API_TOKEN, or the token file
    ($DS01HUB_TOKEN_FILE, default ~/.config/ds01hub/token, which must not be group/world
    readable)."""
    for key in ("DS01HUB_TOKEN", "JUPYTERHUB_API_TOKEN"):
        if env.get(key):
            return env[key].strip()
    path = Path(env.get("DS01HUB_TOKEN_FILE") or Path.home() / ".config" / "ds01hub" / "token")
    if not path.is_file():
        return None
    if path.stat().st_mode & 0o077:
        raise CliError(
            f"token file {path} is readable by others",
            hint=f"chmod 600 {path}",
        )
    return path.read_text().strip() or None


def hub_url_from(env: dict[str, str]) -> str | None:
    """$DS01HUB_HUB_URL, or inside a single-user container the hub JupyterHub told it about."""
    if env.get("DS01HUB_HUB_URL"):
        return env["DS01HUB_HUB_URL"]
    api = env.get("JUPYTERHUB_API_URL", "")
    return api[: -len("/hub/api")] if api.endswith("/hub/api") else None


def connect(act_for: str | None = None, env: dict[str, str] | None = None):
    """Pick the backend: an explicit hub URL with a token wins; else the broker's socket."""
    env = dict(os.environ if env is None else env)
    socket_path = env.get(paths.ENV_BROKER_SOCKET, DEFAULT_SOCKET)
    hub_url = hub_url_from(env)
    if env.get("DS01HUB_HUB_URL") or (hub_url and not os.path.exists(socket_path)):
        token = read_token(env)
        if not token:
            raise CliError(
                f"no API token for the hub at {hub_url}",
                hint="create one in the hub's Token page and put it in DS01HUB_TOKEN or "
                "~/.config/ds01hub/token (chmod 600)",
            )
        from ds01hub.cli.user.remote import HubBackend  # asyncio, the hub client: only here

        return HubBackend(hub_url, token, act_for)
    return BrokerBackend(socket_path, act_for)
