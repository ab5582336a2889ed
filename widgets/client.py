"""The widgets' way to the ds01 server extension (``{server}/ds01/...``) from inside a kernel.

The kernel runs next to the user's jupyter server. Inside JupyterHub it finds the server in
``$JUPYTERHUB_SERVICE_URL`` and authenticates with the server's own token
(``$JUPYTERHUB_API_TOKEN``); elsewhere it uses the first running jupyter server it can list.
Only the standard library is used, so the widgets work in any image that has ipywidgets.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse, urlunparse

from ds01hub.errors import Ds01hubError


class Ds01Error(Ds01hubError):
    """A request failed; ``message`` and ``hint`` are meant to be shown to the user as they are.

    ``status`` is the HTTP status (0 when nothing answered).
    """

    status = 0

    @property
    def unreachable(self) -> bool:
        return self.status in (0, 502, 503, 504)


@dataclass
class Ds01Client:
    """Talks to the ds01 server extension of one jupyter server."""

    server_url: str
    token: str = ""
    timeout: float = 60.0

    @classmethod
    def discover(cls) -> Ds01Client:
        """The client for the server this kernel belongs to; :class:`Ds01Error` if none."""
        url = os.environ.get("JUPYTERHUB_SERVICE_URL")
        token = os.environ.get("JUPYTERHUB_API_TOKEN", "")
        if url and token:
            return cls(_loopback(url), token)
        try:
            from jupyter_server.serverapp import list_running_servers

            server = next(iter(list_running_servers()), None)
        except ImportError:
            server = None
        if server:
            return cls(_loopback(server["url"]), server.get("token", ""))
        raise Ds01Error(
            "cannot find the jupyter server this notebook runs on",
            "open the notebook from JupyterHub (or JupyterLab), not from a plain Python shell",
        )

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """One JSON request to ``{server}/ds01/{path}``; returns the decoded answer."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.server_url.rstrip("/") + "/ds01/" + path.lstrip("/"),
            data=data,
            method=method,
            headers={"Content-Type": "application/json"}
            | ({"Authorization": f"token {self.token}"} if self.token else {}),
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as error:
            raise _error_from(error) from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise Ds01Error(
                f"your jupyter server did not answer ({reason})",
                "save your work and restart your server from the hub control panel",
            ) from None
        return json.loads(payload) if payload else None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any) -> Any:
        return self.request("POST", path, body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)


def _loopback(url: str) -> str:
    """``http://0.0.0.0:8888/user/a/`` -> ``http://127.0.0.1:8888/user/a/``: the kernel is local."""
    parts = urlparse(url)
    host = parts.hostname or "127.0.0.1"
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunparse(parts._replace(netloc=netloc))


def _error_from(error: urllib.error.HTTPError) -> Ds01Error:
    try:
        body = json.loads(error.read() or b"{}")
    except (json.JSONDecodeError, OSError):
        body = {}
    message = body.get("error") or body.get("message") or f"HTTP {error.code} {error.reason}"
    return Ds01Error(str(message), body.get("hint"), error.code)
