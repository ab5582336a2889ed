"""One error type for everything ds01hub refuses or fails to do, and its one rendering.

Every door shows an error the same way: what went wrong (`message`), how to fix it (`hint`), and
for the doors that answer over HTTP (the broker, the ds01 service, the server extension) an
HTTP-like `status` (400 bad input, 403 refused, 404 not found, 409 conflict or over quota, 503
a service down). Subclasses exist where the kind of failure means something to a caller
(`except ImageNotFoundError`) or carries more (a CLI exit code, a list of limits-file problems);
none renders itself differently.

Standard library only: `python3 -m ds01hub.host.bootstrap` imports it before any venv exists.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["Ds01hubError", "render"]


class Ds01hubError(Exception):
    """What went wrong (`message`), how to fix it (`hint`, or None), and an HTTP-like `status`
    (a class's default, e.g. 404 for "not found", unless one is given)."""

    status: int = 400

    def __init__(self, message: str, hint: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if status is not None:
            self.status = status

    def to_json(self) -> dict[str, Any]:
        """The body every HTTP door answers an error with."""
        return {"error": self.message, "hint": self.hint, "status": self.status}


def _plain(text: str, _colour: str) -> str:
    return text


def render(
    error: BaseException, prog: str | None = None, paint: Callable[[str, str], str] = _plain
) -> str:
    """`[PROG: ]error: MESSAGE` and, when there is one, `hint: HINT` on the next line: the one
    way every command shows an error. Any other exception (an OSError) shows as its text.
    `paint(text, colour)` colours the two labels (the CLI's, on a terminal)."""
    message = error.message if isinstance(error, Ds01hubError) else str(error)
    hint = error.hint if isinstance(error, Ds01hubError) else None
    text = f"{prog + ': ' if prog else ''}{paint('error:', 'red')} {message}"
    return text + (f"\n{paint('hint:', 'yellow')} {hint}" if hint else "")
