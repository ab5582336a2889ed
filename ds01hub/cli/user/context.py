"""What every user command shares: its context (streams, the control plane, questions), the
table entry `Command`, argument helpers, and following a stream of progress events."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

from ds01hub.actions.operations import OperationError, validate_name
from ds01hub.cli.output import (
    EXIT_USAGE,
    CliError,
    paint,
    use_colour,
)
from ds01hub.cli.user import backends
from ds01hub.gpu.messages import Message
from ds01hub.spawn_options import SPAWN_OPTION_KEYS


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
    """The spawn options (ds01hub.spawn_options) given on the command line."""
    return {k: getattr(args, k) for k in SPAWN_OPTION_KEYS if getattr(args, k, None) is not None}


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
            said = Message.from_event(event)  # a wait: its headline and a countdown
            if said is not None:
                countdown = said.countdown(datetime.now(UTC))
                message = f"{said.headline} ({countdown})" if countdown else said.headline
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


def no_options(parser: argparse.ArgumentParser) -> None:
    """Commands without arguments of their own."""
