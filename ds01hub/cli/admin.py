"""The `ds01hub` admin command: the dispatcher and every sub-command's arguments.

The sub-commands' arguments are declared here, not in the modules that do the work, so no
service or host module knows about the command line (and none imports `ds01hub.cli`). Two
exceptions run before any venv exists, stdlib only, with their own `python3 -m` entry:
`ds01hub.host.bootstrap.add_arguments` and `ds01hub.host.install.add_commands` declare their
own arguments, and the sub-commands here reuse them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from traitlets import Bool, Unicode, default

from ds01hub import paths, provenance
from ds01hub.cli import core_commands
from ds01hub.cli.output import (
    EXIT_USAGE,
    CliError,
    Column,
    print_error,
    print_json,
    render_table,
    use_colour,
)
from ds01hub.dockerproxy import server
from ds01hub.gpu import access
from ds01hub.host import backup, bootstrap, demo, install, siteenv, swarm_tls
from ds01hub.host.bootstrap import BootstrapError
from ds01hub.hub.services import OPS_SCOPES
from ds01hub.services.ops.app import Components, OpsService
from ds01hub.services.ops.culler import PassReport


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ds01hub",
        description="ds01hub administration: limits, GPUs, allocations, the socket proxy.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    register_proxy(subparsers)
    core_commands.register(subparsers)
    register_bootstrap(subparsers)
    register_demo(subparsers)
    register_cull(subparsers)  # ops: ds01hub cull [--once] [--dry-run]
    install.add_commands(subparsers)  # live: ds01hub install / uninstall
    register_gpu_access(subparsers)  # live: ds01hub grant-gpu-access
    register_backup(subparsers)  # live: ds01hub backup / restore
    register_swarm_tls(subparsers)  # swarm: ds01hub swarm-tls ca / node / client
    return parser


def main(argv: list[str] | None = None) -> int:
    # live: the hub's settings (state dir, limits, hub URL, admin token) from the site's
    # environment file, so the admin commands find the running hub without flags.
    siteenv.load_or_warn()
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passes_through", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest  # a sub-command that passes its arguments through (cull) parses them
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    return int(args.handler(args) or 0)


def positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    """An argparse type: a number of `kind` above zero (else a usage error naming it)."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} is not above zero")
        return value

    return parse


def register_proxy(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "proxy",
        help="run the Docker socket filter proxy (each user sees only their own containers)",
        description=(
            "Serve the Docker Engine API on a unix socket. Each client is identified by "
            "SO_PEERCRED; root, --admin users and members of --admin-group get full access, "
            "everyone else only their own containers (ds01.user=<user> in labels signed with "
            "the hub's label key) and a deny-by-default set of endpoints. Users point the docker "
            "CLI at it: DOCKER_HOST=unix:///run/ds01hub/docker.sock."
        ),
    )
    parser.add_argument(
        "--listen",
        default=str(paths.DOCKER_PROXY_SOCKET),
        help="socket to serve (created mode 0666; default %(default)s)",
    )
    parser.add_argument(
        "--upstream",
        default=str(paths.DOCKER_SOCKET),
        help="the engine's socket (default %(default)s)",
    )
    parser.add_argument(
        "--admin-group", metavar="GROUP", help="members of this Unix group get full access"
    )
    parser.add_argument(
        "--admin",
        metavar="USER",
        action="append",
        default=[],
        help="a user with full access (repeatable)",
    )
    parser.add_argument(
        "--limits",
        metavar="FILE",
        help="resource-limits YAML applied to containers users create (default: "
        "$DS01HUB_LIMITS, else /etc/ds01hub/resource-limits.yaml; with neither, the built-in "
        "defaults, which limit no container setting; the security policy applies regardless)",
    )
    parser.add_argument(
        "--hub-state-dir",
        metavar="DIR",
        type=Path,
        help="the hub's state directory, for its label key and deployment id (default: "
        f"${paths.ENV_STATE_DIR}, else {paths.DEFAULT_STATE_DIR}); it must be the "
        "hub's, or containers made through the proxy are nobody's to the hub and vice versa",
    )
    parser.add_argument(
        "--aggregate-cgroup-root",
        metavar="DIR",
        default=paths.aggregate_cgroup_root(),
        help="where the cgroup v1 controllers are mounted (/sys/fs/cgroup, Docker's cgroupfs "
        "driver): a container of a user with `aggregate` limits is then created under their "
        "parent cgroup <cgroup_parent or /ds01>/u-<user>, its caps written there before each "
        "start, as the hub's DS01Spawner.aggregate_cgroup_root does (default: "
        f"${paths.ENV_AGGREGATE_CGROUP_ROOT}, the same key the hub reads; empty: aggregate "
        "caps are checked at create and start only)",
    )
    parser.add_argument(
        "--bind-root",
        metavar="TEMPLATE",
        action="append",
        help="where users may bind-mount from, with {user} and {home} "
        "(repeatable; default {home} and /workspace/{user})",
    )
    parser.add_argument(
        "--shared-image",
        metavar="REF",
        action="append",
        help="an image every user may run and build FROM, matched by its id (resolved at "
        "start and every 30 s; repeatable; default: "
        + " and ".join(server.DEFAULT_SHARED_IMAGES)
        + "); images the limits file's allowed_images name are shared with those users too",
    )
    parser.add_argument(
        "--state-dir",
        default=str(paths.PROXY_STATE_DIR),
        help="the proxy's own directory (created 0700): per-user lock files that make "
        "count-and-create atomic, also between proxy processes (default %(default)s)",
    )
    parser.add_argument(
        "--header-timeout",
        metavar="SECONDS",
        type=positive(float),
        default=server.HEADER_TIMEOUT,
        help="close a connection whose request head (also the next one on a kept-alive "
        "connection) has not arrived within this time, or whose request body pauses for "
        "longer; answers being streamed (logs -f, events, attach) are never timed out "
        "(default %(default)g)",
    )
    parser.add_argument(
        "--max-connections-per-user",
        metavar="N",
        type=positive(int),
        default=server.MAX_CONNECTIONS_PER_USER,
        help="open connections one user (uid) may hold, streams included; the next ones are "
        "answered 429 with a message naming this limit (default %(default)d)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level (every forwarded request is logged at info, as sent to the engine; "
        "denied requests at warning)",
    )
    parser.set_defaults(handler=server.run)


def register_bootstrap(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bootstrap",
        help="install/start what ds01hub needs and build its images (idempotent)",
        description=bootstrap.__doc__.split("\n\n")[0],
    )
    bootstrap.add_arguments(parser)


def register_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="start/stop the demo hub on this machine (DEMO ONLY: shared password)",
        description=demo.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("action", choices=("start", "stop", "status"))
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="where the demo's config, database and log live (default: .state/demo in the "
        "source checkout)",
    )
    parser.add_argument(
        "--port", type=int, default=demo.DEFAULT_PORT, help="public port on 127.0.0.1"
    )
    parser.add_argument("--hub-port", type=int, default=8081, help="hub port on the bridge")
    parser.add_argument("--proxy-api-port", type=int, default=8001, help="proxy API port")
    parser.add_argument(
        "--image",
        default=f"{bootstrap.SINGLEUSER_REPOSITORY}:{bootstrap.ALIAS_TAG}",
        help="single-user image (default %(default)s)",
    )
    parser.add_argument("--timeout", type=float, default=90, help="seconds to wait")
    parser.add_argument(
        "--purge",
        action="store_true",
        help="stop: also remove the demo's containers, Unix accounts (homes, workspaces), "
        "state, and the users' commands unless a real install owns them",
    )
    parser.add_argument(
        "--workspace-root",
        type=Path,
        default=paths.WORKSPACE_ROOT,
        help="where the users' workspaces live (default %(default)s, as installed)",
    )
    parser.add_argument(
        "--broker-socket",
        default=str(paths.BROKER_SOCKET),
        help="the broker's socket, which the users' commands talk to (default %(default)s)",
    )
    parser.add_argument(
        "--user-prefix",
        default="",
        help="prefix for the demo logins and their Unix accounts (several demos on one host)",
    )
    parser.add_argument(
        "--install-root",
        type=Path,
        default=Path("/"),
        help=argparse.SUPPRESS,  # tests: the users' commands under a temp dir
    )
    parser.add_argument(
        "--no-commands",
        action="store_true",
        help="do not put the users' commands on PATH (/opt/ds01hub/venv, /usr/local/bin)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(handler=demo.run_command)


def register_cull(subparsers: Any) -> None:
    """`ds01hub cull ...`: its options are the ds01-ops service's own (CullCommand), so the
    sub-command passes its arguments through rather than declaring any."""
    parser = subparsers.add_parser(
        "cull",
        add_help=False,
        help="stop idle servers, expire GPU holds, remove old stopped containers "
        "(the ds01-ops service's culler: ds01hub cull --help-all)",
    )
    parser.set_defaults(handler=cmd_cull, passes_through=True)


def report_lines(report: PassReport, colour: bool = False) -> list[str]:
    """A pass as `ds01hub cull` prints it: a table of servers, then lifecycle actions, errors."""
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


class CullCommand(OpsService):
    """`ds01hub cull`: the ds01-ops service's culler run from a shell, with the service's own
    settings (`--interval`, `--warn-before`, `--gpu-threshold`, `--limits`, `--label`, ... and
    `c.OpsService.*` in a config file), as jupyterhub-idle-culler runs as a service or by hand.
    One pass with --once, else a pass every --interval seconds; each pass printed, nothing
    served. Needs a hub API token with the ds01-ops scopes."""

    name = "ds01hub cull"
    description = __doc__

    @default("log_level")
    def _default_log_level(self) -> int:
        return logging.WARNING  # the passes are the output; the service logs each step

    once = Bool(False, help="One pass, then exit (status 1 when the pass had errors).").tag(
        config=True
    )
    json = Bool(False, help="Print each pass as JSON.").tag(config=True)
    hub_api = Unicode(
        "",
        help="The hub's API URL (default: $JUPYTERHUB_API_URL, else the hub's port "
        "$DS01HUB_HUB_PORT on the Docker bridge, as the site's ds01hub.env says).",
    ).tag(config=True)
    token_file = Unicode(
        help="File holding the hub API token (default: $JUPYTERHUB_API_TOKEN itself, else "
        "$DS01HUB_ADMIN_TOKEN_FILE, which ds01hub install makes and the hub registers as the "
        "ds01hub-cli service).",
    ).tag(config=True)

    @default("token_file")
    def _default_token_file(self) -> str:
        return os.environ.get("DS01HUB_ADMIN_TOKEN_FILE", "")

    aliases = {
        **OpsService.aliases,
        "hub-api": "CullCommand.hub_api",
        "token-file": "CullCommand.token_file",
    }
    flags = {
        **OpsService.flags,
        "once": ({"CullCommand": {"once": True}}, "one pass, then exit"),
        "json": ({"CullCommand": {"json": True}}, "print each pass as JSON"),
    }

    _parsing = False

    def initialize(self, argv: list[str] | None = None) -> None:
        self._parsing = True
        try:
            super().initialize(argv)
        finally:
            self._parsing = False

    def exit(self, exit_status: int | str | None = 0) -> None:
        """traitlets exits 1 on a bad option; for a ds01hub command that is a usage error (2)."""
        usage = self._parsing and exit_status == 1
        super().exit(EXIT_USAGE if usage else exit_status)

    def start(self) -> None:
        self.exit(asyncio.run(self.passes()))

    def token(self) -> str:
        token = os.environ.get("JUPYTERHUB_API_TOKEN", "")
        if self.token_file and not token:
            try:
                token = Path(self.token_file).read_text().strip()
            except OSError as error:
                raise CliError(f"cannot read the token file: {error}") from None
        if not token:
            raise CliError(
                "no hub API token",
                hint="set $JUPYTERHUB_API_TOKEN or pass --token-file FILE (an installed host "
                "has /etc/ds01hub/admin-token, named by DS01HUB_ADMIN_TOKEN_FILE in ds01hub.env)",
            )
        return token

    def cli_components(self) -> Components:
        """The culler, or CliError naming what is missing and how to fix it. Called inside the
        running event loop (the hub client binds to it)."""
        import docker

        from ds01hub.hub.client import HubClient
        from ds01hub.limits import LimitsError

        token = self.token()
        try:
            client = docker.from_env()
            client.ping()
        except docker.errors.DockerException as error:
            raise CliError(
                f"cannot reach the Docker engine: {error}", hint="run as root; check dockerd"
            ) from None
        try:
            api_url = self.hub_api or siteenv.hub_api_url()
        except BootstrapError as error:
            raise CliError(str(error), hint="pass --hub-api URL") from None
        try:
            return self.components(HubClient(api_url, token), client)
        except LimitsError as error:
            raise CliError(str(error), hint="run: ds01hub check-config") from None
        except (OSError, provenance.ProvenanceError) as error:
            raise CliError(str(error), hint="check --limits and --state-dir") from None

    async def passes(self) -> int:
        from ds01hub.hub.client import HubError

        try:
            parts = self.cli_components()
        except CliError as error:
            print_error(error)
            return error.code
        while True:
            try:
                report = await parts.culler.run_once(self.dry_run)
            except HubError as error:
                hint = "check --hub-api and the token's scopes: " + ", ".join(OPS_SCOPES)
                print_error(CliError(f"the hub refused: {error}", hint=hint))
                return 1
            if self.json:
                print_json(report.to_dict())
            else:
                print("\n".join(report_lines(report, use_colour(sys.stdout))), flush=True)
            if self.once:
                return 1 if report.errors else 0
            await asyncio.sleep(self.interval)


def cmd_cull(args: argparse.Namespace) -> int:
    app = CullCommand()
    try:
        app.initialize(args.rest)
        app.start()
    except SystemExit as done:
        return int(done.code or 0)
    return 0


def register_gpu_access(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "grant-gpu-access",
        help="let a user open the GPUs outside containers for a limited time (root)",
        description=access.__doc__.split("\n\n")[0]
        + "\n\n  ds01hub grant-gpu-access USER --for 24h [--reason TEXT]\n"
        "  ds01hub grant-gpu-access --list\n  ds01hub grant-gpu-access USER --revoke\n"
        "  ds01hub grant-gpu-access --sweep   (the timer runs it: ends expired grants)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("user", nargs="?", metavar="USER")
    parser.add_argument("--for", dest="duration", metavar="DURATION", help="e.g. 2h, 24h, 7d")
    parser.add_argument("--reason", default="", help="why (kept with the grant)")
    parser.add_argument("--revoke", action="store_true", help="end USER's grant now")
    parser.add_argument("--list", action="store_true", help="show the grants")
    parser.add_argument("--sweep", action="store_true", help="end the expired grants")
    parser.add_argument("--state-dir", help="default: $DS01HUB_STATE_DIR, else /var/lib/ds01hub")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(handler=access.run_command)


def register_swarm_tls(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "swarm-tls",
        help="make the swarm's CA and the certificates for mutual TLS to each node's engine",
        description=swarm_tls.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("what", choices=("ca", "node", "client"))
    parser.add_argument("hostname", nargs="?", help="the node's swarm hostname (node only)")
    parser.add_argument(
        "--address",
        action="append",
        default=[],
        help="an IP or DNS name the hub reaches the node by (node only; repeat for several)",
    )
    parser.add_argument(
        "--dir", type=Path, default=swarm_tls.DEFAULT_DIR, help=f"default {swarm_tls.DEFAULT_DIR}"
    )
    parser.set_defaults(handler=swarm_tls.run_command)


def register_backup(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "backup",
        help="save the hub's state (databases online) into a new directory",
        description=backup.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _backup_arguments(parser)
    parser.set_defaults(handler=backup.run_backup)
    parser = subparsers.add_parser(
        "restore",
        help="put a backup of the hub's state back (the hub stopped)",
        description=backup.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _backup_arguments(parser)
    parser.set_defaults(handler=backup.run_restore)


def _backup_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR")
    parser.add_argument(
        "--state-dir", help="the hub's state (default: $DS01HUB_STATE_DIR, else /var/lib/ds01hub)"
    )
    parser.add_argument("--config", action="store_true", help="also the site config (--config-dir)")
    parser.add_argument("--config-dir", default=str(paths.CONFIG_DIR), help="default %(default)s")
    parser.add_argument("--json", action="store_true", help="print JSON")


if __name__ == "__main__":
    sys.exit(main())
