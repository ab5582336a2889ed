"""The JSON side of every ds01hub HTTP door -- the broker, the ds01 (notebook) service and the
notebook's server extension: one way to read a request body, to answer, to answer an error,
and to stream events.

Every error body is `ds01hub.errors.Ds01hubError.to_json()`: `{"error", "hint", "status"}`.
A Ds01hubError (a refusal, or a 502/503/504 naming a service that is down) is answered with
its own status, message and hint, and not logged as a crash; anything else -- and a host's
own failure, status 500 -- is a 500 with an "internal error" text (the traceback goes to the
log, never to the caller). A door names more failures by overriding
`named` (the broker: the Docker engine's and the hub's).
Streams are newline-delimited JSON (NDJSON); an error after the status line has gone is the
stream's last line, `{"event": "error", ...}`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterable
from typing import Any

from tornado import web
from tornado.iostream import StreamClosedError

from ds01hub.errors import Ds01hubError

__all__ = ["JSON", "NDJSON", "JsonHandler"]

JSON = "application/json"
NDJSON = "application/x-ndjson"

log = logging.getLogger("ds01hub.services.web")


class JsonHandler(web.RequestHandler):
    """Mixed in before a door's tornado handler base (`class H(JsonHandler, APIHandler)`)."""

    #: What a caller reads for a failure that is not theirs to know about (the log has it).
    internal_error = "internal error"

    def json_body(self) -> dict[str, Any]:
        """The request body: a JSON object, {} when empty; anything else is a 400 naming it."""
        if not self.request.body:
            return {}
        try:
            body = json.loads(self.request.body)
        except ValueError as error:
            raise Ds01hubError(f"the request body is not JSON: {error}") from None
        if not isinstance(body, dict):
            raise Ds01hubError("the request body must be a JSON object")
        return body

    def write_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", JSON)
        self.finish(json.dumps(data, default=str))

    def named(self, error: BaseException) -> Ds01hubError | None:
        """`error` as the caller may read it, or None (an internal error). A Ds01hubError is
        itself (but for status 500); tornado's HTTPError (403 from the login check, 404 from
        routing) keeps its status."""
        if isinstance(error, Ds01hubError):
            return None if error.status == 500 else error
        if isinstance(error, web.HTTPError) and error.status_code < 500:
            return Ds01hubError(error.log_message or error.reason or "", status=error.status_code)
        return None

    def send_json_error(self, error: Ds01hubError) -> None:
        self.write_json(error.to_json(), error.status)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = kwargs.get("exc_info", (None, None, None))[1]
        named = self.named(error) if error is not None else None
        if named is None:
            message = self._reason if status_code < 500 else self.internal_error
            named = Ds01hubError(message, status=status_code)
        self.send_json_error(named)

    def _handle_request_exception(self, error: BaseException) -> None:
        named = self.named(error)
        if named is None or self._finished:
            super()._handle_request_exception(error)
            return
        self.log_refusal(named)
        self.send_error(named.status, exc_info=(type(error), error, None))

    def log_refusal(self, error: Ds01hubError) -> None:
        """A refusal is the caller's business: one info line, no traceback."""
        log.info("%s %s refused (%s): %s", *self._where(), error.status, error.message)

    def _where(self) -> tuple[str, str]:
        return self.request.method or "", self.request.path

    async def stream_json(self, events: AsyncIterable[Any]) -> None:
        """Send `events` as NDJSON, each flushed as it comes; an error mid-way (the status line
        has gone) is sent as the last line, `{"event": "error", ...}`."""
        self.set_header("Content-Type", NDJSON)
        self.set_header("Cache-Control", "no-cache")
        try:
            async for event in events:
                self.write(json.dumps(event, default=str) + "\n")
                await self.flush()
        except StreamClosedError:
            return
        except Exception as e:  # the status line has gone: the error is the last event
            error = self.named(e)
            if error is None:
                log.exception("%s %s failed", *self._where())
                error = Ds01hubError(self.internal_error, status=500)
            self.write(json.dumps({"event": "error", **error.to_json()}) + "\n")
        self.finish()
