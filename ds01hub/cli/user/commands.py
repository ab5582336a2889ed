"""The SSH users' commands: container-*, image-*, project-init, user-setup.

Each command is one `Command` in `COMMANDS` (its parser and its handler). The console scripts
(`container-create`, ...) are `entry(name)` functions; the dispatchers `container` and `image`
run the same commands as sub-commands (`container create`). Every command goes through the
control plane chosen by `backend.connect` (the broker on the host, the hub with a token
remotely), so quotas and the GPU allocator are the browser's.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable
from typing import Any

from ds01hub.cli.output import (
    EXIT_OK,
    EXIT_USAGE,
    exit_code,
    paint,
    print_error,
    use_colour,
)
from ds01hub.cli.user.containers import (
    configure_cleanup,
    configure_create,
    configure_list,
    configure_remove,
    configure_run,
    configure_start,
    configure_stop,
    run_cleanup,
    run_create,
    run_exit,
    run_list,
    run_remove,
    run_run,
    run_start,
    run_stats,
    run_stop,
)
from ds01hub.cli.user.context import Command, Context, no_options
from ds01hub.cli.user.images import (
    configure_image_create,
    configure_image_delete,
    configure_image_list,
    configure_image_update,
    run_image_cancel,
    run_image_create,
    run_image_delete,
    run_image_list,
    run_image_update,
)
from ds01hub.cli.user.projects import configure_project_init, my_workspace, run_project_init
from ds01hub.cli.user.views import quota_line
from ds01hub.errors import Ds01hubError
from ds01hub.host import siteenv

# ---- the table of commands ------------------------------------------------------------------

CONNECT_HELP = """\
Connecting to your containers:
  SSH:      ssh {user}@{host}   then   container-run NAME
  VS Code:  install "Remote - SSH", connect to {user}@{host}, open a terminal and run
            container-run NAME; or use the Dev Containers extension's "Attach to Running
            Container" with DOCKER_HOST=unix:///run/ds01hub/docker.sock (your containers only).
  Browser:  JupyterHub, where your containers appear as named servers.
"""


def run_user_setup(ctx: Context) -> int:
    """First-time onboarding: who you are, your quota, a project, an image, a container."""
    ctx.require_terminal("user-setup")
    me = ctx.backend.whoami()
    ctx.note(f"Welcome, {me['user']}! {quota_line(ctx.backend.quota())}.")
    already = already_set_up(ctx)
    if already:
        ctx.note("You are already set up:")
        for line in already:
            ctx.note(f"  {line}")
    if ctx.ask_yes_no(
        "Set up another project?" if already else "Set up a project now?", default=not already
    ):
        project_args = build_parser(COMMANDS["project-init"]).parse_args(["--guided"])
        run_project_init(dataclasses.replace(ctx, args=project_args))
    ctx.stdout.write(CONNECT_HELP.format(user=me["user"], host=os.uname().nodename))
    return EXIT_OK


def already_set_up(ctx: Context) -> list[str]:
    """What an earlier setup left (workspace, containers, images), one line each; empty for a
    first run."""
    lines = []
    workspace = my_workspace()
    # what project-init writes into every project
    projects = sorted(
        p.parent.name
        for p in workspace.glob("*/README.md")
        if (p.parent / "requirements.txt").is_file()
    )
    if projects:
        lines.append(f"projects in {workspace}: {', '.join(projects)}")
    containers = ctx.backend.list_containers(include_stopped=True)
    if containers:
        lines.append(
            "containers: " + ", ".join(f"{c['project']} ({c['state']})" for c in containers)
        )
    images = ctx.backend.images()
    if images:
        lines.append("images: " + ", ".join(str(i.get("tag")) for i in images))
    return lines


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command("container-create", "create and start a container", configure_create, run_create),
        Command(
            "container-run",
            "open a shell in a container (starts it if needed; leaving the shell leaves the "
            "container running)",
            configure_run,
            run_run,
            json=False,
        ),
        Command("container-start", "start a stopped container", configure_start, run_start),
        Command("container-stop", "stop a container (asks first)", configure_stop, run_stop),
        Command("container-list", "list your containers", configure_list, run_list),
        Command(
            "container-stats", "CPU, memory and GPU use against your limits", no_options, run_stats
        ),
        Command(
            "container-cleanup",
            "remove stopped containers and free their GPUs",
            configure_cleanup,
            run_cleanup,
        ),
        Command("container-remove", "remove a container", configure_remove, run_remove),
        Command(
            "container-exit",
            "explain leaving a container vs stopping it",
            no_options,
            run_exit,
            json=False,
            acts_for_user=False,
        ),
        Command(
            "image-create",
            "build an image from a use-case template",
            configure_image_create,
            run_image_create,
        ),
        Command(
            "image-list",
            "list your images (or the templates)",
            configure_image_list,
            run_image_list,
        ),
        Command(
            "image-update",
            "rebuild an image, optionally adding packages",
            configure_image_update,
            run_image_update,
        ),
        Command(
            "image-delete", "delete one of your images", configure_image_delete, run_image_delete
        ),
        Command("image-cancel", "cancel your running image build", no_options, run_image_cancel),
        Command(
            "project-init",
            "create a project: directories, git, README, image, container",
            configure_project_init,
            run_project_init,
            acts_for_user=False,  # it writes into the caller's own home
        ),
        Command(
            "user-setup",
            "first-time setup, step by step",
            no_options,
            run_user_setup,
            json=False,
            acts_for_user=False,
        ),
    )
}

DISPATCHERS = {"container": "container-", "image": "image-"}


def build_parser(command: Command, prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog or command.name, description=command.help)
    command.configure(parser)
    if command.json:
        parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    if command.acts_for_user:
        parser.add_argument("--user", metavar="USER", help="act for USER (admins only)")
    return parser


def run_command(
    command: Command, argv: list[str] | None, prog: str | None = None, **context: Any
) -> int:
    """Parse, run, and turn failures into a message and an exit code (0 / 1 / 2)."""
    parser = build_parser(command, prog)
    args = parser.parse_args(argv)  # exits 2 on usage errors, 0 for --help
    ctx = Context(args, **context)
    try:
        code = command.run(ctx)
    except Ds01hubError as e:
        print_error(e, ctx.stderr)
        code = exit_code(e)
    except KeyboardInterrupt:
        ctx.stderr.write("\ninterrupted\n")
        return 130
    show_cull_warnings(ctx)
    return code


def show_cull_warnings(ctx: Context) -> None:
    """After a command that talked to the control plane: the culler's pending warnings for
    this user (which container will be stopped as idle, and when), on stderr so --json output
    stays clean. Best effort: a broker that cannot say never fails the command."""
    if ctx._backend is None:
        return
    try:
        warnings = ctx.backend.cull_warnings()
    except (Ds01hubError, OSError, ValueError):
        return
    colour = use_colour(ctx.stderr)
    for warning in warnings or ():
        ctx.stderr.write(f"{paint('warning:', 'yellow', colour)} {warning['message']}\n")


def entry(name: str) -> Callable[[list[str] | None], int]:
    """The console-script function of one command."""
    command = COMMANDS[name]

    def main(argv: list[str] | None = None) -> int:
        siteenv.load_or_warn()  # live: a site's broker socket (/etc/ds01hub/ds01hub.env)
        return run_command(command, argv)

    main.__name__ = name.replace("-", "_")
    main.__doc__ = command.help
    return main


def dispatcher(group: str) -> Callable[[list[str] | None], int]:
    """`container create ...` = `container-create ...`."""
    prefix = DISPATCHERS[group]
    commands = {n[len(prefix) :]: c for n, c in COMMANDS.items() if n.startswith(prefix)}

    def main(argv: list[str] | None = None) -> int:
        siteenv.load_or_warn()
        argv = list(sys.argv[1:] if argv is None else argv)
        if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
            stream = sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr
            stream.write(f"usage: {group} COMMAND [ARGS]\n\ncommands:\n")
            for sub, c in commands.items():
                stream.write(f"  {sub:10} {c.help}\n")
            stream.write(f"\n`{group} COMMAND --help` for a command's options.\n")
            if argv and argv[0] not in ("-h", "--help"):
                stream.write(f"\nerror: unknown command {argv[0]!r}\n")
            return EXIT_OK if argv and argv[0] in ("-h", "--help") else EXIT_USAGE
        return run_command(commands[argv[0]], argv[1:], prog=f"{group} {argv[0]}")

    main.__name__ = f"{group}_main"
    return main


container_create = entry("container-create")
container_run = entry("container-run")
container_start = entry("container-start")
container_stop = entry("container-stop")
container_list = entry("container-list")
container_stats = entry("container-stats")
container_cleanup = entry("container-cleanup")
container_remove = entry("container-remove")
container_exit = entry("container-exit")
image_create = entry("image-create")
image_list = entry("image-list")
image_update = entry("image-update")
image_delete = entry("image-delete")
image_cancel = entry("image-cancel")
project_init = entry("project-init")
user_setup = entry("user-setup")
container = dispatcher("container")
image = dispatcher("image")
