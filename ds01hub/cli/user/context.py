"""What every user command shares: its context (streams, the control plane, questions), the
table entry `Command`, argument helpers, and following a stream of progress events."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO, TypeVar

from ds01hub.actions.names import OperationError, validate_name
from ds01hub.cli.output import (
    EXIT_USAGE,
    CliError,
    use_colour,
)
from ds01hub.cli.progress import ProgressLine, event_fraction
from ds01hub.cli.user import backends
from ds01hub.errors import Ds01hubError
from ds01hub.gpu.messages import Message
from ds01hub.spawn_options import SPAWN_OPTION_KEYS
from ds01hub.units import utcnow

T = TypeVar("T")

#: Answers tried per question before a guided command gives up (a script feeding a terminal
#: must not loop forever).
MAX_ATTEMPTS = 5


def yes_or_no(answer: str) -> bool:
    """`y`/`yes` -> True, `n`/`no` -> False (any case); anything else is asked again."""
    word = answer.strip().lower()
    if word in ("y", "yes"):
        return True
    if word in ("n", "no"):
        return False
    raise ValueError(f"answer y or n, not {answer[:40]!r}")


def answer_problem(error: Exception) -> str:
    """What was wrong with an answer, with the fix when the error names one."""
    if isinstance(error, Ds01hubError):
        return f"{error.message}; {error.hint}" if error.hint else error.message
    return str(error)


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
        return self.ask_yes_no(question, default=False)

    def ask(self, question: str, default: str = "", check: Callable[[str], T] = str) -> T:
        """Ask `question` until `check` accepts the answer (empty = `default`, shown once as
        `[default]`). `check` returns the value or raises ValueError, OperationError or
        CliError, whose message is shown before the question is asked again: one mistyped
        answer never ends a guided command."""
        shown = f"{question} [{default}]: " if default else f"{question}: "
        return self._ask_until(shown, default, check)

    def ask_yes_no(self, question: str, default: bool) -> bool:
        """A yes/no question with its one default shown as `[Y/n]` or `[y/N]`."""
        shown = f"{question} [{'Y/n' if default else 'y/N'}] "
        return self._ask_until(shown, "yes" if default else "no", yes_or_no)

    def _ask_until(self, shown: str, default: str, check: Callable[[str], T]) -> T:
        for _ in range(MAX_ATTEMPTS):
            self.stderr.write(shown)
            self.stderr.flush()
            line = self.stdin.readline()
            if not line:
                raise CliError("input ended before the question was answered", code=EXIT_USAGE)
            try:
                return check(line.strip() or default)
            except (ValueError, OperationError, CliError) as error:
                self.note(f"  {answer_problem(error)}")
        raise CliError(
            f"no usable answer after {MAX_ATTEMPTS} tries",
            hint="run the command again, or pass the options instead of --guided",
            code=EXIT_USAGE,
        )

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
    parser.add_argument(
        "--queue",
        action="store_true",
        default=None,
        help="if no GPU is free, leave the request queued (no time limit, also across hub "
        "restarts): the container starts by itself when a GPU is granted",
    )


def spawn_options_from(args: argparse.Namespace) -> dict[str, Any]:
    """The spawn options (ds01hub.spawn_options) given on the command line."""
    return {k: getattr(args, k) for k in SPAWN_OPTION_KEYS if getattr(args, k, None) is not None}


def follow(
    ctx: Context,
    events: Iterable[dict[str, Any]],
    what: str,
    interrupted: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Show progress events on stderr; return the final event (ready / done), which must come:
    a stream that ends without one is a failure, never a success. Ctrl-C stops watching, not
    the work: the hub goes on, and the user is told so; `interrupted` (which raises) says
    what else can be done instead (an image build offers to cancel it)."""
    final: dict[str, Any] = {}
    line = ProgressLine(ctx.stderr, what, use_colour(ctx.stderr))
    try:
        for event in events:
            kind = event.get("event") or event.get("kind")
            if kind in ("ready", "done"):
                final = event
                continue
            message = str(event.get("message") or event.get("text") or "")
            said = Message.from_event(event)  # a wait: its headline and a countdown
            if said is not None:
                countdown = said.countdown(utcnow())
                message = f"{said.headline} ({countdown})" if countdown else said.headline
            if not ctx.json:
                line.update(event_fraction(event.get("progress"), kind), message)
    except KeyboardInterrupt:
        line.close()
        if interrupted is not None:
            interrupted()
        raise CliError(
            f"stopped watching; {what} goes on in the hub",
            hint="see it with container-list / image-list; stop it with container-stop NAME",
            code=130,
        ) from None
    finally:
        line.close()
    if not final:
        raise CliError(
            f"{what}: the control plane stopped answering before it said how this ended",
            hint="see what happened with container-list --all / image-list",
        )
    return final


def no_options(parser: argparse.ArgumentParser) -> None:
    """Commands without arguments of their own."""
