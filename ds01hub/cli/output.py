"""Output for the users' commands: tables, JSON, durations, colour (only on a TTY), exit codes.

Every command prints through here so that `--json`, colour and error wording stay the same
across `container-*`, `image-*` and the rest.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from ds01hub.errors import Ds01hubError, render

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class CliError(Ds01hubError):
    """A failure to report to the user: what went wrong, how to fix it, and the exit code."""

    def __init__(self, message: str, hint: str | None = None, code: int = EXIT_FAILURE):
        super().__init__(message, hint)
        self.code = code


def exit_code(error: Ds01hubError) -> int:
    """A CliError's own code; otherwise 2 (usage) for bad input (status 400), else 1."""
    if isinstance(error, CliError):
        return error.code
    return EXIT_USAGE if error.status == 400 else EXIT_FAILURE


def use_colour(stream: TextIO) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and os.environ.get("TERM") != "dumb"


_COLOURS = {"red": "31", "green": "32", "yellow": "33", "blue": "34", "grey": "90", "bold": "1"}


def paint(text: str, colour: str, enabled: bool) -> str:
    """Wrap text in an ANSI colour when enabled (a TTY), else return it unchanged."""
    if not enabled or colour not in _COLOURS:
        return text
    return f"\033[{_COLOURS[colour]}m{text}\033[0m"


STATE_COLOURS = {
    "running": "green",
    "starting": "yellow",
    "stopping": "yellow",
    "stopped": "grey",
    "queued": "yellow",
}


def format_percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


@dataclass(frozen=True)
class Column:
    """A table column: the heading, the key in each row, and an optional colour rule."""

    heading: str
    key: str
    colour_of: Any = None  # callable(value) -> colour name | None


def render_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[Column], colour: bool = False
) -> str:
    """Left-aligned columns sized to their widest cell; colour is applied after padding so ANSI
    codes never break the alignment."""
    cells = [[_cell(row.get(col.key)) for col in columns] for row in rows]
    widths = [max([len(col.heading)] + [len(r[i]) for r in cells]) for i, col in enumerate(columns)]
    headings = [
        paint(c.heading.ljust(w), "bold", colour) for c, w in zip(columns, widths, strict=True)
    ]
    lines = ["  ".join(headings).rstrip()]
    for row, texts in zip(rows, cells, strict=True):
        parts = []
        for col, width, text in zip(columns, widths, texts, strict=True):
            padded = text.ljust(width)
            tint = col.colour_of(row.get(col.key)) if col.colour_of else None
            parts.append(paint(padded, tint, colour) if tint else padded)
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


def print_json(data: Any, stream: TextIO | None = None) -> None:
    """Machine-readable output: stable key order, one document, newline-terminated."""
    stream = stream or sys.stdout
    stream.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def print_error(error: BaseException, stream: TextIO | None = None) -> None:
    """ds01hub.errors.render on `stream` (stderr), its labels coloured on a terminal."""
    stream = stream or sys.stderr
    colour = use_colour(stream)
    stream.write(render(error, paint=lambda text, c: paint(text, c, colour)) + "\n")


def print_lines(lines: Iterable[str], stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout
    for line in lines:
        stream.write(line + "\n")
