"""The hub-side ds01 service: what notebooks may ask of the host, for their own user only.

A JupyterHub managed service (``python -m ds01hub.services.notebook``). The single-user server
extension forwards the widgets' requests here with the user's own JupyterHub token; JupyterHub
checks it (``access:services!service=ds01``) and tells us whose it is. Every endpoint then acts for
that user only: their quota, their containers, their image builds and images. This process is the
only one that talks to Docker on a notebook's behalf; user containers never get the socket.

Endpoints (under the service prefix, ``/services/ds01/``)::

    GET    api/me                  who the token belongs to
    GET    api/quota               limits, current usage and the GPU slots free now
    GET    api/containers          the user's containers
    GET    api/templates           image use-case templates
    GET    api/images              the user's images
    DELETE api/images/{name}       remove one of them
    POST   api/builds              start a build {name, template, pip_packages, apt_packages}
    GET    api/builds              the user's builds (this service run)
    GET    api/builds/{id}?since=N status and log events from N on
    GET    api/builds/{id}/stream  the same, streamed as NDJSON until the build ends
    POST   api/builds/{id}/cancel  stop that build of yours {wait} -> {image, stopped}
    POST   api/projects/{name}/server  start a container (named server) for a project

Requests without a valid token get 403 (JSON); a browser is redirected to the hub login for
the index page. A build id of someone else's build answers 404, like one that never existed.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from urllib.parse import urlparse

import docker
from jupyterhub.services.auth import HubOAuth, HubOAuthCallbackHandler, HubOAuthenticated
from pydantic import Field
from tornado import web
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from traitlets import Bool, Unicode, default
from traitlets.config import Application

from ds01hub import paths, provenance
from ds01hub.actions import images
from ds01hub.actions.builds import Build
from ds01hub.actions.operations import OperationError, OperationsContext, UserOperations
from ds01hub.bodies import Body, BuildCancel, shown
from ds01hub.engine import EngineState, engine_unreachable, engine_url, short_error
from ds01hub.gpu.allocator import GpuAllocator, docker_lister
from ds01hub.gpu.inventory import Inventory, load_inventory
from ds01hub.hub.client import HubClient
from ds01hub.hub.group_snapshot import SnapshotReader
from ds01hub.hub.services import NOTEBOOK_PORT, NOTEBOOK_SERVICE
from ds01hub.limits import LimitsError, LimitsStore
from ds01hub.services.settings import HostSettings, ImageBuildSettings
from ds01hub.services.web import JsonHandler
from ds01hub.spawner.options import GpuOffer, SpawnOptions

# ---------------------------------------------------------------- handlers


class ServiceHandler(HubOAuthenticated, JsonHandler):
    """Base: JSON in and out, the current *user* (never a service) or 403."""

    @property
    def service(self) -> DS01Service:
        return self.settings["ds01_service"]

    @property
    def user(self) -> str:
        return self.current_user["name"]

    def get_login_url(self) -> str:
        # API clients get a JSON 403, not a redirect to an HTML login page.
        raise web.HTTPError(403, "a JupyterHub token with access to the ds01 service is required")

    def prepare(self) -> None:
        model = self.current_user
        if model is None:
            raise web.HTTPError(
                403, "a JupyterHub token with access to the ds01 service is required"
            )
        if model.get("kind", "user") != "user":
            raise web.HTTPError(403, "only users can use the ds01 service, not other services")

    def check_xsrf_cookie(self) -> None:
        # Token-authenticated API calls need no xsrf token; cookie (browser) sessions do.
        if not self.request.headers.get("Authorization"):
            super().check_xsrf_cookie()

    def since(self) -> int:
        """The `since` query argument: an event index >= 0 (a named 400 otherwise)."""
        text = self.get_argument("since", "0") or "0"
        if not text.isdigit() or len(text) > 12:
            raise OperationError(
                f"since={shown(text)} is not an event number", "send since=N with N >= 0"
            )
        return int(text)

    def operations(self) -> UserOperations:
        return UserOperations(self.service.operations_context(), self.user)

    def _handle_request_exception(self, error: BaseException) -> None:
        """Refusals (bad input, not yours, over quota) answer with their status, unlogged; an
        unreachable Docker engine is a 503 that says so (logged once per outage)."""
        if engine_unreachable(error):
            self.service.engine.lost(error)
            error = OperationError(
                f"the Docker engine is unreachable ({short_error(error)})",
                "it is stopped or restarting; try again in a minute",
                503,
            )
        super()._handle_request_exception(error)


class MeHandler(ServiceHandler):
    def get(self) -> None:
        self.write_json({"name": self.user, "service": NOTEBOOK_SERVICE})


class QuotaHandler(ServiceHandler):
    async def get(self) -> None:
        quota = await self.operations().quota()
        quota["gpus_free"] = await asyncio.to_thread(self.service.gpus_free)
        self.write_json(quota)


class ContainersHandler(ServiceHandler):
    async def get(self) -> None:
        self.write_json(await self.operations().list_containers())


class TemplatesHandler(ServiceHandler):
    def get(self) -> None:
        self.write_json([t.to_dict() for t in images.list_templates()])


class ImagesHandler(ServiceHandler):
    async def get(self) -> None:
        found = await asyncio.to_thread(images.list_user_images, self.service.docker, self.user)
        self.write_json([i.to_dict() for i in found])


class ImageHandler(ServiceHandler):
    async def delete(self, name: str) -> None:
        images.validate_image_name(name)
        service = self.service
        tag = await asyncio.to_thread(
            service.delete_image, service.docker, service.state_dir, self.user, name
        )
        self.write_json({"deleted": tag})


class BuildsHandler(ServiceHandler):
    def get(self) -> None:
        self.write_json([b.to_dict() for b in self.service.builds.for_user(self.user)])

    async def post(self) -> None:
        spec = images.spec_from_request(self.user, self.body(images.BuildRequest))
        existing = await asyncio.to_thread(images.list_user_images, self.service.docker, self.user)
        images.check_image_quota(
            (i.name for i in existing), spec.name, self.service.max_images_per_user
        )
        build = self.service.builds.start(spec)
        self.write_json(build.to_dict(since=0), status=202)


class BuildHandler(ServiceHandler):
    def _build(self, build_id: str) -> Build:
        build = self.service.builds.get(self.user, build_id)
        if build is None:
            raise OperationError(f"no build {build_id!r} of yours", status=404)
        return build

    def get(self, build_id: str) -> None:
        self.write_json(self._build(build_id).to_dict(since=self.since()))


class BuildCancelHandler(BuildHandler):
    """Stop one of the user's own builds (the id is looked up among the user's builds only: a
    stranger's id answers 404, like one that never existed); an ended build is a 409."""

    async def post(self, build_id: str) -> None:
        body = self.body(BuildCancel)
        build = self._build(build_id)
        if build.finished:
            raise OperationError(
                f"the build of {build.spec.tag} has already ended ({build.status})",
                "nothing to cancel; start a new build if you need one",
                status=409,
            )
        self.write_json(await self.service.builds.cancel(self.user, body.wait))


class BuildStreamHandler(BuildHandler):
    """Newline-delimited JSON events, flushed as they come, until the build ends."""

    async def get(self, build_id: str) -> None:
        build, since = self._build(build_id), self.since()
        await self.stream_json(build.follow(since))


class ProjectServerBody(Body):
    options: SpawnOptions = Field(
        default_factory=SpawnOptions, description="spawn options: profile, image, gpus, mig"
    )


class ProjectServerHandler(ServiceHandler):
    """Start a container for a project: the one project step that needs the hub."""

    async def post(self, project: str) -> None:
        options = self.body(ProjectServerBody).options.model_dump(exclude_defaults=True)
        last: dict = {}
        async for event in self.operations().start(project, options, create=True):
            last = event
        self.write_json(last.get("container") or last, status=201)


class IndexHandler(ServiceHandler):
    """A browser landing page (cookie login through the hub's OAuth)."""

    get_login_url = HubOAuthenticated.get_login_url

    def prepare(self) -> None:
        """Authentication happens in ``@web.authenticated``, which redirects to the hub login."""

    @web.authenticated
    def get(self) -> None:
        self.write_json({"service": NOTEBOOK_SERVICE, "user": self.user, "api": "api/"})


# ---------------------------------------------------------------- application


class DS01Service(HostSettings, ImageBuildSettings, Application):
    """The ds01 hub-side service (a JupyterHub managed service)."""

    name = "ds01hub-service"
    description = "Hub-side ds01 service: quota, containers and image builds for notebooks"

    hub_api_url = Unicode(help="The hub API URL. Default: $JUPYTERHUB_API_URL.").tag(config=True)

    @default("hub_api_url")
    def _default_hub_api_url(self) -> str:
        return os.environ.get("JUPYTERHUB_API_URL", "http://127.0.0.1:8081/hub/api")

    service_url = Unicode(
        help="Where to listen. Default: $JUPYTERHUB_SERVICE_URL (set by JupyterHub)."
    ).tag(config=True)

    @default("service_url")
    def _default_service_url(self) -> str:
        return os.environ.get("JUPYTERHUB_SERVICE_URL", f"http://127.0.0.1:{NOTEBOOK_PORT}")

    service_prefix = Unicode(help="URL prefix. Default: $JUPYTERHUB_SERVICE_PREFIX.").tag(
        config=True
    )

    @default("service_prefix")
    def _default_service_prefix(self) -> str:
        return os.environ.get("JUPYTERHUB_SERVICE_PREFIX", f"/services/{NOTEBOOK_SERVICE}/")

    allow_project_servers = Bool(
        True, help="Whether notebooks may ask for a container (named server) per project."
    ).tag(config=True)

    aliases = {
        "base-image": "DS01Service.base_image",
        "ca-bundle": "DS01Service.ca_bundle",
        "limits": "DS01Service.limits_path",
        "state-dir": "DS01Service.state_dir",
    }

    def initialize(self, argv: list[str] | None = None) -> None:
        super().initialize(argv)
        self.docker = docker.from_env()
        self.trust = provenance.load(self.state_dir)
        self.engine = EngineState(
            f"the Docker engine at {engine_url()}",
            self.log,
            connect=docker.from_env,
            ping_interval=2.0,
        )
        self.builds = self.build_manager(self.docker, self.state_dir)
        self._limits_store: LimitsStore | None = None
        self._allocator: GpuAllocator | None = None
        # the hub groups' properties as the proxy sees them (ds01hub.hub.group_snapshot)
        self._hub_groups = SnapshotReader(paths.hub_groups_snapshot(self.state_dir))

    def limits_store(self) -> LimitsStore | None:
        """The host's limits (read once, then re-read on change), or None when unreadable."""
        if self._limits_store is None:
            try:
                self._limits_store = LimitsStore(self.limits_path or None, log=self.log)
            except LimitsError as error:
                self.log.error("%s:\n%s", error.summary(), "\n".join(error.lines()))
                return None
        return self._limits_store

    def inventory(self) -> Inventory | None:
        """The host's GPU slots (from the limits' `gpu_allocation`: NVML or SIMULATED), so the
        notebook names a held slot ("slot 0: NVIDIA A100") and counts the free ones."""
        allocator = self.allocator()
        return allocator.inventory if allocator else None

    def allocator(self) -> GpuAllocator | None:
        """A read-only view of the host's GPU allocation (the spawner's state directory and
        deployment): the same holdings `ds01hub status` and the spawn form count."""
        if self._allocator is None:
            store = self.limits_store()
            if store is None:
                return None
            try:
                self._allocator = GpuAllocator(
                    self.docker,
                    load_inventory(store.current.gpu_allocation),
                    self.state_dir,
                    None,
                    limits=store,
                    container_lister=docker_lister(self.docker, trust=self.trust),
                    trust=self.trust,
                )
            except OSError as error:  # the state directory: quotas still answer, without GPUs
                self.log.warning("GPU allocation state unreadable (%s): no GPU counts", error)
                return None
        return self._allocator

    def gpus_free(self) -> dict | None:
        """The GPU slots free now, as the spawn form counts them (blocking: lists containers);
        None when this host has no GPU inventory."""
        allocator = self.allocator()
        if allocator is None or not allocator.inventory.slots:
            return None
        inventory = allocator.inventory
        return GpuOffer.from_slots(
            inventory.slots, allocator.holdings(), inventory.simulated
        ).to_dict()

    def limits_for(self, user: str, groups: Iterable[str]):
        """The user's resolved limits, or None when no limits file can be read (called on the
        event loop: a changed file is re-read on the store's thread, the last good one used
        meanwhile)."""
        store = self.limits_store()
        if store is None:
            return None
        store.reload(wait=False)
        return self._hub_groups.resolve(store.current, user, groups)

    def operations_context(self) -> OperationsContext:
        token = os.environ.get("JUPYTERHUB_API_TOKEN", "")
        return OperationsContext(
            hub=HubClient(self.hub_api_url, token),
            docker=self.docker,
            trust=self.trust,
            limits_for=self.limits_for,
            inventory=self.inventory(),
            auto_create_users=False,
        )

    def make_app(self) -> web.Application:
        prefix = self.service_prefix.rstrip("/") + "/"
        api = prefix + "api/"
        routes: list[tuple] = [
            (prefix, IndexHandler),
            (prefix + "oauth_callback", HubOAuthCallbackHandler),
            (api + "me", MeHandler),
            (api + "quota", QuotaHandler),
            (api + "containers", ContainersHandler),
            (api + "templates", TemplatesHandler),
            (api + "images", ImagesHandler),
            (api + r"images/([^/]+)", ImageHandler),
            (api + "builds", BuildsHandler),
            (api + r"builds/([0-9a-f]{32})", BuildHandler),
            (api + r"builds/([0-9a-f]{32})/stream", BuildStreamHandler),
            (api + r"builds/([0-9a-f]{32})/cancel", BuildCancelHandler),
        ]
        if self.allow_project_servers:
            routes.append((api + r"projects/([^/]+)/server", ProjectServerHandler))
        return web.Application(
            routes,
            ds01_service=self,
            hub_auth=HubOAuth(api_url=self.hub_api_url, cache_max_age=60),
            cookie_secret=os.urandom(32),
        )

    def start(self) -> None:
        url = urlparse(self.service_url)
        server = HTTPServer(self.make_app())
        server.listen(url.port or NOTEBOOK_PORT, url.hostname or "127.0.0.1")
        self.log.info("ds01 service listening on %s%s", self.service_url, self.service_prefix)
        try:
            IOLoop.current().start()
        except KeyboardInterrupt:  # JupyterHub stops managed services with SIGINT first
            self.log.info("ds01 service stopping")
        finally:
            self.builds.shutdown()


def main(argv: list[str] | None = None) -> None:
    app = DS01Service.instance()
    app.initialize(argv)
    app.start()


if __name__ == "__main__":
    main()
