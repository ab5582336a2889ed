"""The ds01 broker: a JupyterHub managed service on a unix socket that acts for the SSH user
who connects, and only for them.

Why: SSH users on the host should need no token and no docker group (root-equivalent). The
broker learns who is calling from the kernel (SO_PEERCRED on the unix socket: uid -> passwd
name = hub user, by ds01hub.peer's name rule), never from anything the client sends. Admins
(ds01hub.peer.AdminRule: root, admin users and groups, from the host's mount namespace) may act
for another user with an explicit `?user=NAME`.

Protocol: HTTP/1.1 with JSON over the unix socket. Long work (waiting for a server/GPU, image
builds) streams newline-delimited JSON events. `container-run` upgrades its connection
(`Upgrade: ds01-exec`, answered with 101) and the broker relays raw bytes between it and a
docker exec session, so the shell runs in the container while the user never touches Docker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import signal
import socket
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tornado import web
from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream, StreamClosedError
from traitlets import Bool, Float, Integer, List, Unicode, default
from traitlets.config import Application

from . import images, peer, provenance
from .cli.protocol import (
    API_PREFIX,
    DEFAULT_SOCKET,
    EXEC_UPGRADE,
    INPUT_DATA,
    INPUT_EOF,
    INPUT_HEADER,
    INPUT_RESIZE,
    MAX_INPUT_FRAME,
    decode_input_header,
)
from .culler import default_state_dir, pending_warnings
from .hubclient import HubClient
from .operations import (
    OperationError,
    OperationsContext,
    UserOperations,
    docker_unreachable,
    named_error,
    validate_name,
)
from .peer import Caller

log = logging.getLogger("ds01hub.broker")

INTERNAL_ERROR = "internal error in the ds01 broker"
#: The API version spoken to an engine that did not answer at start (Docker 20.10's; later
#: engines accept it too).
FALLBACK_DOCKER_API = "1.41"


def acting_for(
    caller: Caller,
    requested_user: str | None,
    min_uid: int,
    lookup_name: Callable[[str], Any] = pwd.getpwnam,
) -> str:
    """The hub user a request of `caller` (ds01hub.peer.identify) acts for (deny by default).

    - a system account below `min_uid` (other than root) is refused;
    - admins (ds01hub.peer.AdminRule: root, named users, admin groups, from the host's mount
      namespace) may name another Unix user, by the same name rule; nobody else may;
    - root must name a user (root is not a hub user).
    """
    if caller.uid != 0 and caller.uid < min_uid:
        raise OperationError(
            f"system account {caller.user!r} (uid {caller.uid}) may not use ds01 containers",
            status=403,
        )
    if requested_user and requested_user != caller.user:
        if not caller.admin:
            raise OperationError(
                f"only admins can act for another user ({requested_user!r})",
                hint="leave out --user to act for yourself",
                status=403,
            )
        return peer.account_named(requested_user, lookup_name)
    if caller.uid == 0:
        raise OperationError("root acts for users, not as one", hint="pass --user NAME", status=400)
    return caller.user


class BrokerHandler(web.RequestHandler):
    """Base: identify the caller from the socket before anything else; JSON errors."""

    caller: Caller  # who connected (ds01hub.peer)
    user: str  # the hub user this request acts for

    @property
    def broker(self) -> Broker:
        return self.settings["broker"]

    async def prepare(self) -> None:
        sock = self.request.connection.stream.socket  # type: ignore[attr-defined]
        creds = peer.credentials(sock)
        requested = self.get_query_argument("user", None)
        try:
            # the password and group databases may be LDAP: never block the loop on them
            self.caller, self.user = await asyncio.to_thread(self.broker.resolve, creds, requested)
        except OperationError as e:
            log.warning("refused uid %s (pid %s): %s", creds.uid, creds.pid, e.message)
            self.send_operation_error(e)
            return
        log.info(
            "%s %s by uid %s for %s", self.request.method, self.request.path, creds.uid, self.user
        )

    def ops(self) -> UserOperations:
        return UserOperations(self.broker.context, self.user)

    def json_body(self) -> dict[str, Any]:
        if not self.request.body:
            return {}
        try:
            body = json.loads(self.request.body)
        except ValueError:
            raise OperationError("request body is not JSON") from None
        if not isinstance(body, dict):
            raise OperationError("request body must be a JSON object")
        return body

    def send_operation_error(self, error: OperationError) -> None:
        self.set_status(error.status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(error.to_json()))

    def reply(self, data: Any) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(data, default=str))

    async def stream_events(self, events) -> None:
        """Send an async iterator of events as newline-delimited JSON; an error mid-way is sent
        as a final `{"event": "error", ...}` line (the status line has gone already)."""
        self.set_header("Content-Type", "application/x-ndjson")
        try:
            async for event in events:
                self.write(json.dumps(event, default=str) + "\n")
                await self.flush()
        except StreamClosedError:
            return
        except Exception as e:  # the status line has gone: the error is the last event
            error = self.named(e)
            if error is None:
                log.exception("%s %s failed", self.request.method, self.request.path)
                error = OperationError(INTERNAL_ERROR, status=500)
            self.write(json.dumps({"event": "error", **error.to_json()}) + "\n")
        self.finish()

    def named(self, error: BaseException | None) -> OperationError | None:
        """`error` as a named OperationError (ds01hub.operations.named_error), or None."""
        if error is None:
            return None
        return named_error(error, self.broker.docker_url)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = self.named(kwargs.get("exc_info", (None, None, None))[1])
        if error is not None:
            self.send_operation_error(error)
            return
        message = self._reason if status_code < 500 else INTERNAL_ERROR
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": message, "hint": None, "status": status_code}))

    def log_exception(self, typ, value, tb) -> None:
        error = self.named(value)
        if isinstance(value, OperationError):
            log.info("refused: %s", value.message)
        elif error is not None:
            log.warning("%s %s: %s", self.request.method, self.request.path, error.message)
        else:
            super().log_exception(typ, value, tb)


class NotFoundHandler(BrokerHandler):
    """Unknown paths answer JSON too (after the caller is identified, like everything else)."""

    async def prepare(self) -> None:
        await super().prepare()
        if not self._finished:
            self.send_operation_error(
                OperationError(f"no such endpoint {self.request.path}", status=404)
            )


class WhoAmIHandler(BrokerHandler):
    def get(self) -> None:
        self.reply({"user": self.user, "uid": self.caller.uid, "admin": self.caller.admin})


class WarningsHandler(BrokerHandler):
    """The caller's pending cull warnings, which the CLI prints after each command."""

    def get(self) -> None:
        warnings = pending_warnings(self.user, self.broker.state_dir)
        self.reply([w.to_dict() for w in warnings])


class ContainersHandler(BrokerHandler):
    async def get(self) -> None:
        show_all = self.get_query_argument("all", "0") not in ("0", "false")
        self.reply(await self.ops().list_containers(include_stopped=show_all))


class ContainerHandler(BrokerHandler):
    async def get(self, project: str) -> None:
        self.reply(await self.ops().describe(project))

    async def delete(self, project: str) -> None:
        force = self.get_query_argument("force", "0") not in ("0", "false")
        self.reply(await self.ops().remove(project, force=force))


class StartHandler(BrokerHandler):
    async def post(self, project: str) -> None:
        body = self.json_body()
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise OperationError("options must be a JSON object")
        validate_name(project)
        await self.stream_events(
            self.ops().start(project, options, create=bool(body.get("create")))
        )


class StopHandler(BrokerHandler):
    async def post(self, project: str) -> None:
        body = self.json_body()
        timeout = body.get("timeout")
        if timeout is not None and (not isinstance(timeout, int | float) or timeout < 0):
            raise OperationError("timeout must be a number of seconds >= 0")
        force = bool(body.get("force"))
        self.reply(await self.ops().stop(project, timeout=timeout, force=force))


class CleanupHandler(BrokerHandler):
    async def post(self) -> None:
        include_running = bool(self.json_body().get("all"))
        self.reply(await self.ops().cleanup(include_running=include_running))


class StatsHandler(BrokerHandler):
    async def get(self) -> None:
        self.reply(await self.ops().stats())


class QuotaHandler(BrokerHandler):
    async def get(self) -> None:
        self.reply(await self.ops().quota())


class ImagesHandler(BrokerHandler):
    """The caller's images (ds01hub.images): list, and build with streamed progress."""

    async def get(self) -> None:
        self.reply(await self.broker.images.list(self.user))

    async def post(self) -> None:
        body = self.json_body()
        await self.stream_events(self.broker.images.build(self.user, body))


class ImageTemplatesHandler(BrokerHandler):
    def get(self) -> None:
        self.reply(self.broker.images.templates())


class ImageHandler(BrokerHandler):
    async def delete(self, name: str) -> None:
        self.reply(await self.broker.images.delete(self.user, name))


class ExecHandler(BrokerHandler):
    """Upgrade the connection and relay it to a docker exec session in the user's container."""

    async def post(self, project: str) -> None:
        if self.request.headers.get("Upgrade", "").lower() != EXEC_UPGRADE:
            raise OperationError(f"exec needs `Upgrade: {EXEC_UPGRADE}`")
        body = self.json_body()
        command = body.get("command")
        if command is not None and not (
            isinstance(command, list) and all(isinstance(c, str) for c in command)
        ):
            raise OperationError("command must be a list of strings")
        tty = bool(body.get("tty", True))
        created = await self.ops().exec_create(project, command, tty, body.get("env") or {})
        docker_stream = await self.broker.open_exec_stream(created["exec_id"], tty)
        if body.get("rows") and body.get("cols"):
            await self.broker.resize_exec(created["exec_id"], body["rows"], body["cols"])
        self.set_status(101)
        self.set_header("Upgrade", EXEC_UPGRADE)
        self.set_header("Connection", "Upgrade")
        self.set_header("X-DS01-Exec-Id", created["exec_id"])
        self.finish()
        client_stream = self.detach()
        exec_id = created["exec_id"]

        async def resize(rows: int, cols: int) -> None:
            await self.broker.resize_exec(exec_id, rows, cols)

        ops = self.ops()
        activity = ActivityReporter(
            lambda: ops.record_activity(project), self.broker.activity_interval
        )
        await ops.record_activity(project)
        try:
            await relay(client_stream, docker_stream, resize, activity.touch)
        finally:
            activity.stop()


class ExecSessionHandler(BrokerHandler):
    """An exec's exit code, once it ended; only for execs in the caller's containers."""

    async def get(self, exec_id: str) -> None:
        info = await self.ops().owns_exec(exec_id)
        self.reply({"running": info.get("Running"), "exit_code": info.get("ExitCode")})


class ActivityReporter:
    """Reports a shell's use to the hub at most once per `interval` while bytes flow, so a
    user typing in `container-run` counts as active and an abandoned shell does not."""

    def __init__(self, report: Callable, interval: float):
        self.report = report
        self.interval = interval
        self.active = False
        self.task = asyncio.ensure_future(self._loop()) if interval > 0 else None

    def touch(self) -> None:
        self.active = True

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self.active:
                self.active = False
                await self.report()

    def stop(self) -> None:
        if self.task:
            self.task.cancel()


async def pump_output(container: IOStream, client: IOStream, touch: Callable) -> None:
    """The container's output to the client, byte for byte, until the exec ends."""
    with contextlib.suppress(StreamClosedError):
        while True:
            await client.write(await container.read_bytes(65536, partial=True))
            touch()


async def pump_input(
    client: IOStream, container: IOStream, resize: Callable, touch: Callable
) -> None:
    """The client's framed input (ds01hub.cli.terminal): data to the container's stdin, end of
    input as a half-close (so `sh < script` ends), window sizes as exec resizes. Framing is
    needed because tornado streams cannot half-close (ds01hub.cli.protocol)."""
    try:
        while True:
            kind, size = decode_input_header(await client.read_bytes(INPUT_HEADER.size))
            if size > MAX_INPUT_FRAME:
                break
            payload = await client.read_bytes(size) if size else b""
            if kind == INPUT_DATA:
                await container.write(payload)
                touch()
            elif kind == INPUT_EOF:
                _close_input(container)
            elif kind == INPUT_RESIZE and size == 4:
                await resize(*struct.unpack(">HH", payload))
    except StreamClosedError:
        pass
    # the client left (or broke the protocol): end the shell's input as a terminal hang-up would
    _close_input(container)


def _close_input(container: IOStream) -> None:
    if not container.closed():
        try:
            container.socket.shutdown(socket.SHUT_WR)
        except OSError:
            container.close()


async def relay(
    client: IOStream, container: IOStream, resize: Callable, touch: Callable = lambda: None
) -> None:
    """Both directions until the exec ends (Docker closes its side), then close both."""
    from_client = asyncio.ensure_future(pump_input(client, container, resize, touch))
    await pump_output(container, client, touch)
    container.close()
    # a graceful end: half-close, let the client read the rest and hang up (closing at once
    # with its last input unread would reset the connection and lose output)
    _close_input(client)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(from_client), timeout=10)
    client.close()
    await asyncio.gather(from_client, return_exceptions=True)


class BrokerImages:
    """Image builds for SSH users through ds01hub.images (the notebook wizard's code): only in
    the caller's own namespace, one build per user at a time, a few at once overall."""

    def __init__(self, broker: Broker, docker_client: Any):
        self.broker = broker
        self.docker = docker_client
        self.building: set[str] = set()
        self.slots = asyncio.Semaphore(max(1, broker.max_concurrent_builds))

    def templates(self) -> list[dict[str, Any]]:
        return [t.to_dict() for t in images.list_templates()]

    async def list(self, user: str) -> list[dict[str, Any]]:
        found = await asyncio.to_thread(images.list_user_images, self.docker, user)
        return [i.to_dict() for i in found]

    async def delete(self, user: str, name: str) -> dict[str, Any]:
        try:
            tag = await asyncio.to_thread(images.delete_user_image, self.docker, user, name)
        except images.ImageError as e:
            raise refusal(e) from None
        return {"deleted": tag, "tag": tag}

    async def build(self, user: str, body: dict[str, Any]):
        """Yield the build's events (ds01hub.images.BuildEvent dicts); the last is done/error."""
        try:
            spec = images.spec_from_request(user, body)
            existing = await self.list(user)
            images.check_image_quota(
                (i["name"] for i in existing), spec.name, self.broker.max_images_per_user
            )
        except images.ImageError as e:
            raise refusal(e) from None
        if user in self.building:
            raise OperationError("one of your builds is still running", status=409)
        if not self.broker.base_image:
            raise OperationError("no base image configured (Broker.base_image)", status=503)
        self.building.add(user)
        try:
            async with self.slots:
                queue: asyncio.Queue = asyncio.Queue()
                loop = asyncio.get_running_loop()
                ca = Path(self.broker.ca_bundle) if self.broker.ca_bundle else None

                def work() -> None:
                    try:
                        for event in images.build_image(
                            self.docker,
                            spec,
                            self.broker.base_image,
                            ca_bundle=ca,
                            memory_limit=self.broker.build_memory_limit or None,
                        ):
                            loop.call_soon_threadsafe(queue.put_nowait, event.to_dict())
                    except images.ImageError as e:
                        error = images.BuildEvent("error", str(e)).to_dict()
                        loop.call_soon_threadsafe(queue.put_nowait, error)
                    finally:
                        loop.call_soon_threadsafe(queue.put_nowait, None)

                worker = loop.run_in_executor(None, work)
                while (event := await queue.get()) is not None:
                    if event.get("kind") == "error":
                        raise OperationError(f"build failed: {event.get('text')}", status=422)
                    yield event
                await worker
        finally:
            self.building.discard(user)


def refusal(error: images.ImageError) -> OperationError:
    """An images.ImageError as the broker's answer: its message, hint and status."""
    return OperationError(str(error), error.hint, error.status)


def docker_socket_path() -> str:
    """The Docker engine's unix socket from DOCKER_HOST (unix://...), else the default."""
    host = os.environ.get("DOCKER_HOST", "")
    return host[len("unix://") :] if host.startswith("unix://") else "/var/run/docker.sock"


class Broker(Application):
    """Run the ds01 broker as a JupyterHub managed service."""

    name = "ds01hub-broker"
    description = __doc__

    socket_path = Unicode(
        DEFAULT_SOCKET,
        help="""Unix socket the broker listens on. The users' commands find it here (or in
        $DS01HUB_BROKER_SOCKET). Its directory is created mode 0755.""",
    ).tag(config=True)

    socket_mode = Integer(
        0o666,
        help="""Permissions of the socket. Anyone may connect: every request is identified by
        the kernel (SO_PEERCRED) and can only act for its own user.""",
    ).tag(config=True)

    admin_groups = List(
        Unicode(),
        default_value=["ds01-admin"],
        help="""Unix groups whose members (like root) may act for any user with --user, when
        they call from the host's mount namespace (ds01hub.peer.AdminRule).""",
    ).tag(config=True)

    admin_users = List(
        Unicode(),
        help="Unix users who (like root) may act for any user with --user (same rule).",
    ).tag(config=True)

    min_uid = Integer(
        1000,
        help="Lowest uid served (system accounts below it are refused; root acts only with "
        "--user).",
    ).tag(config=True)

    auto_create_users = Bool(
        True,
        help="""Create the hub user on a Unix user's first command (needs the admin:users
        scope). Off: users must log in to the hub once first.""",
    ).tag(config=True)

    hub_api_url = Unicode(
        help="The hub's REST API; JupyterHub gives managed services $JUPYTERHUB_API_URL.",
    ).tag(config=True)

    api_token = Unicode(
        help="The service's token; JupyterHub gives managed services $JUPYTERHUB_API_TOKEN.",
    ).tag(config=True)

    limits_path = Unicode(
        "",
        help="resource-limits.yaml (default: $DS01HUB_LIMITS or "
        "/etc/ds01hub/resource-limits.yaml); used for GPU hold times, quotas and stats.",
    ).tag(config=True)

    docker_socket = Unicode(
        help="The Docker engine's unix socket (default from $DOCKER_HOST).",
    ).tag(config=True)

    state_dir = Unicode(
        help="""The spawner's state directory (default $DS01HUB_STATE_DIR, else
        /var/lib/ds01hub), where the culler keeps its pending warnings (each command tells
        its user which of their containers are about to be stopped as idle) and whose label
        key and deployment id decide which containers are this hub's.""",
    ).tag(config=True)

    spawn_timeout = Float(
        900.0,
        help="Longest a start may wait for the hub (e.g. for a GPU) before the command gives up.",
    ).tag(config=True)

    base_image = Unicode(
        help="Image that users' images are built FROM (default $DS01HUB_SINGLEUSER_IMAGE), as "
        "for the ds01 service: the admin's choice, never the user's.",
    ).tag(config=True)

    ca_bundle = Unicode(
        "",
        help="PEM CA bundle trusted inside image builds (sites behind a TLS-intercepting proxy).",
    ).tag(config=True)

    max_images_per_user = Integer(10, help="Images one user may keep (0 = no limit).").tag(
        config=True
    )

    max_concurrent_builds = Integer(2, help="Image builds running at once (all users).").tag(
        config=True
    )

    build_memory_limit = Integer(
        4 * 1024**3, help="Memory (bytes) for each build step's container (0 = unlimited)."
    ).tag(config=True)

    inspect_workers = Integer(
        8,
        help="Docker inspect calls run at once when listing (the list API lacks start/stop "
        "times); see bench/container_list.py.",
    ).tag(config=True)

    activity_interval = Float(
        300.0,
        help="While a `container-run` shell is in use, report activity to the hub this often "
        "(seconds), so the idle culler leaves it alone. 0 = never.",
    ).tag(config=True)

    aliases = {
        "socket": "Broker.socket_path",
        "base-image": "Broker.base_image",
        "ca-bundle": "Broker.ca_bundle",
        "limits": "Broker.limits_path",
        "log-level": "Application.log_level",
    }

    @default("hub_api_url")
    def _hub_api_url_default(self) -> str:
        return os.environ.get("JUPYTERHUB_API_URL", "http://127.0.0.1:8081/hub/api")

    @default("api_token")
    def _api_token_default(self) -> str:
        return os.environ.get("JUPYTERHUB_API_TOKEN", "")

    @default("base_image")
    def _base_image_default(self) -> str:
        return os.environ.get("DS01HUB_SINGLEUSER_IMAGE", "")

    @default("state_dir")
    def _state_dir_default(self) -> str:
        return str(default_state_dir())

    @default("docker_socket")
    def _docker_socket_default(self) -> str:
        return docker_socket_path()

    context: OperationsContext
    docker: Any
    images: BrokerImages

    @property
    def admin_rule(self) -> peer.AdminRule:
        return peer.AdminRule(frozenset(self.admin_users), frozenset(self.admin_groups))

    @property
    def docker_url(self) -> str:
        return f"unix://{self.docker_socket}"

    def resolve(self, creds: peer.Credentials, requested_user: str | None) -> tuple[Caller, str]:
        """Who connected (ds01hub.peer) and the hub user the request acts for; blocking (the
        password database may be LDAP). Refusals are OperationErrors."""
        try:
            caller = peer.identify(creds, self.admin_rule)
            return caller, acting_for(caller, requested_user, self.min_uid)
        except peer.IdentityError as e:
            raise OperationError(e.message, e.hint, e.status) from None

    def connect_docker(self) -> Any:
        """A docker-py client of `docker_socket`. An engine that does not answer now is no
        reason not to start: requests then say "Docker engine unreachable" until it does."""
        import docker

        try:
            return docker.DockerClient(base_url=self.docker_url)
        except docker.errors.DockerException as e:
            self.log.warning("%s; starting anyway", docker_unreachable(self.docker_url, e).message)
            return docker.DockerClient(base_url=self.docker_url, version=FALLBACK_DOCKER_API)

    def make_context(self) -> OperationsContext:
        self.docker = self.connect_docker()
        limits_for, inventory = self._limits_and_gpus()
        return OperationsContext(
            hub=HubClient(self.hub_api_url, self.api_token),
            docker=self.docker,
            trust=provenance.load(self.state_dir),
            limits_for=limits_for,
            inventory=inventory,
            auto_create_users=self.auto_create_users,
            spawn_timeout=self.spawn_timeout,
            inspect_workers=self.inspect_workers,
            docker_url=self.docker_url,
        )

    def _limits_and_gpus(self):
        """Limits and GPU utilisation from the lab's YAML; the broker still lists, starts and
        stops without them (the spawner enforces limits), so a missing file only logs."""
        try:
            from .inventory import load_inventory
            from .limits import LimitsStore, default_limits_path

            store = LimitsStore(self.limits_path or default_limits_path(), log=self.log)
        except Exception as e:  # LimitsError: bounded, names the file, the lines and the fixes
            self.log.warning("limits unavailable (%s): no hold times or quotas shown", e)
            return None, None

        def limits_for(user: str, groups) -> Any:
            store.reload(wait=False)  # called on the event loop: a changed file is read aside
            return store.current.resolve(user, groups)

        try:
            inventory = load_inventory(store.current.gpu_allocation)
        except Exception as e:
            self.log.warning("GPU inventory unavailable (%s): no GPU utilisation shown", e)
            return limits_for, None
        return limits_for, inventory

    async def open_exec_stream(self, exec_id: str, tty: bool) -> IOStream:
        """Start a docker exec and hijack its connection (Docker's own `Upgrade: tcp`), so its
        bytes can be relayed; any bytes after the response head stay in the stream's buffer."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stream = IOStream(sock)
        try:
            await stream.connect(self.docker_socket)
        except (StreamClosedError, OSError) as e:
            stream.close()
            raise docker_unreachable(self.docker_url, getattr(e, "real_error", None) or e) from None
        body = json.dumps({"Detach": False, "Tty": tty}).encode()
        version = self.docker.api._version
        head = (
            f"POST /v{version}/exec/{exec_id}/start HTTP/1.1\r\nHost: docker\r\n"
            "Content-Type: application/json\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        await stream.write(head + body)
        response = await stream.read_until(b"\r\n\r\n", max_bytes=65536)
        status = response.split(b"\r\n", 1)[0]
        if b" 101 " not in status and b" 200 " not in status:
            stream.close()
            raise OperationError(
                f"docker refused the exec: {status.decode(errors='replace')}", status=502
            )
        return stream

    async def resize_exec(self, exec_id: str, rows: int, cols: int) -> None:
        try:
            await asyncio.to_thread(self.docker.api.exec_resize, exec_id, height=rows, width=cols)
        except Exception as e:  # the shell may have just exited
            self.log.debug("resize of %s failed: %s", exec_id, e)

    def make_app(self) -> web.Application:
        p = API_PREFIX
        name = r"([^/]+)"
        return web.Application(
            [
                (f"{p}/whoami", WhoAmIHandler),
                (f"{p}/warnings", WarningsHandler),
                (f"{p}/containers", ContainersHandler),
                (f"{p}/containers/{name}", ContainerHandler),
                (f"{p}/containers/{name}/start", StartHandler),
                (f"{p}/containers/{name}/stop", StopHandler),
                (f"{p}/containers/{name}/exec", ExecHandler),
                (f"{p}/exec/([0-9a-f]+)", ExecSessionHandler),
                (f"{p}/cleanup", CleanupHandler),
                (f"{p}/stats", StatsHandler),
                (f"{p}/quota", QuotaHandler),
                (f"{p}/images", ImagesHandler),
                (f"{p}/images/templates", ImageTemplatesHandler),
                (f"{p}/images/{name}", ImageHandler),
            ],
            broker=self,
            default_handler_class=NotFoundHandler,
        )

    def listen(self) -> tuple[HTTPServer, peer.UnixListener]:
        """Bind the socket by ds01hub.peer's one stale-socket rule (a live listener's path is
        never taken over; a dead socket is replaced) and serve the app on it."""
        try:
            listener = peer.listen_unix(self.socket_path, self.socket_mode)
        except peer.SocketPathError as e:
            self.log.critical("%s; give this hub its own Broker.socket_path", e.message)
            sys.exit(1)
        # requests are small JSON documents; exec input is framed after the upgrade
        server = HTTPServer(self.make_app(), max_body_size=1 << 20, idle_connection_timeout=60)
        server.add_socket(listener.sock)
        return server, listener

    def start(self) -> None:
        logging.basicConfig(
            level=self.log_level, format="[%(levelname)s %(asctime)s %(name)s] %(message)s"
        )
        if not self.api_token:
            self.log.critical("no JUPYTERHUB_API_TOKEN: run the broker as a JupyterHub service")
            sys.exit(1)
        self.context = self.make_context()
        self.images = BrokerImages(self, self.docker)

        async def serve() -> None:
            server, listener = self.listen()
            self.log.info(
                "ds01 broker listening on %s for %s; may act for others: %s",
                self.socket_path,
                self.hub_api_url,
                self.admin_rule.describe(),
            )
            stopping = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, stopping.set)
            await stopping.wait()
            server.stop()
            listener.remove_path()  # unless another broker has taken the path since
            self.log.info("ds01 broker stopped")

        asyncio.run(serve())


SERVICE_NAME = "ds01-broker"


def service_scopes(auto_create_users: bool = True) -> list[str]:
    """Least privilege: start/stop/delete and read servers, read users (groups, activity),
    report activity of shells, and, only when the broker creates hub users on first use,
    `admin:users`."""
    scopes = ["servers", "read:users", "users:activity"]
    return scopes + (["admin:users"] if auto_create_users else [])


def configure_hub(
    c,
    *,
    socket_path: str = DEFAULT_SOCKET,
    broker_args: list[str] | tuple[str, ...] = (),
    environment: dict[str, str] | None = None,
    auto_create_users: bool = True,
) -> None:
    """Register the broker in a JupyterHub config `c` (call from jupyterhub_config.py): the
    managed service (`python -m ds01hub.broker`), its role, and named servers (one per
    project), which the users' commands rely on."""
    args = [f"--Broker.socket_path={socket_path}", *broker_args]
    if not auto_create_users:
        args.append("--Broker.auto_create_users=False")
    service = {
        "name": SERVICE_NAME,
        "command": [sys.executable, "-m", "ds01hub.broker", *args],
        "environment": provenance.service_environment(environment),
    }
    role = {
        "name": SERVICE_NAME,
        "services": [SERVICE_NAME],
        "scopes": service_scopes(auto_create_users),
    }
    _replace_named(c.JupyterHub, "services", service)
    _replace_named(c.JupyterHub, "load_roles", role)
    c.JupyterHub.allow_named_servers = True


def _replace_named(section, key: str, entry: dict) -> None:
    """Add `entry` to a list of named dicts in a config section, replacing one of the same
    name. In a file loaded with load_subconfig the value is a LazyConfigValue: appending to it
    merges with the parent file's list instead of replacing it."""
    current = section[key]
    if isinstance(current, list):
        section[key] = [e for e in current if e.get("name") != entry["name"]] + [entry]
    else:
        current.append(entry)


main = Broker.launch_instance

if __name__ == "__main__":
    main()
