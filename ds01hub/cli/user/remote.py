"""The users' commands away from the host: the hub's REST API with the user's own token
(`ds01hub.cli.user.backends.connect` picks it when a hub URL and a token are given). Its own
module so that the commands on the host (the broker's socket) never import asyncio or the hub
client: they start with every command."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from ds01hub.actions.operations import (
    DEFAULT_PROJECT,
    OperationError,
    hub_failure,
    project_to_server,
    server_to_project,
    spawn_options,
)
from ds01hub.cli.output import EXIT_USAGE, CliError
from ds01hub.cli.user.backends import host_only
from ds01hub.units import utcnow


def server_view(server: dict[str, Any], project: str, now: datetime) -> dict[str, Any]:
    """What the hub alone knows of a server (remote use): state, image asked for, times."""
    from ds01hub.labels import parse_docker_time as parse_time

    pending = server.get("pending")
    state = {"spawn": "starting", "stop": "stopping"}.get(
        pending, "running" if server.get("ready") else "stopped"
    )
    options = server.get("user_options") or {}
    started = parse_time(server.get("started"))
    activity = parse_time(server.get("last_activity"))
    running = state in ("running", "stopping")
    return {
        "project": project,
        "container": None,
        "id": None,
        "state": state,
        "image": options.get("image"),
        "gpus": [],
        "gpus_released": False,
        "started_at": server.get("started"),
        "finished_at": None,
        "uptime_s": (now - started).total_seconds() if running and started else None,
        "stopped_for_s": None,
        "idle_s": (now - activity).total_seconds() if running and activity else None,
        "held_until": None,
        "url": server.get("url") if server.get("ready") else None,
    }


class HubBackend:
    """The hub REST API with the user's own token (remote use). One event loop for the whole
    command, so progress streams event by event."""

    remote = True

    def __init__(self, hub_url: str, token: str, act_for: str | None = None):
        self.api_url = hub_url.rstrip("/") + "/hub/api"
        self.token = token
        self.act_for = act_for
        self.loop = asyncio.new_event_loop()
        self.client = self.loop.run_until_complete(self._make_client())
        self._user: str | None = None

    async def _make_client(self):
        from ds01hub.hub.client import HubClient

        return HubClient(self.api_url, self.token)

    def _run(self, awaitable) -> Any:
        from ds01hub.hub.client import HubError

        try:
            return self.loop.run_until_complete(awaitable)
        except HubError as e:
            raise hub_failure(e) from None

    def user(self) -> str:
        if self._user is None:
            self._user = self.act_for or self.whoami()["user"]
        return self._user

    def whoami(self) -> dict[str, Any]:
        model = self._run(self.client.whoami())
        return {"user": model.get("name"), "admin": bool(model.get("admin")), "uid": None}

    def cull_warnings(self) -> list[dict[str, Any]]:
        """Remote users see pending culls on the hub's pages and in the container, not here:
        the warnings live on the host."""
        return []

    def _servers(self) -> dict[str, Any]:
        """The user's servers; the default one only once it has run (the hub always lists it)."""
        model = self._run(self.client.get_user(self.user()))
        if model is None:
            raise CliError(
                f"the hub said: no user {self.user()!r} that this token may see",
                hint="a token acts for its own user; leave out --user",
            )
        servers = dict(model.get("servers") or {})
        default = servers.get("")
        if default is not None and not (default.get("last_activity") or default.get("pending")):
            del servers[""]
        return servers

    def list_containers(self, include_stopped: bool) -> list[dict[str, Any]]:
        now = utcnow()
        rows = [
            server_view(server, server_to_project(name), now)
            for name, server in sorted(self._servers().items())
        ]
        return rows if include_stopped else [r for r in rows if r["state"] != "stopped"]

    def describe(self, project: str) -> dict[str, Any]:
        server = self._servers().get(project_to_server(project))
        if server is None:
            raise CliError(
                f"you have no container named {project!r}",
                hint="see your containers with `container-list --all`",
            )
        view = server_view(server, project, utcnow())
        view["processes"] = None
        return view

    def start(
        self, project: str, options: dict[str, Any] | None, create: bool
    ) -> Iterator[dict[str, Any]]:
        try:
            spawn = spawn_options(options or {})
        except OperationError as e:
            raise CliError(e.message, e.hint, EXIT_USAGE) from None
        user, server = self.user(), project_to_server(project)
        known = self._servers().get(server)
        if create and known is not None:
            raise CliError(
                f"you already have a container named {project!r}",
                hint=f"start it with `container-start {project}`, or pick another name",
            )
        if not create and known is None:
            raise CliError(
                f"you have no container named {project!r}",
                hint=f"create one with `container-create {project}`",
            )
        if self._run(self.client.start_server(user, server, spawn)) == 202:
            events = self.client.progress(user, server)
            while True:
                try:
                    event = self._run(events.__anext__())
                except StopAsyncIteration:
                    break
                if event.get("failed"):
                    raise CliError(f"could not start {project!r}: {event.get('message')}")
                yield {"event": "progress", **event}
        yield {"event": "ready", "container": self.describe(project)}

    def stop(self, project: str, timeout: float | None, force: bool) -> dict[str, Any]:
        if timeout is not None or force:
            raise host_only("--timeout/--force")
        self._run(self.client.stop_server(self.user(), project_to_server(project)))
        return self.describe(project)

    def remove(self, project: str, force: bool) -> dict[str, Any]:
        server = project_to_server(project)
        if not server:
            raise host_only(f"removing the {DEFAULT_PROJECT!r} container")
        self._run(self.client.delete_server(self.user(), server))
        return {"project": project, "container": None, "removed": True}

    def cleanup(self, include_running: bool) -> list[dict[str, Any]]:
        raise host_only("container-cleanup")

    def stats(self) -> list[dict[str, Any]]:
        raise host_only("container-stats")

    def quota(self) -> dict[str, Any]:
        raise host_only("the quota")

    def images(self) -> list[dict[str, Any]]:
        raise host_only("image-list")

    def image_templates(self) -> list[dict[str, Any]]:
        raise host_only("image templates")

    def build_image(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        raise host_only("image builds")

    def cancel_build(self) -> dict[str, Any]:
        raise host_only("image-cancel")

    def delete_image(self, name: str) -> dict[str, Any]:
        raise host_only("image-delete")

    def open_exec(self, project: str, request: dict[str, Any]):
        raise host_only("a shell in a container")
