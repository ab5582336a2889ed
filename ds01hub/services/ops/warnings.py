"""Pending cull warnings: what the culler has told a user will be stopped, and when.

One JSON file in the state directory (`cull-warnings.json`), written atomically by the culler
only and read by the users' commands (through the broker), the hub's pages (a banner, see
`hub_announcement`) and the admin page.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

from ds01hub import paths
from ds01hub.gpu.queued import QueuedRequest, QueuedStore

WARNINGS_FILE = "cull-warnings.json"


@dataclass(frozen=True)
class CullWarning:
    """A pending cull that the user has been told about."""

    user: str
    server: str
    container: str
    code: str  # "idle" | "max_runtime"
    reason: str
    since: datetime  # start of the idle period (or the server's start, for max_runtime)
    warned_at: datetime
    cull_at: datetime

    def message(self) -> str:
        project = self.server or "default"
        return (
            f"Your container {project!r} will be stopped at {self.cull_at:%Y-%m-%d %H:%M} UTC "
            f"({self.reason}). Use it (open it in the browser or run a command in it) to keep "
            "it running; your files are kept either way."
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("since", "warned_at", "cull_at"):
            data[key] = data[key].isoformat()
        data["message"] = self.message()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CullWarning:
        times = {k: datetime.fromisoformat(data[k]) for k in ("since", "warned_at", "cull_at")}
        plain = {k: data[k] for k in ("user", "server", "container", "code", "reason")}
        return cls(**plain, **times)


class WarningStore:
    """The pending cull warnings, one JSON file written atomically by the culler only."""

    def __init__(self, state_dir: str | os.PathLike):
        self.path = Path(state_dir) / WARNINGS_FILE

    def load(self) -> dict[str, CullWarning]:
        """Container name -> warning; a missing or damaged file is no warnings."""
        try:
            entries = json.loads(self.path.read_text())
            return {e["container"]: CullWarning.from_dict(e) for e in entries}
        except (OSError, ValueError, KeyError, TypeError):
            return {}

    def save(self, warnings: Iterable[CullWarning]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        data = [w.to_dict() for w in sorted(warnings, key=lambda w: (w.user, w.server))]
        tmp.write_text(json.dumps(data, indent=1))
        tmp.chmod(0o644)
        os.replace(tmp, self.path)


def pending_warnings(user: str, state_dir: str | os.PathLike | None = None) -> list[CullWarning]:
    """The user's containers that the culler has warned will be stopped (soonest first).
    For the CLI to show on the user's next command: `w.message()` is the sentence to print."""
    store = WarningStore(paths.state_dir(state_dir))
    return sorted((w for w in store.load().values() if w.user == user), key=lambda w: w.cull_at)


def queued_line(request: QueuedRequest) -> str:
    """A queued request on the hub's pages: its place in the GPU queue and the estimate."""
    name = request.server or "(default)"
    where = f"position {request.position} of {request.waiting}" if request.position else "queued"
    if request.estimate:
        estimate = f"estimate: {datetime.fromtimestamp(request.estimate, UTC):%Y-%m-%d %H:%M} UTC"
    else:
        estimate = "no estimate (the GPUs are in use by running servers)"
    return f"Your server {name} waits for a GPU: {where}, {estimate}. It starts by itself."


def hub_announcement(state_dir: str | os.PathLike) -> Callable[[Any], str]:
    """For `c.JupyterHub.template_vars["announcement"]`: the hub calls it with the current user
    on every hub page (home, spawn, token, ...) and shows the result as a banner, so a user
    who opens the hub sees their pending culls, their queued requests (position, estimate)
    and which queued server started lately. Escaped: the hub inserts it as HTML."""

    queued = QueuedStore(state_dir)

    def announcement(user: Any) -> str:
        if user is None:
            return ""
        lines = [w.message() for w in pending_warnings(user.name, state_dir)]
        lines += queued.notices(user.name, time.time())
        lines += [queued_line(request) for request in queued.of_user(user.name)]
        return "<br>".join(escape(line) for line in lines)

    return announcement
