"""Projects and onboarding: project-init (directories, git, README, image, container) and
user-setup (first-time setup, step by step)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ds01hub.actions.operations import OperationError, validate_name
from ds01hub.cli.output import (
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    print_json,
)
from ds01hub.cli.user.context import Context, follow
from ds01hub.cli.user.views import running_view


def configure_project_init(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", nargs="?", help="project (directory) name")
    parser.add_argument(
        "--dir",
        default=None,
        help="parent directory (default: your workspace, which is /workspace in your "
        "containers; your home where there is none)",
    )
    parser.add_argument(
        "--use-case", default=None, help="general, cv, nlp, rl or custom (default: general)"
    )
    parser.add_argument("--description", default="", help="one line for the README")
    parser.add_argument("--no-git", action="store_true", help="do not run git init")
    parser.add_argument(
        "--image", action="store_true", help="also build an image NAME from the use case's template"
    )
    parser.add_argument(
        "--container", action="store_true", help="also create a container NAME for the project"
    )
    parser.add_argument("--guided", action="store_true", help="ask for each choice")


def run_project_init(ctx: Context) -> int:
    from ds01hub.actions.projects import USE_CASES, ProjectError, ProjectSpec, init_project

    args = ctx.args
    if args.guided:
        ctx.require_terminal("project-init --guided")
        args.name = args.name or ctx.ask("Project name: ")
        args.description = args.description or ctx.ask("One-line description: ")
        ctx.note("Use cases: " + ", ".join(f"{k} ({v})" for k, v in USE_CASES.items()))
        args.use_case = args.use_case or ctx.ask("Use case: ", "general")
        args.image = args.image or ctx.ask("Build an image for it? [y/N] ").lower() == "y"
        args.container = (
            args.container or ctx.ask("Create a container for it? [y/N] ").lower() == "y"
        )
    if not args.name:
        raise CliError("project-init needs a NAME", hint="or use --guided", code=EXIT_USAGE)
    if args.container:
        _check_container_name(args.name)
    spec = ProjectSpec(
        name=args.name,
        description=args.description,
        use_case=args.use_case or "general",
        git=not args.no_git,
    )
    try:
        result = init_project(spec, Path(args.dir).expanduser() if args.dir else my_workspace())
    except ProjectError as e:
        raise CliError(str(e), code=EXIT_USAGE) from None
    report: dict[str, Any] = {"project": result.to_dict()}
    if not ctx.json:
        ctx.say(result.summary())
    if args.image:
        template = spec.use_case if spec.use_case in USE_CASES else "custom"
        request = {"name": args.name.lower(), "template": template}
        report["image"] = follow(ctx, ctx.backend.build_image(request), f"image {args.name}")
        ctx.say(f"Built image {report['image'].get('tag')}.")
    if args.container:
        options = {"image": report["image"]["tag"]} if report.get("image") else {}
        final = follow(ctx, ctx.backend.start(args.name, options, create=True), args.name)
        report["container"] = running_view(final, args.name)
        ctx.say(f"Container {args.name} is running: container-run {args.name}")
    if ctx.json:
        print_json(report, ctx.stdout)
    return EXIT_OK


def my_workspace() -> Path:
    """Where the caller's projects go by default: their workspace (the same files as
    /workspace in their containers): `$DS01HUB_WORKSPACE_ROOT/<user>` when it is theirs, else
    `~/workspace` when it is a directory, else the home directory."""
    import pwd

    from ds01hub.labels import escape_name

    root = os.environ.get("DS01HUB_WORKSPACE_ROOT")
    if root:
        workspace = Path(root) / escape_name(pwd.getpwuid(os.getuid()).pw_name)
        if workspace.is_dir() and workspace.stat().st_uid == os.getuid():
            return workspace
    linked = Path.home() / "workspace"
    return linked if linked.is_dir() else Path.home()


def _check_container_name(name: str) -> None:
    try:
        validate_name(name)
    except OperationError as e:
        raise CliError(
            f"{e.message} (the container gets the project's name)", e.hint, EXIT_USAGE
        ) from None
