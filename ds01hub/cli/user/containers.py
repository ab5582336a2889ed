"""The container commands: container-create, -run, -start, -stop, -list, -stats, -cleanup,
-remove, -exit."""

from __future__ import annotations

import argparse
import os
from typing import Any

from ds01hub.actions.names import validate_name
from ds01hub.cli.output import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    paint,
    print_error,
    print_json,
)
from ds01hub.cli.user import backends
from ds01hub.cli.user.context import (
    Context,
    add_name,
    add_spawn_options,
    add_yes,
    container_name,
    follow,
    seconds,
    spawn_options_from,
)
from ds01hub.cli.user.views import container_table, quota_line, running_view, stats_table
from ds01hub.mig import is_profile
from ds01hub.units import human_duration


def configure_create(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "name",
        metavar="NAME",
        nargs="?",
        type=container_name,
        help="container (project) name: lowercase letters, digits, '-', '_'",
    )
    add_spawn_options(parser)
    parser.add_argument("--guided", action="store_true", help="ask for each choice")


def run_create(ctx: Context) -> int:
    args = ctx.args
    if args.guided:
        guided_create(ctx)
    elif args.name is None:
        raise CliError("container-create needs a NAME", hint="or use --guided", code=EXIT_USAGE)
    options = spawn_options_from(args)
    final = follow(ctx, ctx.backend.start(args.name, options, create=True), args.name)
    return report_started(ctx, final, args.name, created=True)


def guided_create(ctx: Context) -> None:
    """Ask for name, image and GPUs, offering what the user's quota and this machine allow;
    each answer is checked as it is given and asked again when wrong."""
    ctx.require_terminal("container-create --guided")
    args = ctx.args
    quota = ctx.backend.quota()
    limits = quota.get("limits") or {}
    ctx.note(f"Creating a container for {quota.get('user')}.")
    if args.name is None:
        taken = {c["project"]: c["state"] for c in ctx.backend.list_containers(True)}
        args.name = ctx.ask("Container (project) name", check=lambda a: new_name(a, taken))
    images = [i["tag"] for i in ctx.backend.images()] + list(limits.get("allowed_images") or [])
    if images and args.image is None:
        ctx.note("Images you can use: " + ", ".join(images))
        args.image = ctx.ask("Image (empty for the default)", check=lambda a: one_of(a, images))
    max_gpus = limits.get("max_gpus_per_container")
    if args.gpus is None and args.mig is None and max_gpus:
        profiles = quota.get("mig_profiles")
        offer = f", or a MIG slice: {', '.join(profiles)}" if profiles else ""
        kind, value = ctx.ask(
            f"GPUs (0-{max_gpus}{offer})",
            "0",
            check=lambda a: gpu_answer(a, int(max_gpus), profiles),
        )
        if kind == "mig":
            args.mig = value
        else:
            args.gpus = value or None


def new_name(answer: str, taken: dict[str, str]) -> str:
    """A valid container name the user does not have yet."""
    name = validate_name(answer)
    if name in taken:
        how = "container-run" if taken[name] == "running" else "container-start"
        raise ValueError(
            f"you already have a container {name!r} ({taken[name]}): pick another name, "
            f"or use it with {how} {name}"
        )
    return name


def one_of(answer: str, choices: list[str]) -> str | None:
    """One of `choices`, or None (the default) for an empty answer."""
    if not answer:
        return None
    if answer not in choices:
        raise ValueError(f"{answer!r} is not one of your images: {', '.join(choices)}")
    return answer


def gpu_answer(answer: str, max_gpus: int, profiles: list[str] | None) -> tuple[str, Any]:
    """`("gpus", N)` for a number up to `max_gpus`, `("mig", PROFILE)` for a MIG slice this
    machine has (`profiles`; None when the control plane did not say: any well-formed name,
    which the allocator then checks)."""
    if answer.isdigit():
        if int(answer) > max_gpus:
            raise ValueError(f"at most {max_gpus} GPU(s) per container, not {answer}")
        return "gpus", int(answer)
    if profiles is None and is_profile(answer):
        return "mig", answer
    if profiles and answer in profiles:
        return "mig", answer
    slices = (
        f"or one of the MIG slices here: {', '.join(profiles)}"
        if profiles
        else ("(this machine has no MIG slices)")
    )
    raise ValueError(f"{answer[:40]!r} is neither a number from 0 to {max_gpus} {slices}")


def report_started(ctx: Context, final: dict[str, Any], name: str, created: bool) -> int:
    """Say that `name` runs -- only if it does."""
    view = running_view(final, name)
    if ctx.json:
        print_json(view, ctx.stdout)
        return EXIT_OK
    verb = "created and started" if created else "running"
    ctx.say(f"{paint(name, 'bold', ctx.colour)} {verb}.")
    if view.get("gpus"):
        ctx.say(f"  GPUs: {', '.join(view['gpus'])}")
    ctx.say(f"  open a shell:  container-run {name}")
    ctx.say(f"  stop it:       container-stop {name}")
    return EXIT_OK


def configure_start(parser: argparse.ArgumentParser) -> None:
    add_name(parser, "the container to start")


def run_start(ctx: Context) -> int:
    name = ctx.args.name
    final = follow(ctx, ctx.backend.start(name, None, create=False), name)
    return report_started(ctx, final, name, created=False)


def configure_run(parser: argparse.ArgumentParser) -> None:
    add_name(parser, "the container to open a shell in (started if needed)")
    parser.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND",
        help="run this instead of a login shell",
    )


def run_run(ctx: Context) -> int:
    name = ctx.args.name
    command = [c for c in ctx.args.command if c != "--"] or None
    backend = ctx.backend
    if backend.remote:
        raise backends.host_only("a shell in a container")
    view = backend.describe(name)
    if view.get("state") != "running":
        follow(ctx, backend.start(name, None, create=False), name)
    from ds01hub.cli.terminal import relay_terminal, terminal_size

    # a terminal on both ends: a TTY exec (raw keys, resizes); else plain streams for scripts
    interactive = ctx.interactive() and ctx.stdout.isatty()
    rows, cols = terminal_size(ctx.stdin.fileno()) if interactive else (24, 80)
    request = {
        "command": command,
        "tty": interactive,
        "env": {k: os.environ[k] for k in ("TERM", "LANG", "COLORTERM") if k in os.environ},
        "rows": rows,
        "cols": cols,
    }
    sock, exec_id, initial = backend.open_exec(name, request)
    ctx.stdout.flush()
    relay_terminal(
        sock,
        initial,
        interactive,
        stdin_fd=ctx.stdin.fileno(),
        stdout_fd=ctx.stdout.fileno(),
        stderr_fd=ctx.stderr.fileno(),
    )
    code = exit_code_of(backend, exec_id)
    if interactive:
        ctx.note(f"\nLeft the shell; {name} is still running. Stop it with: container-stop {name}")
    return code


def exit_code_of(backend: Any, exec_id: str) -> int:
    """The command's exit status (Docker records it a moment after the stream ends)."""
    import time

    for _ in range(20):
        status = backend.exec_status(exec_id)
        if not status.get("running") and status.get("exit_code") is not None:
            return int(status["exit_code"])
        time.sleep(0.1)
    return EXIT_FAILURE


def configure_stop(parser: argparse.ArgumentParser) -> None:
    add_name(parser, "the container to stop")
    add_yes(parser)
    parser.add_argument("--force", action="store_true", help="kill it at once (no clean stop)")
    parser.add_argument(
        "--timeout", type=seconds, metavar="S", help="seconds to wait before killing"
    )


def run_stop(ctx: Context) -> int:
    args = ctx.args
    view = ctx.backend.describe(args.name)
    if view.get("state") == "stopped":
        ctx.say(f"{args.name} is already stopped.")
        if ctx.json:
            print_json(view, ctx.stdout)
        return EXIT_OK
    if view.get("state") == "starting" and not view.get("id"):
        if not ctx.confirm(f"Cancel the start of {args.name}?", args.yes):
            ctx.note("Not cancelled.")
            return EXIT_FAILURE
        result = ctx.backend.stop(args.name, args.timeout, args.force)
        if ctx.json:
            print_json(result, ctx.stdout)
        else:
            ctx.say(f"The start of {args.name} is cancelled.")
        return EXIT_OK
    processes = view.get("processes")
    ctx.note(
        f"{args.name}: up {human_duration(view.get('uptime_s'))}, "
        f"{processes if processes is not None else 'unknown number of'} processes"
        + (f", GPUs {', '.join(view['gpus'])}" if view.get("gpus") else "")
    )
    if not ctx.confirm(f"Stop {args.name}?", args.yes):
        ctx.note("Not stopped.")
        return EXIT_FAILURE
    return report_stopped(ctx, args.name, ctx.backend.stop(args.name, args.timeout, args.force))


def report_stopped(ctx: Context, name: str, result: dict[str, Any]) -> int:
    """Say what the stop left: stopped (GPUs held or not), removed with it, or still stopping;
    anything else is a failure (exit 1)."""
    state = result.get("state")
    if state not in ("stopped", "stopping"):
        raise CliError(
            f"{name} did not stop: it is {state or 'unknown'}",
            hint=f"kill it with container-stop {name} --force",
        )
    if ctx.json:
        print_json(result, ctx.stdout)
    elif result.get("removed"):
        ctx.say(
            f"{name} stopped and removed (this hub removes containers when they stop); "
            "its GPUs are free."
        )
    elif state == "stopping":
        ctx.say(f"{name} is stopping (the hub is still shutting it down).")
    else:
        held = result.get("held_until")
        ctx.say(f"{name} stopped." + (f" Its GPUs stay reserved until {held}." if held else ""))
        ctx.say(f"  start again: container-start {name}; remove: container-remove {name}")
    return EXIT_OK


def configure_list(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-a", "--all", action="store_true", help="include stopped containers")


def run_list(ctx: Context) -> int:
    rows = ctx.backend.list_containers(include_stopped=ctx.args.all)
    if ctx.json:
        print_json(rows, ctx.stdout)
        return EXIT_OK
    if not rows:
        hint = "" if ctx.args.all else " running (see stopped ones with --all)"
        ctx.say(f"No containers{hint}. Create one with: container-create NAME")
        return EXIT_OK
    ctx.say(container_table(rows, ctx.colour))
    return EXIT_OK


def run_stats(ctx: Context) -> int:
    rows = ctx.backend.stats()
    quota = ctx.backend.quota()
    if ctx.json:
        print_json({"containers": rows, "quota": quota}, ctx.stdout)
        return EXIT_OK
    ctx.say(quota_line(quota))
    ctx.say(stats_table(rows, ctx.colour) if rows else "No running containers.")
    return EXIT_OK


def configure_cleanup(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--all", action="store_true", help="also stop and remove running containers"
    )
    add_yes(parser)


def run_cleanup(ctx: Context) -> int:
    args = ctx.args
    rows = ctx.backend.list_containers(include_stopped=True)
    doomed = [r for r in rows if r.get("id") and (args.all or r["state"] == "stopped")]
    if not doomed:
        ctx.say("Nothing to clean up.")
        if ctx.json:
            print_json([], ctx.stdout)
        return EXIT_OK
    ctx.note("Will remove: " + ", ".join(f"{r['project']} ({r['state']})" for r in doomed))
    if not ctx.confirm(f"Remove {len(doomed)} container(s)?", args.yes):
        ctx.note("Nothing removed.")
        return EXIT_FAILURE
    results = ctx.backend.cleanup(include_running=args.all)
    failed = [r for r in results if not r.get("removed")]
    if ctx.json:
        print_json(results, ctx.stdout)
    else:
        removed = len(results) - len(failed)
        ctx.say(f"Removed {removed} container(s); their GPUs are free again.")
        for row in results:
            if row.get("already_gone"):
                ctx.say(f"  {row['project']}: already gone (removed before cleanup came to it)")
    for row in failed:
        error = CliError(f"{row['project']} not removed: {row.get('error')}", row.get("hint"))
        print_error(error, ctx.stderr)
    return EXIT_FAILURE if failed else EXIT_OK


def configure_remove(parser: argparse.ArgumentParser) -> None:
    add_name(parser, "the container to remove")
    add_yes(parser)
    parser.add_argument("--force", action="store_true", help="stop it first if it is running")


def run_remove(ctx: Context) -> int:
    args = ctx.args
    if not ctx.confirm(f"Remove {args.name} (files outside your home are lost)?", args.yes):
        ctx.note("Not removed.")
        return EXIT_FAILURE
    result = ctx.backend.remove(args.name, args.force)
    if ctx.json:
        print_json(result, ctx.stdout)
    elif result.get("already_gone"):
        ctx.say(f"{args.name} is gone: its container had already been removed (by the hub).")
    else:
        ctx.say(f"{args.name} removed.")
    return EXIT_OK


EXIT_EXPLANATION = """\
Leaving a container vs stopping it:

  exit (or Ctrl-D)           leaves the shell. The container keeps running: your notebooks,
                             training jobs and its GPUs stay as they are. Come back with
                             `container-run NAME`.
  container-stop NAME        stops the container: everything in it ends. Its GPUs stay
                             reserved for you for a while (see HELD UNTIL in
                             `container-list --all`), then go back to the pool.
  container-remove NAME      deletes a stopped container (your home directory stays).

Idle containers are stopped automatically after the lab's idle timeout.
"""


def run_exit(ctx: Context) -> int:
    inside = os.environ.get("JUPYTERHUB_USER") and os.path.exists("/.dockerenv")
    ctx.stdout.write(EXIT_EXPLANATION)
    if inside:
        ctx.stdout.write("\nYou are inside a container now: type `exit` to leave this shell.\n")
    return EXIT_OK
