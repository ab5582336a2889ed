"""A spawner's progress events (JupyterHub's progress API, the spawn page, the CLI) and its
refusals, shared by DS01Spawner and DS01SwarmSpawner: plain steps (`_emit`), messages for
people (`_emit_message`, ds01hub.gpu.messages) streamed from the first as they happen, and a
refused spawn's exception (`_refusal`, its HTTP status for an allocator's refusal from
`refusal_status`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from jupyterhub.spawner import SpawnException
from jupyterhub.utils import url_path_join

from ds01hub.gpu import messages

__all__ = ["ProgressEvents", "refusal_status"]

#: The HTTP status of a spawn the allocator refused, per `Decision.code` (others: 400): the
#: user's own limits (409: they conflict with what the user runs), a request no slot could ever
#: meet on this deployment (403: over the per-container limit), a kind it lacks (400).
_STATUS_OF_CODE = {
    "per_container_limit": 403,
    "user_limit": 409,
    "equivalents_limit": 409,
    "not_available": 400,
}


def refusal_status(code: str | None) -> int:
    """The status a refused spawn answers with, the same on one host and on a swarm."""
    return _STATUS_OF_CODE.get(code or "", 400)


class ProgressEvents:
    """Mixin for a JupyterHub spawner (it needs `log` and `_log_name`): `_init_progress()` in
    its `__init__`, `_begin_progress()` as a spawn starts, `_finish_progress()` as it ends."""

    log: Any
    _log_name: str
    hub: Any
    user: Any
    name: str

    def _init_progress(self) -> None:
        self._events: list[dict] = []  # this spawn's progress events
        self._event_signal = asyncio.Event()
        self._spawn_finished = False

    def _begin_progress(self) -> None:
        self._events.clear()  # in place: a progress stream may already be waiting on it
        self._spawn_finished = False

    def _finish_progress(self) -> None:
        self._spawn_finished = True
        self._event_signal.set()

    def _emit(self, progress: int, message: str) -> None:
        self._events.append({"progress": progress, "message": message})
        self._event_signal.set()
        self.log.info("ds01 %s: %s", self._log_name, message)

    def _emit_message(self, progress: int, message: messages.Message) -> None:
        """A progress event people read (ds01hub.gpu.messages): the headline as the event's
        text, the whole message as HTML for the spawn page and as data for the CLI."""
        self._events.append(
            {
                "progress": progress,
                "message": message.headline,
                "html_message": message.html(),
                messages.EVENT_KEY: message.to_dict(),
            }
        )
        self._event_signal.set()
        self.log.info("ds01 %s: %s", self._log_name, message.text())

    async def progress(self) -> AsyncIterator[dict]:
        """Every step of `start` as it happens (JupyterHub's progress API / spawn page)."""
        sent = 0
        while True:
            while sent < len(self._events):
                yield self._events[sent]
                sent += 1
            if self._spawn_finished:
                return
            self._event_signal.clear()
            if sent == len(self._events):
                await self._event_signal.wait()

    def _form_url(self) -> str:
        """This server's options form (the way back from a wait or a refusal)."""
        return url_path_join(self.hub.base_url, "spawn", self.user.escaped_name, self.name or "")

    def _setting(self, name: str) -> str:
        """A setting as the hub's configuration names it, for this spawner's class
        (`c.DS01Spawner.gpu_wait_timeout`, `c.DS01SwarmSpawner.gpu_wait_timeout`)."""
        return f"c.{type(self).__name__}.{name}"

    def _refusal(self, message: messages.Message, status: int) -> SpawnException:
        """A spawn refused with a message for people: plain text for the API and the CLI, HTML
        (details folded, a link back to the form) for the hub's pages."""
        html = message.html(self._form_url())
        error = SpawnException(
            message.text(), reason=message.code, status_code=status, message_html=html
        )
        # what the hub's progress stream and its "spawn failed" page show (else str(error):
        # "503 SpawnException(reason=...)")
        error.jupyterhub_message = message.text()
        error.jupyterhub_html_message = html
        return error
