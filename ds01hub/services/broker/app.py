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
import json
import logging
import os
import signal
import socket
import sys
from typing import Any

import docker
from docker import DockerClient
from tornado import web
from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream, StreamClosedError
from tornado.tcpclient import TCPClient
from traitlets import Bool, Float, Integer, List, Unicode, default
from traitlets.config import Application

from ds01hub import paths, peer, provenance
from ds01hub.actions import images
from ds01hub.actions.engines import SwarmContainers
from ds01hub.actions.operations import (
    OperationError,
    OperationsContext,
    docker_unreachable,
)
from ds01hub.gpu.inventory import load_inventory
from ds01hub.gpu.queued import QueuedStore
from ds01hub.gpu.swarm_nodes import NodeEndpoint, NodeEngineError, NodeEngines, load_node_endpoints
from ds01hub.hub.client import HubClient
from ds01hub.hub.group_snapshot import SnapshotReader
from ds01hub.limits import LimitsStore
from ds01hub.peer import Caller
from ds01hub.services.broker.handlers import (
    BuildHandler,
    CleanupHandler,
    ContainerHandler,
    ContainersHandler,
    ExecHandler,
    ExecSessionHandler,
    ImageHandler,
    ImagesHandler,
    ImageTemplatesHandler,
    NotFoundHandler,
    QuotaHandler,
    StartHandler,
    StatsHandler,
    StopHandler,
    WarningsHandler,
    WhoAmIHandler,
    acting_for,
)
from ds01hub.services.broker.protocol import (
    API_PREFIX,
    DEFAULT_SOCKET,
)
from ds01hub.services.settings import HostSettings, ImageBuildSettings

log = logging.getLogger("ds01hub.services.broker")

#: The API version spoken to an engine that did not answer at start (Docker 20.10's; later
#: engines accept it too).
FALLBACK_DOCKER_API = "1.41"


class BrokerImages:
    """Image builds for SSH users through ds01hub.actions (the notebook wizard's code, the
    host's one `BuildManager`): only in the caller's own namespace, one build per user at a
    time and a few at once on the whole host, whichever door they came through."""

    def __init__(self, broker: Broker, docker_client: DockerClient):
        self.broker = broker
        self.docker = docker_client
        self.builds = broker.build_manager(docker_client, broker.state_dir)

    def templates(self) -> list[dict[str, Any]]:
        return [t.to_dict() for t in images.list_templates()]

    async def list(self, user: str) -> list[dict[str, Any]]:
        found = await asyncio.to_thread(images.list_user_images, self.docker, user)
        return [i.to_dict() for i in found]

    async def delete(self, user: str, name: str) -> dict[str, Any]:
        broker = self.broker
        tag = await asyncio.to_thread(
            broker.delete_image, self.docker, broker.state_dir, user, name
        )
        return {"deleted": tag, "tag": tag}

    async def build(self, user: str, request: images.BuildRequest):
        """Yield the build's events (ds01hub.actions.images.BuildEvent dicts); the last is
        done, a failure is an OperationError. Leaving early (the user's Ctrl-C) stops the
        watching, not the build. Refusals are images.ImageErrors (named by named_error)."""
        spec = images.spec_from_request(user, request)
        existing = await self.list(user)
        images.check_image_quota(
            (i["name"] for i in existing), spec.name, self.broker.max_images_per_user
        )
        build = self.builds.start(spec)
        async for event in build.follow():
            if event.get("kind") == "error":
                raise OperationError(f"build failed: {event.get('text')}", status=422)
            yield event

    async def cancel(self, user: str, wait: float = 30.0) -> dict[str, Any]:
        """Stop the user's build, whichever door started it (`BuildManager.cancel`)."""
        return await self.builds.cancel(user, wait)


def docker_socket_path() -> str:
    """The Docker engine's unix socket from DOCKER_HOST (unix://...), else the default."""
    host = os.environ.get("DOCKER_HOST", "")
    return host[len("unix://") :] if host.startswith("unix://") else str(paths.DOCKER_SOCKET)


class Broker(HostSettings, ImageBuildSettings, Application):
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

    docker_socket = Unicode(
        help="The Docker engine's unix socket (default from $DOCKER_HOST).",
    ).tag(config=True)

    spawn_timeout = Float(
        900.0,
        help="Longest a start may wait for the hub (e.g. for a GPU) before the command gives up.",
    ).tag(config=True)

    inspect_workers = Integer(
        8,
        help="Docker inspect calls run at once when listing (the list API lacks start/stop "
        "times); see bench/container_list.py.",
    ).tag(config=True)

    swarm_nodes_file = Unicode(
        "",
        help="""Swarm mode: the nodes file (node hostname -> its engine's URL and TLS
        directory; ds01hub.gpu.swarm_nodes). Then `docker_socket` is a manager's engine, the
        users' containers are the swarm spawner's services, and exec, stats and a forced stop
        reach the container on its node's engine (mutual TLS). Empty: one host.""",
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

    @default("docker_socket")
    def _docker_socket_default(self) -> str:
        return docker_socket_path()

    context: OperationsContext
    docker: DockerClient
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
            raise OperationError(e.message, e.hint, e.status) from None  # the handlers' one type

    def connect_docker(self) -> DockerClient:
        """A docker-py client of `docker_socket`. An engine that does not answer now is no
        reason not to start: requests then say "Docker engine unreachable" until it does."""
        try:
            return docker.DockerClient(base_url=self.docker_url)
        except docker.errors.DockerException as e:
            self.log.warning("%s; starting anyway", docker_unreachable(self.docker_url, e).message)
            return docker.DockerClient(base_url=self.docker_url, version=FALLBACK_DOCKER_API)

    def make_context(self) -> OperationsContext:
        self.docker = self.connect_docker()
        limits_for, inventory = self._limits_and_gpus()
        return OperationsContext(
            containers=self.containers(),
            hub=HubClient(self.hub_api_url, self.api_token),
            docker=self.docker,
            trust=provenance.load(self.state_dir),
            limits_for=limits_for,
            inventory=inventory,
            auto_create_users=self.auto_create_users,
            spawn_timeout=self.spawn_timeout,
            inspect_workers=self.inspect_workers,
            docker_url=self.docker_url,
            queued_for=QueuedStore(self.state_dir).of_user,
        )

    def containers(self) -> SwarmContainers | None:
        """Where the users' containers are: the swarm (manager + nodes' engines) when a nodes
        file is set, else None (the one engine). A broken nodes file stops the broker at start
        with the file's problem: serving a swarm as one host would find no containers."""
        if not self.swarm_nodes_file:
            return None
        try:
            endpoints = load_node_endpoints(self.swarm_nodes_file)
        except NodeEngineError as e:
            self.log.critical("%s (%s)", e.message, e.hint)
            sys.exit(1)
        self.log.info("swarm mode: nodes %s", ", ".join(sorted(endpoints)) or "none")
        return SwarmContainers(self.docker, NodeEngines(endpoints))

    def _limits_and_gpus(self):
        """Limits and GPU utilisation from the lab's YAML; the broker still lists, starts and
        stops without them (the spawner enforces limits), so a missing file only logs."""
        try:
            store = LimitsStore(self.limits_path or None, log=self.log)
        except Exception as e:  # LimitsError: bounded, names the file, the lines and the fixes
            self.log.warning("limits unavailable (%s): no hold times or quotas shown", e)
            return None, None

        hub_groups = SnapshotReader(paths.hub_groups_snapshot(self.state_dir))

        def limits_for(user: str, groups) -> Any:
            store.reload(wait=False)  # called on the event loop: a changed file is read aside
            # the hub groups' properties as the proxy sees them (ds01hub.hub.group_snapshot)
            return hub_groups.resolve(store.current, user, groups)

        try:
            inventory = load_inventory(store.current.gpu_allocation)
        except Exception as e:
            self.log.warning("GPU inventory unavailable (%s): no GPU utilisation shown", e)
            return limits_for, None
        return limits_for, inventory

    async def open_exec_stream(self, exec_id: str, tty: bool) -> IOStream:
        """Start a docker exec and hijack its connection (the Engine API's documented
        `POST /exec/{id}/start` with `Upgrade: tcp`), so its bytes can be relayed; any bytes
        after the response head stay in the stream's buffer. The engine is the exec's: this
        host's, or in a swarm its node's (over mutual TLS: `ds01hub.gpu.swarm_nodes`).

        Not docker-py's `exec_start(socket=True)`: that reads the response head through
        http.client's buffered reader and hands back the raw socket behind it, so output that
        arrives in the same read as the head (a quick command on a loaded host) would be lost,
        and it blocks a thread. The API version is docker-py's negotiated `api_version`."""
        target = await asyncio.to_thread(self.context.engine.exec_target, exec_id)
        stream = await self._connect_engine(target.endpoint)
        body = json.dumps({"Detach": False, "Tty": tty}).encode()
        head = (
            f"POST /v{target.api_version}/exec/{exec_id}/start HTTP/1.1\r\nHost: docker\r\n"
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

    async def _connect_engine(self, endpoint: NodeEndpoint) -> IOStream:
        """A connection to an engine: its unix socket, or TCP with mutual TLS."""
        address = endpoint.address
        try:
            if isinstance(address, str):
                stream = IOStream(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
                try:
                    await stream.connect(address)
                except BaseException:
                    stream.close()
                    raise
                return stream
            context = await asyncio.to_thread(endpoint.ssl_context)
            host, port = address
            return await TCPClient().connect(host, port, ssl_options=context, timeout=30)
        except (StreamClosedError, OSError, TimeoutError) as e:
            raise docker_unreachable(endpoint.url, getattr(e, "real_error", None) or e) from None

    async def resize_exec(self, exec_id: str, rows: int, cols: int) -> None:
        try:
            await asyncio.to_thread(self.context.engine.exec_resize, exec_id, rows, cols)
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
                (f"{p}/builds/current", BuildHandler),
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


main = Broker.launch_instance

if __name__ == "__main__":
    main()
