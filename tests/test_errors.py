"""One error type (ds01hub.errors): every error class is one, and all render the same way."""

import importlib
import inspect
import pkgutil

import pytest

import ds01hub
from ds01hub.actions.images import ImageNotFoundError
from ds01hub.actions.operations import OperationError, named_error
from ds01hub.cli.output import CliError, exit_code
from ds01hub.errors import Ds01hubError, render
from ds01hub.gpu.allocator import AllocationStateError

# the private ones are control flow (a walk that stops, a spawn that restarts), never shown
NOT_OURS = {"_Bad", "_SlotsLost", "_Stop"}


def test_render_says_what_and_how_to_fix_it():
    error = OperationError("over quota", hint="stop a container", status=409)
    assert render(error) == "error: over quota\nhint: stop a container"
    assert render(Ds01hubError("no"), "ds01hub install") == "ds01hub install: error: no"
    assert render(OSError("disk full")) == "error: disk full"
    assert error.to_json() == {"error": "over quota", "hint": "stop a container", "status": 409}


def test_a_class_status_is_the_default_and_a_given_one_wins():
    assert ImageNotFoundError("gone").status == 404
    assert Ds01hubError("x").status == 400 and Ds01hubError("x", status=403).status == 403
    assert (exit_code(OperationError("bad")), exit_code(OperationError("x", status=409))) == (2, 1)
    assert exit_code(CliError("x", code=3)) == 3


def test_a_refusal_is_shown_and_a_host_failure_is_not():
    refusal = ImageNotFoundError("no image x")
    assert named_error(refusal, "unix:///x") is refusal
    assert named_error(AllocationStateError("/var/lib/ds01hub/a: read-only"), "unix:///x") is None


def _error_classes():
    for info in pkgutil.walk_packages(ds01hub.__path__, "ds01hub."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == info.name and issubclass(cls, Exception):
                yield pytest.param(cls, id=f"{info.name}.{name}")


@pytest.mark.parametrize("cls", list(_error_classes()))
def test_every_error_class_is_a_ds01hub_error(cls):
    assert cls.__name__ in NOT_OURS or issubclass(cls, Ds01hubError)
