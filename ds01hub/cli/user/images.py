"""The image commands: image-create, -list, -update, -delete (builds through the control plane)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from typing import Any

from ds01hub.cli.output import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    Column,
    print_json,
    render_table,
)
from ds01hub.cli.user.context import Context, add_yes, follow
from ds01hub.units import human_size


def configure_image_create(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", nargs="?", help="image name, e.g. my-cv")
    parser.add_argument(
        "--template",
        default=None,
        help="use-case template: general, cv, nlp, rl, custom (see image-list --templates)",
    )
    parser.add_argument(
        "--pip",
        action="append",
        default=[],
        metavar="PKG",
        help="extra pip requirement (repeatable, or comma-separated)",
    )
    parser.add_argument(
        "--apt",
        action="append",
        default=[],
        metavar="PKG",
        help="extra Debian package (repeatable, or comma-separated)",
    )
    parser.add_argument("--guided", action="store_true", help="ask for each choice")
    add_yes(parser)


def run_image_create(ctx: Context) -> int:
    args = ctx.args
    if args.guided:
        guided_image(ctx)
    elif not args.name:
        raise CliError("image-create needs a NAME", hint="or use --guided", code=EXIT_USAGE)
    request = {
        "name": args.name,
        "template": args.template or "general",
        "pip_packages": split_packages(args.pip),
        "apt_packages": split_packages(args.apt),
    }
    return build(ctx, request)


def split_packages(values: Iterable[str]) -> list[str]:
    """`--pip a,b --pip c` -> ["a", "b", "c"]; the broker validates each
    (ds01hub.actions.images)."""
    return [p.strip() for value in values for p in value.split(",") if p.strip()]


def guided_image(ctx: Context) -> None:
    """Ask for the template, the name and extra packages, each checked as it is given."""
    from ds01hub.actions.images import (
        get_template,
        validate_apt_package,
        validate_image_name,
        validate_pip_requirement,
    )

    ctx.require_terminal("image-create --guided")
    args = ctx.args
    templates = ctx.backend.image_templates()
    ctx.note("Templates:")
    for t in templates:
        ctx.note(f"  {t['key']:8} {t['title']}: {t.get('description', '')}")
    if args.template is None:
        args.template = ctx.ask("Template", "general", check=lambda a: get_template(a).key)
    if not args.name:
        args.name = ctx.ask("Image name", args.template, check=validate_image_name)
    extra = ctx.ask(
        "Extra pip packages (comma-separated, empty for none)",
        check=lambda a: packages(a, validate_pip_requirement),
    )
    args.pip.extend(extra)
    extra = ctx.ask(
        "Extra Debian packages (comma-separated, empty for none)",
        check=lambda a: packages(a, validate_apt_package),
    )
    args.apt.extend(extra)


def packages(answer: str, validate: Callable[[str], str]) -> list[str]:
    """Each package of a comma-separated answer, checked."""
    return [validate(p) for p in split_packages([answer])]


def build(ctx: Context, request: dict[str, Any]) -> int:
    final = follow_build(ctx, request, getattr(ctx.args, "yes", False))
    if ctx.json:
        print_json(final, ctx.stdout)
    else:
        ctx.say(f"Built {final.get('tag', request['name'])}.")
        ctx.say(f"  use it: container-create NAME --image {final.get('tag', request['name'])}")
    return EXIT_OK


def confirm_download(ctx: Context, request: dict[str, Any], assume_yes: bool) -> None:
    """Before a heavy build (PyTorch with CUDA, ...): say how much it downloads and ask."""
    from ds01hub.actions.images import HEAVY_BUILD_MB, download_estimate_mb, get_template

    try:
        packages = list(get_template(request.get("template") or "custom").pip_packages)
    except ValueError:
        return  # the control plane names the unknown template
    size, heavy = download_estimate_mb(packages + list(request.get("pip_packages") or ()))
    if size < HEAVY_BUILD_MB:
        return
    ctx.note(
        f"Image {request['name']} downloads about {size / 1000:.1f} GB "
        f"({', '.join(heavy)} with its libraries) and takes several minutes to build."
    )
    if not ctx.confirm("Build it?", assume_yes):
        raise CliError("not built", code=EXIT_FAILURE)


def follow_build(ctx: Context, request: dict[str, Any], assume_yes: bool = False) -> dict[str, Any]:
    """Start a build and show it to its end: heavy downloads are confirmed first, Ctrl-C
    offers to cancel it."""
    if not ctx.backend.remote:  # away from the host no build starts: nothing to confirm
        confirm_download(ctx, request, assume_yes)
    name = request["name"]
    return follow(
        ctx,
        ctx.backend.build_image(request),
        f"image {name}",
        interrupted=lambda: offer_cancel(ctx, name),
    )


def offer_cancel(ctx: Context, name: str) -> None:
    """After Ctrl-C in a build: cancel it (asked on a terminal) or say that it goes on and
    how to cancel it later. Always raises (exit 130)."""
    ctx.stderr.write("\n")
    if ctx.interactive() and ctx.ask_yes_no(f"Cancel the build of {name}?", default=True):
        cancel(ctx)
        raise CliError(f"the build of {name} is cancelled", code=130)
    raise CliError(
        f"stopped watching; the build of {name} goes on",
        hint="see it with image-list; stop it with image-cancel",
        code=130,
    )


def cancel(ctx: Context) -> dict[str, Any]:
    """Cancel the user's running build; say whether it has stopped yet."""
    result = ctx.backend.cancel_build()
    if not result.get("stopped"):
        ctx.note(
            f"The build of {result.get('image')} was asked to stop; it stops at its next step."
        )
    return result


def run_image_cancel(ctx: Context) -> int:
    result = cancel(ctx)
    if ctx.json:
        print_json(result, ctx.stdout)
    elif result.get("stopped"):
        ctx.say(f"The build of {result.get('image')} is cancelled.")
    return EXIT_OK


def configure_image_list(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--templates", action="store_true", help="list the use-case templates instead"
    )


def run_image_list(ctx: Context) -> int:
    if ctx.args.templates:
        rows = ctx.backend.image_templates()
        columns = (
            Column("TEMPLATE", "key"),
            Column("TITLE", "title"),
            Column("PIP PACKAGES", "pip_packages"),
        )
    else:
        rows = ctx.backend.images()
        for row in rows:
            row["size_text"] = human_size(row.get("size"))
            row["extra"] = " ".join(row.get("pip_packages", []) + row.get("apt_packages", []))
        columns = (
            Column("NAME", "name"),
            Column("TAG", "tag"),
            Column("TEMPLATE", "template"),
            Column("SIZE", "size_text"),
            Column("BUILT", "built_at"),
            Column("PACKAGES", "extra"),
        )
    if ctx.json:
        print_json(rows, ctx.stdout)
    elif not rows:
        ctx.say("No images yet. Build one with: image-create NAME --template general")
    else:
        ctx.say(render_table(rows, columns, ctx.colour))
    return EXIT_OK


def configure_image_update(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="the image to rebuild")
    parser.add_argument(
        "--pip",
        action="append",
        default=[],
        metavar="PKG",
        help="add a pip requirement (repeatable)",
    )
    parser.add_argument(
        "--apt",
        action="append",
        default=[],
        metavar="PKG",
        help="add a Debian package (repeatable)",
    )
    add_yes(parser)


def run_image_update(ctx: Context) -> int:
    """Rebuild an image with its template and packages (plus any new ones): fresh versions."""
    args = ctx.args
    mine = {i["name"]: i for i in ctx.backend.images()}
    if args.name not in mine:
        raise CliError(
            f"you have no image called {args.name!r}",
            hint="see your images with image-list; create one with image-create",
        )
    current = mine[args.name]
    request = {
        "name": args.name,
        "template": current.get("template") or "custom",
        "pip_packages": list(current.get("pip_packages", [])) + split_packages(args.pip),
        "apt_packages": list(current.get("apt_packages", [])) + split_packages(args.apt),
    }
    return build(ctx, request)


def configure_image_delete(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="the image to delete")
    add_yes(parser)


def run_image_delete(ctx: Context) -> int:
    if not ctx.confirm(f"Delete image {ctx.args.name}?", ctx.args.yes):
        ctx.note("Not deleted.")
        return EXIT_FAILURE
    result = ctx.backend.delete_image(ctx.args.name)
    if ctx.json:
        print_json(result, ctx.stdout)
    else:
        ctx.say(f"Deleted {result.get('tag', ctx.args.name)}.")
    return EXIT_OK
