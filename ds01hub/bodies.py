"""Request bodies, parsed by pydantic models (JupyterHub's own pattern: apihandlers/shares.py).

Every JSON body the project's HTTP APIs accept (the broker, the notebook service, the server
extension, the spawner's `user_options`) is a :class:`Body` model: unknown keys are refused,
JSON types are taken exactly (no ``"1"`` for ``1``, no ``NaN``), and each field's
``description`` says what is allowed. A body that does not fit is a :class:`BodyError`: a 400
that names the field, shows the value (bounded: a body may be megabytes) and says the fix, so a
door answers bad input of any size or shape with a named error, never a traceback.

A BodyError is a ds01hub.errors.Ds01hubError: every door answers it as it answers any refusal
(ds01hub.services.web.JsonHandler.body parses with a model).
"""

from __future__ import annotations

import reprlib
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ds01hub.errors import Ds01hubError

__all__ = ["Body", "BodyError", "BuildCancel", "parse_body", "parse_data", "shown"]

#: At most this many characters of a refused value are shown back.
MAX_SHOWN = 80

_REPR = reprlib.Repr()
_REPR.maxstring = MAX_SHOWN
_REPR.maxother = MAX_SHOWN
_REPR.maxlevel = 3

M = TypeVar("M", bound=BaseModel)


class Body(BaseModel):
    """Base of every request body: unknown keys refused, exact JSON types, no NaN/Infinity."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class BuildCancel(Body):
    """``POST api/builds/{id}/cancel`` (the notebook service, the widget's Cancel button):
    how long to wait for the build to stop before answering."""

    wait: float = Field(
        0.0,
        ge=0,
        le=60,
        description="seconds (0..60) to wait until the build has stopped; 0: answer at once",
    )


class BodyError(Ds01hubError, ValueError):
    """A request body did not fit its model: `message` names the field and the value, `hint`
    says what would do; `field` is the dotted path of the field (None: the body as a whole;
    cut to MAX_SHOWN), `value` the value refused, `reason` what is wrong with it."""

    status = 400

    def __init__(
        self,
        message: str,
        hint: str,
        field: str | None = None,
        reason: str = "",
        value: object = None,
    ):
        super().__init__(message, hint)
        self.field, self.reason, self.value = field, reason or message, value


def shown(value: object) -> str:
    """`value` as the error shows it: a repr cut to MAX_SHOWN characters (cheap on any size)."""
    return _cut(_REPR.repr(value))


def _cut(text: str) -> str:
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


def parse_body(model: type[M], raw: bytes | str | None, what: str = "the request body") -> M:
    """A JSON request body -> `model`; an empty body is ``{}``. BodyError otherwise."""
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as error:
        raise body_error(model, error, what) from None


def parse_data(model: type[M], data: object, what: str = "the request body") -> M:
    """Already-decoded data (a form's fields, a REST `user_options`) -> `model`, or BodyError."""
    try:
        return model.model_validate(data if data is not None else {})
    except ValidationError as error:
        raise body_error(model, error, what) from None


def body_error(model: type[BaseModel], error: ValidationError, what: str) -> BodyError:
    """The first problem pydantic found, in words: which field, which value, what would do."""
    first = error.errors(include_url=False)[0]
    path = _cut(".".join(str(part) for part in first["loc"]))  # an unknown key may be long
    refused = first.get("input")
    value = shown(refused)
    allowed = f"send a JSON object with {field_list(model)}"
    if first["type"] == "json_invalid":
        return BodyError(f"{what} is not JSON ({first['msg']})", allowed)
    if not path and first["type"] in ("model_type", "dict_type", "model_attributes_type"):
        return BodyError(f"{what} must be a JSON object, not {value}", allowed, value=refused)
    if first["type"] == "extra_forbidden":
        message = f"{what}: unknown field {path!r} (= {value})"
        return BodyError(message, allowed, path, "unknown field", refused)
    reason = first["msg"].removeprefix("Value error, ")
    hint = f"{path}: {describe(model, first['loc'])}"
    return BodyError(f"{what}: field {path!r} = {value}: {reason}", hint, path, reason, refused)


def field_list(model: type[BaseModel]) -> str:
    names = list(model.model_fields)
    return "the fields " + ", ".join(names) if names else "no fields"


def describe(model: type[BaseModel], loc: tuple[int | str, ...]) -> str:
    """The `description` of the field at `loc`, descending into nested models."""
    field = None
    for part in loc:
        found = model.model_fields.get(str(part))
        if found is None:
            break  # an index into a list or a dict: the field's description covers it
        field = found
        nested = field.annotation
        for candidate in getattr(nested, "__args__", (nested,)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                model = candidate
    return (field.description if field is not None else None) or "see the API's documentation"
