"""The broker's request handlers: who the caller is and whom they act for, the JSON routes,
and the `container-run` relay between the user's terminal and a docker exec session."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pwd
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import Field
from tornado.iostream import IOStream, SSLIOStream, StreamClosedError

from ds01hub import peer
from ds01hub.actions import images
from ds01hub.actions.operations import (
    OperationError,
    UserOperations,
    named_error,
    validate_name,
)
from ds01hub.bodies import Body
from ds01hub.errors import Ds01hubError
from ds01hub.peer import Caller
from ds01hub.services.broker.protocol import (
    EXEC_UPGRADE,
    INPUT_DATA,
    INPUT_EOF,
    INPUT_HEADER,
    INPUT_RESIZE,
    MAX_INPUT_FRAME,
    decode_input_header,
)
from ds01hub.services.ops.warnings import pending_warnings
from ds01hub.services.web import JsonHandler
from ds01hub.spawner.options import SpawnOptions

if TYPE_CHECKING:
    from ds01hub.services.broker.app import Broker

log = logging.getLogger("ds01hub.services.broker")

INTERNAL_ERROR = "internal error in the ds01 broker"


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


class BrokerHandler(JsonHandler):
    """Base: identify the caller from the socket before anything else; JSON answers and
    errors as every door gives them (ds01hub.services.web)."""

    internal_error = INTERNAL_ERROR

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
            self.send_json_error(e)
            return
        log.info(
            "%s %s by uid %s for %s", self.request.method, self.request.path, creds.uid, self.user
        )

    def ops(self) -> UserOperations:
        return UserOperations(self.broker.context, self.user)

    def named(self, error: BaseException) -> Ds01hubError | None:
        """`error` as a named error (ds01hub.actions.operations.named_error: refusals, the
        Docker engine's and the hub's failures), or None."""
        return named_error(error, self.broker.docker_url)

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
            self.send_json_error(
                OperationError(f"no such endpoint {self.request.path}", status=404)
            )


class WhoAmIHandler(BrokerHandler):
    def get(self) -> None:
        self.write_json({"user": self.user, "uid": self.caller.uid, "admin": self.caller.admin})


class WarningsHandler(BrokerHandler):
    """The caller's pending cull warnings, which the CLI prints after each command."""

    def get(self) -> None:
        warnings = pending_warnings(self.user, self.broker.state_dir)
        self.write_json([w.to_dict() for w in warnings])


class ContainersHandler(BrokerHandler):
    async def get(self) -> None:
        show_all = self.get_query_argument("all", "0") not in ("0", "false")
        self.write_json(await self.ops().list_containers(include_stopped=show_all))


class ContainerHandler(BrokerHandler):
    async def get(self, project: str) -> None:
        self.write_json(await self.ops().describe(project))

    async def delete(self, project: str) -> None:
        force = self.get_query_argument("force", "0") not in ("0", "false")
        self.write_json(await self.ops().remove(project, force=force))


class StartBody(Body):
    options: SpawnOptions = Field(
        default_factory=SpawnOptions,
        description="spawn options: profile, image, gpus, mig (none: as last time)",
    )
    create: bool = Field(False, description="true: create the container if there is none")


class StartHandler(BrokerHandler):
    async def post(self, project: str) -> None:
        body = self.body(StartBody)
        validate_name(project)
        options = body.options.model_dump(exclude_defaults=True)
        await self.stream_json(self.ops().start(project, options, create=body.create))


class StopBody(Body):
    timeout: float | None = Field(
        None, ge=0, description="seconds to wait before the container is killed (>= 0)"
    )
    force: bool = Field(False, description="true: stop even with a build or shell running")


class StopHandler(BrokerHandler):
    async def post(self, project: str) -> None:
        body = self.body(StopBody)
        self.write_json(await self.ops().stop(project, timeout=body.timeout, force=body.force))


class CleanupBody(Body):
    all: bool = Field(False, description="true: running containers too, not only stopped ones")


class CleanupHandler(BrokerHandler):
    async def post(self) -> None:
        include_running = self.body(CleanupBody).all
        self.write_json(await self.ops().cleanup(include_running=include_running))


class StatsHandler(BrokerHandler):
    async def get(self) -> None:
        self.write_json(await self.ops().stats())


class QuotaHandler(BrokerHandler):
    async def get(self) -> None:
        self.write_json(await self.ops().quota())


class ImagesHandler(BrokerHandler):
    """The caller's images (ds01hub.actions.images): list, and build with streamed progress."""

    async def get(self) -> None:
        self.write_json(await self.broker.images.list(self.user))

    async def post(self) -> None:
        request = self.body(images.BuildRequest)
        await self.stream_json(self.broker.images.build(self.user, request))


class ImageTemplatesHandler(BrokerHandler):
    def get(self) -> None:
        self.write_json(self.broker.images.templates())


class BuildHandler(BrokerHandler):
    """The caller's running build: DELETE cancels it (`image-cancel`)."""

    async def delete(self) -> None:
        self.write_json(await self.broker.images.cancel(self.user))


class ImageHandler(BrokerHandler):
    async def delete(self, name: str) -> None:
        self.write_json(await self.broker.images.delete(self.user, name))


class ExecBody(Body):
    command: list[str] | None = Field(
        None, description="the command and its arguments (none or []: a login shell)"
    )
    tty: bool = Field(True, description="true: a terminal (raw keys, resizes); false: pipes")
    env: dict[str, str] = Field({}, description="TERM, LANG, COLORTERM (others are dropped)")
    rows: int | None = Field(None, ge=1, le=65535, description="the terminal's rows, 1..65535")
    cols: int | None = Field(None, ge=1, le=65535, description="the terminal's columns, 1..65535")


class ExecHandler(BrokerHandler):
    """Upgrade the connection and relay it to a docker exec session in the user's container."""

    async def post(self, project: str) -> None:
        if self.request.headers.get("Upgrade", "").lower() != EXEC_UPGRADE:
            raise OperationError(f"exec needs `Upgrade: {EXEC_UPGRADE}`")
        body = self.body(ExecBody)
        created = await self.ops().exec_create(project, body.command, body.tty, body.env)
        docker_stream = await self.broker.open_exec_stream(created["exec_id"], body.tty)
        if body.rows and body.cols:
            await self.broker.resize_exec(created["exec_id"], body.rows, body.cols)
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
        self.write_json({"running": info.get("Running"), "exit_code": info.get("ExitCode")})


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
    needed because tornado streams cannot half-close (ds01hub.services.broker.protocol)."""
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
                _close_input(container, hang_up=False)
            elif kind == INPUT_RESIZE and size == 4:
                await resize(*struct.unpack(">HH", payload))
    except StreamClosedError:
        pass
    # the client left (or broke the protocol): end the shell's input as a terminal hang-up would
    _close_input(container)


def _close_input(container: IOStream, hang_up: bool = True) -> None:
    """End the input of `container`: a half-close of its socket, so its output can still be
    read. A TLS connection (a swarm node's engine) cannot be half-closed from Python (`ssl`
    has no close_notify without a full shutdown, after which nothing more can be read): there
    the end of input is not passed on, and a hang-up (`hang_up`) closes it."""
    if container.closed():
        return
    if isinstance(container, SSLIOStream):
        if hang_up:
            container.close()
        return
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
