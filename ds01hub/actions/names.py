"""What a container (project) may be called: the rule, the check and a suggestion, with
`OperationError`, the actions' refusal, which the check raises.

Apart from `ds01hub.actions.operations` (which imports the error and the check from here) so
that the users'
commands check a name without importing the operations' machinery (asyncio, the hub client):
they start with every command, and `container-list` must answer in well under 150 ms.
"""

from __future__ import annotations

import re

from ds01hub.errors import Ds01hubError

__all__ = ["NAME_RE", "NAME_RULE", "OperationError", "suggest_name", "validate_name"]


class OperationError(Ds01hubError):
    """A user action failed: `message` says what, `hint` how to fix it; `status` is HTTP-like
    (400 bad input, 403 refused, 404 no such container, 409 conflict/over quota, 502 hub)."""


#: Container (project) names the users' commands accept.
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
NAME_RULE = (
    "use lowercase letters, digits, '-' and '_' (starting with a letter or digit, "
    "at most 63 characters)"
)


def suggest_name(name: str) -> str:
    """A valid name close to a rejected one (`My Project.v2` -> `my-project-v2`)."""
    cleaned = re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-_")
    return cleaned[:63] or "my-project"


def validate_name(name: str, what: str = "container name") -> str:
    """Return `name` if the commands accept it, else raise an OperationError that names the rule
    and suggests a valid spelling."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise OperationError(
            f"bad {what} {name!r}: {NAME_RULE}",
            hint=f"for example {suggest_name(str(name))!r}",
            status=400,
        )
    return name
