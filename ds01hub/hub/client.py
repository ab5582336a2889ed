"""A small JupyterHub REST client: the one way ds01hub front ends start, stop and list servers.

Both the broker (acting for a user with its service token) and the remote CLI (with the user's
own token) go through the hub, so quotas and GPU allocation run the same code as the browser.
Built on tornado's AsyncHTTPClient, which JupyterHub already depends on. Tornado is imported
where it is used, so the host CLI (which only needs `HubError` and the pure helpers here when it
talks to the broker) runs on the standard library alone.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from ds01hub.errors import Ds01hubError

if TYPE_CHECKING:
    from tornado.httpclient import HTTPRequest, HTTPResponse


class HubError(Ds01hubError):
    """The hub refused or failed a request; `status` is the HTTP status, `message` the hub's."""

    def __init__(self, status: int, message: str):
        super().__init__(message, status=status)

    def __str__(self) -> str:
        return f"{self.status}: {self.message}"


class HubUnreachable(HubError):  # noqa: N818 -- reads as what happened: raise HubUnreachable
    """No answer from the hub at all (connection refused, no route, timed out): `status` is 0
    for a failed connection, 599 for a timeout (tornado's code)."""


def server_path(user: str, server: str = "") -> str:
    """API path of a user's server: the default server is `server`, named ones `servers/NAME`."""
    base = f"/users/{quote(user, safe='')}"
    return f"{base}/server" if not server else f"{base}/servers/{quote(server, safe='')}"


def parse_sse(buffer: str) -> tuple[list[dict[str, Any]], str]:
    """Split a server-sent-events buffer into complete JSON `data:` events and the unparsed rest.

    The hub sends `data: {...}\\n\\n` per event and bare blank lines as keepalives.
    """
    events = []
    *blocks, rest = buffer.split("\n\n")
    for block in blocks:
        data = "\n".join(
            line[5:].lstrip() for line in block.splitlines() if line.startswith("data:")
        )
        if data:
            events.append(json.loads(data))
    return events, rest


def hub_error_message(body: bytes | None, fallback: str) -> str:
    """The human message from a hub error body (`{"status":..., "message":...}`)."""
    try:
        return str(json.loads(body or b"")["message"])
    except (ValueError, KeyError, TypeError):
        return fallback


class HubClient:
    """JupyterHub REST API as an async client.

    `api_url` is the hub's API root (`http://127.0.0.1:8081/hub/api`); `token` a service token
    (broker) or a user's own API token (remote CLI).
    """

    def __init__(self, api_url: str, token: str, request_timeout: float = 60.0):
        self.api_url = api_url.rstrip("/")
        self.token = token
        self.request_timeout = request_timeout
        from tornado.httpclient import AsyncHTTPClient

        self.http = AsyncHTTPClient()

    def _request(self, method: str, path: str, body: Any = None, **kw: Any) -> HTTPRequest:
        from tornado.httpclient import HTTPRequest

        payload = None if body is None else json.dumps(body)
        if payload is None and method in ("POST", "PUT", "PATCH"):
            payload = ""
        kw.setdefault("request_timeout", self.request_timeout)
        return HTTPRequest(
            self.api_url + path,
            method=method,
            body=payload,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
            allow_nonstandard_methods=True,
            **kw,
        )

    async def _fetch(self, req: HTTPRequest) -> HTTPResponse:
        from tornado.httpclient import HTTPClientError

        try:
            return await self.http.fetch(req)
        except HTTPClientError as e:
            if e.code == 599:  # tornado's code for a timeout or a connection that broke
                raise self.unreachable(e) from None
            body_bytes = e.response.body if e.response is not None else None
            raise HubError(e.code, hub_error_message(body_bytes, str(e))) from None
        except OSError as e:
            raise self.unreachable(e) from None

    def unreachable(self, error: Exception) -> HubUnreachable:
        reason = getattr(error, "strerror", None) or str(error)
        status = 599 if getattr(error, "code", 0) == 599 else 0
        return HubUnreachable(status, f"cannot reach the hub at {self.api_url}: {reason}")

    async def request(
        self, method: str, path: str, body: Any = None, params: dict | None = None
    ) -> Any:
        """One API call; returns the decoded JSON body (None when empty); raises HubError."""
        path = path + (f"?{urlencode(params)}" if params else "")
        response = await self._fetch(self._request(method, path, body))
        return json.loads(response.body) if response.body else None

    async def whoami(self) -> dict:
        return await self.request("GET", "/user")

    async def get_user(self, user: str, include_stopped: bool = True) -> dict | None:
        """The user model with its servers (stopped ones too); None if the hub has no such user."""
        params = {"include_stopped_servers": "1"} if include_stopped else None
        try:
            return await self.request("GET", f"/users/{quote(user, safe='')}", params=params)
        except HubError as e:
            if e.status == 404:
                return None
            raise

    async def create_user(self, user: str) -> dict:
        return await self.request("POST", f"/users/{quote(user, safe='')}")

    async def start_server(self, user: str, server: str = "", options: dict | None = None) -> int:
        """Ask the hub to spawn; returns 201 (ready) or 202 (pending, follow `progress`).

        `options` None lets the hub reuse the server's last user_options.
        """
        body = {"user_options": options}
        response = await self._fetch(self._request("POST", server_path(user, server), body))
        return response.code

    async def stop_server(self, user: str, server: str = "") -> None:
        await self.request("DELETE", server_path(user, server))

    async def delete_server(self, user: str, server: str) -> None:
        """Stop and forget a named server (the default server cannot be deleted, only stopped)."""
        await self.request("DELETE", server_path(user, server), body={"remove": True})

    async def record_activity(self, user: str, server: str, when: str) -> None:
        """Tell the hub the user was active on a server (ISO-8601 UTC `when`), as a single-user
        server's activity reports do: the idle culler and `container-list`'s IDLE use it."""
        body = {"last_activity": when, "servers": {server: {"last_activity": when}}}
        await self.request("POST", f"/users/{quote(user, safe='')}/activity", body=body)

    async def progress(
        self, user: str, server: str = "", timeout: float = 900.0
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield the hub's spawn progress events until `ready` or `failed` (or the stream ends)."""
        queue: asyncio.Queue = asyncio.Queue()
        buffer = ""

        def on_chunk(chunk: bytes) -> None:
            nonlocal buffer
            events, buffer = parse_sse(buffer + chunk.decode("utf-8", "replace"))
            for event in events:
                queue.put_nowait(event)

        req = self._request(
            "GET",
            server_path(user, server) + "/progress",
            streaming_callback=on_chunk,
            request_timeout=timeout,
        )
        fetch = asyncio.ensure_future(self.http.fetch(req, raise_error=False))
        fetch.add_done_callback(lambda _f: queue.put_nowait(None))
        try:
            while (event := await queue.get()) is not None:
                yield event
                if event.get("ready") or event.get("failed"):
                    return
            try:
                response = fetch.result()
            except OSError as e:
                raise self.unreachable(e) from None
            if response.code == 599:
                raise self.unreachable(response.error or TimeoutError("no answer"))
            if response.code >= 400:
                # with a streaming callback the error body arrived through on_chunk
                message = hub_error_message(buffer.encode(), f"progress: HTTP {response.code}")
                raise HubError(response.code, message)
        finally:
            fetch.cancel()
