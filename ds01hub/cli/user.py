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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .. import siteenv
from ..operations import OperationError, validate_name
from . import backend as backends
from .output import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    STATE_COLOURS,
    CliError,
    Column,
    format_bytes,
    format_duration,
    format_percent,
    paint,
    print_error,
    print_json,
    render_table,
    use_colour,
)

# ---- the command context ------------------------------------------------------------------


@dataclass
class Context:
    """What a handler needs besides its arguments; tests pass their own streams and backend."""

    args: argparse.Namespace
    stdout: TextIO = field(default_factory=lambda: sys.stdout)
    stderr: TextIO = field(default_factory=lambda: sys.stderr)
    stdin: TextIO = field(default_factory=lambda: sys.stdin)
    make_backend: Callable[[str | None], Any] = backends.connect
    _backend: Any = None

    @property
    def backend(self) -> Any:
        if self._backend is None:
            self._backend = self.make_backend(getattr(self.args, "user", None))
        return self._backend

    @property
    def colour(self) -> bool:
        return use_colour(self.stdout)

    @property
    def json(self) -> bool:
        return bool(getattr(self.args, "json", False))

    def say(self, text: str = "") -> None:
        """Human output (suppressed under --json, where stdout is one JSON document)."""
        if not self.json:
            self.stdout.write(text + "\n")

    def note(self, text: str) -> None:
        """Progress and remarks: stderr, so stdout stays clean for pipes and --json."""
        self.stderr.write(text + "\n")
        self.stderr.flush()

    def interactive(self) -> bool:
        isatty = getattr(self.stdin, "isatty", None)
        return bool(isatty and isatty())

    def confirm(self, question: str, assume_yes: bool, flag: str = "-y") -> bool:
        """Ask a yes/no question; without a terminal refuse to guess (exit 2) unless -y."""
        if assume_yes:
            return True
        if not self.interactive():
            raise CliError(
                f"{question.rstrip('?')}: not asking without a terminal",
                hint=f"pass {flag} to confirm",
                code=EXIT_USAGE,
            )
        return self.ask(f"{question} [y/N] ").strip().lower() in ("y", "yes")

    def ask(self, prompt: str, default: str = "") -> str:
        shown = f"{prompt}" + (f"[{default}] " if default else "")
        self.stderr.write(shown)
        self.stderr.flush()
        line = self.stdin.readline()
        if not line:
            raise CliError("input ended before the question was answered", code=EXIT_USAGE)
        return line.strip() or default

    def require_terminal(self, what: str) -> None:
        if not self.interactive():
            raise CliError(
                f"{what} asks questions and needs a terminal",
                hint="run it in an interactive SSH session, or pass the options instead",
                code=EXIT_USAGE,
            )


@dataclass(frozen=True)
class Command:
    """One user command: its name, one-line help, how to parse it and what it does."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[Context], int]
    json: bool = True  # whether it prints data (and so takes --json)
    acts_for_user: bool = True  # whether admins may pass --user


# ---- shared argument helpers ----------------------------------------------------------------


def container_name(value: str) -> str:
    """argparse type: a container name, rejected with the rule and a suggestion (exit 2)."""
    try:
        return validate_name(value)
    except OperationError as e:
        raise argparse.ArgumentTypeError(f"{e.message}; {e.hint}") from None


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value!r}")
    return number


def seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {value!r}")
    return number


def add_name(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("name", metavar="NAME", type=container_name, help=help)


def add_yes(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")


def add_spawn_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", help="image to use (default: the lab's default image)")
    gpu = parser.add_mutually_exclusive_group()
    gpu.add_argument("--gpus", type=positive_int, metavar="N", help="number of whole GPUs")
    gpu.add_argument("--mig", metavar="PROFILE", help="a MIG slice, e.g. 1g.10gb")
    parser.add_argument("--profile", help="a named profile from the lab's configuration")


def spawn_options_from(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("image", "gpus", "mig", "profile")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


# ---- progress -------------------------------------------------------------------------------


def follow(ctx: Context, events: Iterable[dict[str, Any]], what: str) -> dict[str, Any]:
    """Show progress events on stderr; return the final event (ready / done), which must come:
    a stream that ends without one is a failure, never a success. Ctrl-C stops watching, not
    the work: the hub goes on, and the user is told so."""
    final: dict[str, Any] = {}
    colour = use_colour(ctx.stderr)
    try:
        for event in events:
            kind = event.get("event") or event.get("kind")
            if kind in ("ready", "done"):
                final = event
                continue
            message = event.get("message") or event.get("text") or ""
            progress = event.get("progress")
            if isinstance(progress, float) and progress <= 1.0 and kind in ("step", "log"):
                progress = progress * 100
            prefix = f"[{progress:3.0f}%] " if isinstance(progress, int | float) else ""
            if message and not ctx.json:
                ctx.note(paint(f"{what}: {prefix}{message}", "grey", colour))
    except KeyboardInterrupt:
        raise CliError(
            f"stopped watching; {what} goes on in the hub",
            hint="see it with container-list / image-list; stop it with container-stop NAME",
            code=130,
        ) from None
    if not final:
        raise CliError(
            f"{what}: the control plane stopped answering before it said how this ended",
            hint="see what happened with container-list --all / image-list",
        )
    return final


# ---- container views ------------------------------------------------------------------------


def gpus_cell(row: dict[str, Any]) -> str:
    gpus = ",".join(row.get("gpus") or [])
    if gpus and row.get("gpus_released"):
        return f"{gpus} (released)"
    return gpus or "-"


def time_cell(row: dict[str, Any]) -> str:
    if row.get("uptime_s") is not None:
        return f"up {format_duration(row['uptime_s'])}"
    if row.get("stopped_for_s") is not None:
        return f"stopped {format_duration(row['stopped_for_s'])}"
    return "-"


def held_cell(row: dict[str, Any]) -> str:
    value = row.get("held_until")
    return value.replace("T", " ")[:16] + " UTC" if value else "-"


CONTAINER_COLUMNS = (
    Column("PROJECT", "project"),
    Column("STATE", "state", STATE_COLOURS.get),
    Column("IMAGE", "image"),
    Column("GPUS", "gpus_text"),
    Column("UPTIME", "time_text"),
    Column("IDLE", "idle_text"),
    Column("HELD UNTIL", "held_text"),
)


def container_table(rows: list[dict[str, Any]], colour: bool) -> str:
    shown = [
        {
            **row,
            "gpus_text": gpus_cell(row),
            "time_text": time_cell(row),
            "idle_text": format_duration(row.get("idle_s")),
            "held_text": held_cell(row),
        }
        for row in rows
    ]
    return render_table(shown, CONTAINER_COLUMNS, colour)


def gpu_cell(gpu: dict[str, Any]) -> str:
    """`0 (SIMULATED): 12%, 3.0G / 80G`: the slot, its utilisation and memory in use now,
    against its size."""
    slot = f"{gpu['slot']} (SIMULATED)" if gpu.get("simulated") else str(gpu["slot"])
    used, size = gpu.get("memory_used_mb"), gpu.get("memory_mb")
    memory = format_bytes(None if used is None else used * 2**20)
    if size:
        memory += f" / {format_bytes(size * 2**20)}"
    return f"{slot}: {format_percent(gpu.get('utilization_percent'))}, {memory}"


def stats_table(rows: list[dict[str, Any]], colour: bool) -> str:
    def against(used: str, limit: str | None) -> str:
        return f"{used} / {limit}" if limit and limit != "-" else used

    shown = []
    for row in rows:
        gpus = row.get("gpus") or []
        shown.append(
            {
                "project": row["project"],
                "cpu": against(
                    format_percent(row.get("cpu_percent")),
                    format_percent(row.get("cpu_limit_percent")),
                ),
                "memory": against(
                    format_bytes(row.get("memory_bytes")),
                    format_bytes(row.get("memory_limit_bytes")),
                ),
                "pids": against(str(row.get("pids") or "-"), str(row.get("pids_limit") or "-")),
                "gpus": ", ".join(gpu_cell(g) for g in gpus) or "-",
            }
        )
    columns = (
        Column("PROJECT", "project"),
        Column("CPU", "cpu"),
        Column("MEMORY", "memory"),
        Column("PROCESSES", "pids"),
        Column("GPU: UTIL, MEMORY", "gpus"),
    )
    return render_table(shown, columns, colour)


# ---- container commands ---------------------------------------------------------------------


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
    """Ask for name, image and GPUs, offering what the user's quota allows."""
    ctx.require_terminal("container-create --guided")
    args = ctx.args
    quota = ctx.backend.quota()
    limits = quota.get("limits") or {}
    ctx.note(f"Creating a container for {quota.get('user')}.")
    while args.name is None:
        try:
            args.name = validate_name(ctx.ask("Container (project) name: "))
        except OperationError as e:
            ctx.note(f"  {e.message}; {e.hint}")
    images = [i["tag"] for i in ctx.backend.images()] + list(limits.get("allowed_images") or [])
    if images and args.image is None:
        ctx.note("Images you can use: " + ", ".join(images))
        args.image = ctx.ask("Image (empty for the default): ") or None
    max_gpus = limits.get("max_gpus_per_container")
    if args.gpus is None and args.mig is None and max_gpus:
        answer = ctx.ask(f"GPUs (0-{max_gpus}, or a MIG profile like 1g.10gb): ", "0")
        if answer.isdigit():
            args.gpus = int(answer) or None
        else:
            args.mig = answer


def running_view(final: dict[str, Any], name: str) -> dict[str, Any]:
    """The container view of a start's final event -- if it says the container runs; any other
    state is a start that did not start (exit 1 with that state)."""
    view = final.get("container") or {}
    if view.get("state") != "running":
        raise CliError(
            f"{name} did not start: it is {view.get('state') or 'unknown'}",
            hint=f"see container-list --all; try container-start {name} again",
        )
    return view


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
    from .terminal import relay_terminal, terminal_size

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
        f"{args.name}: up {format_duration(view.get('uptime_s'))}, "
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


def quota_line(quota: dict[str, Any]) -> str:
    """`Limits (group students): GPUs 1 of 1 held, containers 2 of 2, per container 4 CPUs and
    16G; idle timeout 12h, GPUs held 1h after a stop`; None limits read "no limit"."""
    limits = quota.get("limits")
    if not limits:
        return f"Containers: {quota.get('containers', 0)} (no limits file on this host)"

    def cap(value: Any) -> str:
        return "no limit" if value is None else str(value)

    max_cpus = limits.get("max_cpus")
    cpus = "any CPUs" if max_cpus is None else f"{max_cpus:g} CPU{'' if max_cpus == 1 else 's'}"
    memory = "any memory" if limits.get("memory") is None else format_bytes(limits["memory"])
    idle = limits.get("idle_timeout")
    return (
        f"Limits (group {limits.get('group') or '-'}): "
        f"GPUs {quota.get('gpus_held', 0)} of {cap(limits.get('max_gpus'))} held, "
        f"containers {quota.get('containers', 0)} of {cap(limits.get('max_containers_per_user'))}, "
        f"per container {cpus} and {memory}; "
        f"idle timeout {'never' if idle is None else format_duration(idle)}, "
        f"GPUs held {format_duration(limits.get('gpu_hold_after_stop'))} after a stop"
    )


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


# ---- image commands -------------------------------------------------------------------------


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
    """`--pip a,b --pip c` -> ["a", "b", "c"]; the broker validates each (ds01hub.images)."""
    return [p.strip() for value in values for p in value.split(",") if p.strip()]


def guided_image(ctx: Context) -> None:
    ctx.require_terminal("image-create --guided")
    args = ctx.args
    templates = ctx.backend.image_templates()
    ctx.note("Templates:")
    for t in templates:
        ctx.note(f"  {t['key']:8} {t['title']}: {t.get('description', '')}")
    if args.template is None:
        args.template = ctx.ask("Template: ", "general")
    if not args.name:
        args.name = ctx.ask("Image name: ", args.template)
    extra = ctx.ask("Extra pip packages (comma-separated, empty for none): ")
    if extra:
        args.pip.append(extra)
    extra = ctx.ask("Extra Debian packages (comma-separated, empty for none): ")
    if extra:
        args.apt.append(extra)


def build(ctx: Context, request: dict[str, Any]) -> int:
    final = follow(ctx, ctx.backend.build_image(request), f"image {request['name']}")
    if ctx.json:
        print_json(final, ctx.stdout)
    else:
        ctx.say(f"Built {final.get('tag', request['name'])}.")
        ctx.say(f"  use it: container-create NAME --image {final.get('tag', request['name'])}")
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
            row["size_text"] = format_bytes(row.get("size"))
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


# ---- projects and onboarding ----------------------------------------------------------------


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
    from ..projects import USE_CASES, ProjectError, ProjectSpec, init_project

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

    from ..labels import escape_name

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
    quota = ctx.backend.quota()
    limits = quota.get("limits") or {}
    ctx.note(
        f"Welcome, {me['user']}! Your group: {limits.get('group') or '-'}; "
        f"GPUs: up to {limits.get('max_gpus', '-')}, "
        f"containers: up to {limits.get('max_containers_per_user') or 'no limit'}."
    )
    if ctx.ask("Set up a project now? [Y/n] ", "y").lower().startswith("y"):
        project_args = build_parser(COMMANDS["project-init"]).parse_args(["--guided"])
        run_project_init(dataclasses.replace(ctx, args=project_args))
    ctx.stdout.write(CONNECT_HELP.format(user=me["user"], host=os.uname().nodename))
    return EXIT_OK


def no_options(parser: argparse.ArgumentParser) -> None:
    """Commands without arguments of their own."""


# ---- the table of commands ------------------------------------------------------------------

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
    except CliError as e:
        print_error(e, ctx.stderr)
        code = e.code
    except OperationError as e:
        code = EXIT_USAGE if e.status == 400 else EXIT_FAILURE
        print_error(CliError(e.message, e.hint, code), ctx.stderr)
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
    except (CliError, OSError, ValueError):
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
project_init = entry("project-init")
user_setup = entry("user-setup")
container = dispatcher("container")
image = dispatcher("image")
