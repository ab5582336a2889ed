"""The ds01-ops JupyterHub managed service and the `ds01hub cull` command.

One process per hub (`python -m ds01hub.ops_service`, registered by `configure_hub`) runs the
GPU-aware cull loop (`ds01hub.culler`) with the lifecycle pass (`ds01hub.lifecycle`), and
serves the admin page (`ds01hub.admin_page`) and the state metrics (`ds01hub.metrics`) under
`/services/ds01-ops/`. Why a service and not a task inside the hub: Docker, NVML and SQLite
calls (slow on a busy engine) never stall the hub's event loop, a crash here never takes the
hub down (JupyterHub restarts its managed services), and the same code runs from a shell as
`ds01hub cull --once`, talking to the hub through the same REST API.

It shares the spawner's state directory (`$DS01HUB_STATE_DIR`: allocator lock, reservations,
`events.db`) and limits file, so it sees the same holdings and writes the same event log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from traitlets import Bool, Float, Integer, List, Unicode, default
from traitlets.config import Application

from ds01hub import provenance, siteenv
from ds01hub.bootstrap import BootstrapError
from ds01hub.culler import Culler, PassReport, default_state_dir, utcnow
from ds01hub.engine import EngineState, engine_unreachable, engine_url

__all__ = ["OpsService", "build_components", "configure_hub", "register"]

SERVICE_NAME = "ds01-ops"
DEFAULT_PORT = 10102
EVENTLOG_FILE = "events.db"  # the spawner's default too (DS01Spawner.event_log_path)
#: What the culler's token may do: see users, their groups, activity and servers; stop servers.
SERVICE_SCOPES = ["list:users", "read:users", "read:users:activity", "read:servers", "servers"]


@dataclass
class Components:
    """The long-lived objects one culler process works with."""

    culler: Culler
    allocator: Any
    eventlog: Any
    limits: Any
    inventory: Any
    engine: EngineState

    def overview(self) -> dict[str, Any]:
        """The admin page's model (blocking: Docker and SQLite). While the Docker engine is
        unreachable the page says so (and since when) instead of failing; slot holders are
        unknown until it answers."""
        from ds01hub.admin_page import overview

        self.limits.reload()
        try:
            status = self.allocator.status()
            self.engine.back()
        except Exception as error:
            if not engine_unreachable(error):
                raise
            self.engine.lost(error)
            status = []
        return overview(
            status,
            self.inventory,
            self.eventlog,
            self.culler.clock(),
            config_error=self.limits.last_error,
            pending_culls=self.culler.warnings.load().values(),
            engine=self.engine,
        )


def build_components(
    hub: Any,
    docker_client: Any,
    limits_path: str | os.PathLike,
    state_dir: str | os.PathLike,
    *,
    remove_stopped: bool = True,
    inventory: Any = None,
    extra_labels: Iterable[str] = (),
    clock: Callable[[], datetime] = utcnow,
    **culler_options: Any,
) -> Components:
    """Wire limits (reloaded on change, last good kept), the GPU inventory, the event log
    (`state_dir/events.db`, as the spawner's), the allocator, the lifecycle pass and the culler."""
    from ds01hub.allocation_state import GpuAllocator, docker_lister
    from ds01hub.eventlog import EventLog
    from ds01hub.inventory import load_inventory
    from ds01hub.lifecycle import Lifecycle
    from ds01hub.limits import LimitsStore

    limits = LimitsStore(limits_path, log=culler_options.get("log"))
    inventory = inventory or load_inventory(limits.current.gpu_allocation)
    eventlog = EventLog(Path(state_dir) / EVENTLOG_FILE)
    extra_labels = list(extra_labels)
    trust = provenance.load(state_dir)
    allocator = GpuAllocator(
        docker_client,
        inventory,
        state_dir,
        eventlog,
        clock,
        limits=limits,
        container_lister=docker_lister(docker_client, extra_labels, trust=trust),
        trust=trust,
    )
    lifecycle = (
        Lifecycle(docker_client, allocator, limits, eventlog, extra_labels=extra_labels)
        if remove_stopped
        else None
    )
    culler = Culler(
        hub,
        docker_client,
        inventory,
        limits,
        eventlog=eventlog,
        state_dir=state_dir,
        lifecycle=lifecycle,
        extra_labels=extra_labels,
        clock=clock,
        trust=trust,
        **culler_options,
    )
    name = f"the Docker engine at {engine_url()}"
    engine = EngineState(
        name, culler_options.get("log"), connect=_docker_from_env, ping_interval=2.0
    )
    return Components(culler, allocator, eventlog, limits, inventory, engine)


def _docker_from_env() -> Any:
    import docker

    return docker.from_env()


class OpsService(Application):
    """The ds01-ops managed service: the cull loop, the admin page, the state metrics."""

    name = "ds01hub-ops"
    description = __doc__

    @default("log_level")
    def _default_log_level(self) -> int:
        return logging.INFO  # every warning, cull and removal is worth a line in the hub log

    interval = Float(300.0, help="Seconds between cull passes.").tag(config=True)
    warn_before = Float(
        600.0,
        help="Warn users this many seconds before their server is culled (0: no warning).",
    ).tag(config=True)
    gpu_threshold = Float(
        5.0, help="GPU utilisation (percent) at or above which a slot counts as busy."
    ).tag(config=True)
    cpu_threshold = Float(
        10.0, help="CPU use (percent of one core) at or above which a container is busy."
    ).tag(config=True)
    gpu_samples = Integer(
        3, help="NVML utilisation samples per pass; all must be under the threshold."
    ).tag(config=True)
    gpu_sample_interval = Float(1.0, help="Seconds between those samples.").tag(config=True)
    dry_run = Bool(False, help="Decide and report, but stop, warn and remove nothing.").tag(
        config=True
    )
    remove_stopped = Bool(
        True,
        help="Run the lifecycle pass: record expired GPU holds, remove containers stopped "
        "longer than container_hold_after_stop (their workspace mounts are kept).",
    ).tag(config=True)
    limits_path = Unicode(
        "", help="The resource-limits YAML (default: $DS01HUB_LIMITS, else /etc/ds01hub/...)."
    ).tag(config=True)
    state_dir = Unicode(
        "",
        help="Allocator state and event log (default: $DS01HUB_STATE_DIR, else "
        "/var/lib/ds01hub); the same directory as the spawner's.",
    ).tag(config=True)

    extra_labels = List(
        Unicode(),
        help="Only containers with these labels too (`key=value`): one hub of several on an "
        "engine. Default: every ds01-managed container.",
    ).tag(config=True)

    aliases = {
        "interval": "OpsService.interval",
        "warn-before": "OpsService.warn_before",
        "limits": "OpsService.limits_path",
        "state-dir": "OpsService.state_dir",
    }
    flags = {"dry-run": ({"OpsService": {"dry_run": True}}, "decide only, act on nothing")}

    def start(self) -> None:
        import docker
        from prometheus_client import CollectorRegistry
        from tornado.httpserver import HTTPServer
        from tornado.ioloop import IOLoop

        from ds01hub.hubclient import HubClient
        from ds01hub.limits import default_limits_path
        from ds01hub.metrics import LimitsCollector, StateCollector

        hub = HubClient(os.environ["JUPYTERHUB_API_URL"], os.environ["JUPYTERHUB_API_TOKEN"])
        parts = build_components(
            hub,
            docker.from_env(),
            self.limits_path or default_limits_path(),
            self.state_dir or default_state_dir(),
            remove_stopped=self.remove_stopped,
            extra_labels=self.extra_labels,
            warn_before=self.warn_before,
            gpu_threshold=self.gpu_threshold,
            cpu_threshold=self.cpu_threshold,
            gpu_samples=self.gpu_samples,
            gpu_sample_interval=self.gpu_sample_interval,
            log=self.log,
        )
        self._reconcile(parts)
        registry = CollectorRegistry()
        registry.register(StateCollector(parts.allocator, parts.eventlog, parts.engine))
        registry.register(LimitsCollector([parts.limits]))
        app = make_web_app(parts, hub, registry)
        url = os.environ.get("JUPYTERHUB_SERVICE_URL", f"http://127.0.0.1:{DEFAULT_PORT}")
        host, _, port = url.split("://", 1)[-1].split("/", 1)[0].rpartition(":")
        HTTPServer(app).listen(int(port or DEFAULT_PORT), host or "127.0.0.1")
        loop = IOLoop.current()
        loop.spawn_callback(parts.culler.run_forever, self.interval, self.dry_run, parts.engine)
        self.log.info("ds01-ops on %s: culling every %.0fs", url, self.interval)
        loop.start()

    def _reconcile(self, parts: Components) -> None:
        """At hub start (this service starts with the hub): remove what a killed hub left
        that nothing claims (never-started containers), each with a `reconcile` event. The
        lifecycle pass does it again on every cull pass."""
        from ds01hub.allocation_state import AllocationStateError

        try:
            actions = parts.allocator.reconcile()
        except AllocationStateError as error:
            self.log.error("reconcile at start: %s", error)
            return
        for action in actions:
            self.log.warning("reconcile: %s (%s): %s", action.container, action.user, action.reason)


def make_web_app(parts: Components, hub: Any, registry: Any) -> Any:
    """The service's routes: the admin page, its JSON, the metrics, the OAuth callback."""
    from jupyterhub.services.auth import HubOAuth, HubOAuthCallbackHandler
    from tornado import web

    from ds01hub.admin_page import AdminApiHandler, AdminPageHandler, MetricsHandler

    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", f"/services/{SERVICE_NAME}/")
    prefix = prefix.rstrip("/") + "/"

    async def is_admin(name: str) -> bool:
        model = await hub.get_user(name, include_stopped=False)
        return bool(model and model.get("admin"))

    return web.Application(
        [
            (prefix, AdminPageHandler),
            (prefix + "api/overview", AdminApiHandler),
            (prefix + "metrics", MetricsHandler),
            (prefix + "oauth_callback", HubOAuthCallbackHandler),
        ],
        hub_auth=HubOAuth(api_url=os.environ.get("JUPYTERHUB_API_URL"), cache_max_age=60),
        cookie_secret=os.urandom(32),
        ds01_overview=parts.overview,
        ds01_is_admin=is_admin,
        ds01_registry=registry,
    )


def configure_hub(
    c: Any,
    *,
    url: str = f"http://127.0.0.1:{DEFAULT_PORT}",
    state_dir: str | os.PathLike | None = None,
    service_args: Iterable[str] = (),
    environment: Mapping[str, str] | None = None,
    announce: bool = True,
) -> None:
    """Register the ds01-ops managed service in a JupyterHub config `c`: its command (on
    `state_dir`, default `$DS01HUB_STATE_DIR` or /var/lib/ds01hub: the spawner's), its role
    (`SERVICE_SCOPES`), and admin-only access to its page (admins hold `access:services`).
    With `announce`, the hub's pages show each user their pending culls as a banner
    (`template_vars["announcement"]`). Prometheus scrapes `/services/ds01-ops/metrics` with a
    token that has `read:metrics`."""
    from ds01hub.broker import _replace_named  # also merges into a load_subconfig parent
    from ds01hub.culler import hub_announcement

    state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
    service = {
        "name": SERVICE_NAME,
        "url": url,
        "command": [
            sys.executable,
            "-m",
            "ds01hub.ops_service",
            f"--OpsService.state_dir={state_dir}",
            *service_args,
        ],
        "oauth_no_confirm": True,
        "environment": dict(environment or {}),
        "display": False,
    }
    role = {"name": SERVICE_NAME, "services": [SERVICE_NAME], "scopes": SERVICE_SCOPES}
    _replace_named(c.JupyterHub, "services", service)
    _replace_named(c.JupyterHub, "load_roles", role)
    if announce:
        c.JupyterHub.template_vars.update({"announcement": hub_announcement(state_dir)})


# -- `ds01hub cull` ---------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    """Add `ds01hub cull [--once] [--dry-run]` to the admin command."""
    parser = subparsers.add_parser(
        "cull",
        help="stop idle servers, expire GPU holds, remove old stopped containers",
        description="Run the GPU-aware idle culler against the hub: a single pass with --once, "
        "else a pass every --interval seconds. Needs a hub API token with "
        + ", ".join(SERVICE_SCOPES)
        + " ($JUPYTERHUB_API_TOKEN or --token-file).",
    )
    parser.add_argument("--once", action="store_true", help="one pass, then exit")
    parser.add_argument("--dry-run", action="store_true", help="decide and report; change nothing")
    parser.add_argument("--json", action="store_true", help="print each pass as JSON")
    parser.add_argument("--limits", metavar="FILE", help="the resource-limits YAML")
    parser.add_argument("--state-dir", metavar="DIR", help="allocator state and event log")
    parser.add_argument(
        "--hub-api",
        metavar="URL",
        help="the hub's API URL (default: $JUPYTERHUB_API_URL, else the hub's port "
        "$DS01HUB_HUB_PORT on the Docker bridge, as the site's ds01hub.env says)",
    )
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        default=os.environ.get("DS01HUB_ADMIN_TOKEN_FILE") or None,
        help="file holding the hub API token (default: $DS01HUB_ADMIN_TOKEN_FILE, which "
        "ds01hub install makes and the hub registers as the ds01hub-cli service)",
    )
    parser.add_argument("--interval", type=float, default=300.0, help="seconds between passes")
    parser.add_argument(
        "--warn-before", type=float, default=600.0, help="warning lead time in seconds"
    )
    parser.add_argument("--keep-stopped", action="store_true", help="skip the lifecycle pass")
    parser.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only containers that also carry this label (repeatable)",
    )
    parser.set_defaults(handler=cmd_cull)


def report_lines(report: PassReport, colour: bool = False) -> list[str]:
    """A pass as `ds01hub cull` prints it: a table of servers, then lifecycle actions, errors."""
    from ds01hub.cli.output import Column, render_table

    lines = [
        f"{'DRY RUN: ' if report.dry_run else ''}cull pass at {report.at:%Y-%m-%d %H:%M:%S} UTC"
    ]
    rows = [s.to_dict() for s in report.servers]
    columns = [
        Column("USER", "user"),
        Column("PROJECT", "project"),
        Column("ACTION", "action"),
        Column("WHY", "reason"),
        Column("CULL AT", "cull_at"),
    ]
    lines.append(render_table(rows, columns, colour=colour) if rows else "no running servers")
    for action in report.lifecycle:
        lines.append(f"{action.kind}: {action.container} ({action.user}): {action.reason}")
    lines += [f"error: {e}" for e in report.errors]
    return lines


def _cli_components(args: Any) -> Components:
    """The culler for `ds01hub cull`, or CliError naming what is missing and how to fix it.
    Called inside the running event loop (the hub client binds to it)."""
    import docker

    from ds01hub.cli.output import CliError
    from ds01hub.hubclient import HubClient
    from ds01hub.limits import LimitsError, default_limits_path

    token = os.environ.get("JUPYTERHUB_API_TOKEN", "")
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as error:
            raise CliError(f"cannot read the token file: {error}") from None
    if not token:
        raise CliError(
            "no hub API token",
            hint="set $JUPYTERHUB_API_TOKEN or pass --token-file FILE (an installed host has "
            "/etc/ds01hub/admin-token, named by DS01HUB_ADMIN_TOKEN_FILE in ds01hub.env)",
        )
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as error:
        raise CliError(
            f"cannot reach the Docker engine: {error}", hint="run as root; check dockerd"
        ) from None
    try:
        api_url = args.hub_api or siteenv.hub_api_url()
    except BootstrapError as error:
        raise CliError(str(error), hint="pass --hub-api URL") from None
    try:
        return build_components(
            HubClient(api_url, token),
            client,
            args.limits or default_limits_path(),
            args.state_dir or default_state_dir(),
            remove_stopped=not args.keep_stopped,
            extra_labels=args.label,
            warn_before=args.warn_before,
        )
    except LimitsError as error:
        raise CliError(str(error), hint="run: ds01hub check-config") from None
    except (OSError, provenance.ProvenanceError) as error:
        raise CliError(str(error), hint="check --limits and --state-dir") from None


async def _cli_passes(args: Any) -> int:
    from ds01hub.cli.output import CliError, print_error, print_json, use_colour
    from ds01hub.hubclient import HubError

    try:
        parts = _cli_components(args)
    except CliError as error:
        print_error(error)
        return error.code
    while True:
        try:
            report = await parts.culler.run_once(args.dry_run)
        except HubError as error:
            hint = "check --hub-api and the token's scopes: " + ", ".join(SERVICE_SCOPES)
            print_error(CliError(f"the hub refused: {error}", hint=hint))
            return 1
        if args.json:
            print_json(report.to_dict())
        else:
            print("\n".join(report_lines(report, use_colour(sys.stdout))), flush=True)
        if args.once:
            return 1 if report.errors else 0
        await asyncio.sleep(args.interval)


def cmd_cull(args: Any) -> int:
    return asyncio.run(_cli_passes(args))


def main(argv: list[str] | None = None) -> None:
    """`python -m ds01hub.ops_service`: the managed service (see `configure_hub`)."""
    app = OpsService.instance()
    app.initialize(argv)
    with contextlib.suppress(KeyboardInterrupt):  # JupyterHub stops services with SIGINT first
        app.start()


if __name__ == "__main__":
    main()
