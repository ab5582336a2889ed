"""Projects and onboarding: project-init (directories, git, README, image, container) and
user-setup (first-time setup, step by step)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ds01hub.actions.names import OperationError, validate_name
from ds01hub.cli.output import (
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    print_json,
)
from ds01hub.cli.user.context import Context, add_yes, follow
from ds01hub.cli.user.images import follow_build
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
    add_yes(parser)


def run_project_init(ctx: Context) -> int:
    from ds01hub.actions.projects import ProjectError, ProjectSpec, init_project

    args = ctx.args
    if args.guided:
        guided_project(ctx)
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
        report["image"] = _project_image(ctx, args.name.lower(), spec.use_case)
    if args.container:
        report["container"] = _project_container(ctx, args.name, report.get("image"))
    if ctx.json:
        print_json(report, ctx.stdout)
    return EXIT_OK


def _project_image(ctx: Context, name: str, use_case: str) -> dict[str, Any]:
    """Build the project's image, unless one of that name exists already (a re-run)."""
    from ds01hub.actions.projects import USE_CASES

    existing = next((i for i in ctx.backend.images() if i.get("name") == name), None)
    if existing is not None:
        ctx.say(
            f"Image {name} is already set up ({existing.get('tag')}); "
            f"rebuild it with: image-update {name}"
        )
        return existing
    template = use_case if use_case in USE_CASES else "custom"
    built = follow_build(ctx, {"name": name, "template": template}, ctx.args.yes)
    ctx.say(f"Built image {built.get('tag')}.")
    return built


def _project_container(ctx: Context, name: str, image: dict[str, Any] | None) -> dict[str, Any]:
    """Create the project's container, unless it exists already (a re-run)."""
    existing = next(
        (c for c in ctx.backend.list_containers(include_stopped=True) if c["project"] == name),
        None,
    )
    if existing is not None:
        verb = "container-run" if existing["state"] == "running" else "container-start"
        how = f"{verb} {name}"
        ctx.say(f"Container {name} is already set up ({existing['state']}): {how}")
        return existing
    options = {"image": image["tag"]} if image and image.get("tag") else {}
    final = follow(ctx, ctx.backend.start(name, options, create=True), name)
    ctx.say(f"Container {name} is running: container-run {name}")
    return running_view(final, name)


def guided_project(ctx: Context) -> None:
    """Ask for each choice not given, each answer checked as it is given."""
    from ds01hub.actions.projects import USE_CASES, validate_project_name, validate_use_case

    ctx.require_terminal("project-init --guided")
    args = ctx.args
    args.name = args.name or ctx.ask("Project name", check=validate_project_name)
    args.description = args.description or ctx.ask("One-line description (empty for none)")
    if args.use_case is None:
        ctx.note("Use cases: " + ", ".join(f"{k} ({v})" for k, v in USE_CASES.items()))
        args.use_case = ctx.ask("Use case", "general", check=validate_use_case)
    args.image = args.image or ctx.ask_yes_no("Build an image for it?", default=False)
    if not args.container and ctx.ask_yes_no("Create a container for it?", default=False):
        try:
            _check_container_name(args.name)
            args.container = True
        except CliError as e:
            ctx.note(f"  no container: {e.message}; {e.hint}")


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
