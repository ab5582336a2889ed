"""docs/settings.md is generated from the traitlets (ds01hub.cli.settings_reference): the
committed file must be what the code makes, every setting must have help, and every
configurable class of the project must be in it."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

from traitlets import Integer
from traitlets.config import Configurable

from ds01hub.cli import settings_reference
from ds01hub.cli.settings_reference import CLASSES, DEFAULT_OUTPUT, render

REPO = Path(__file__).resolve().parent.parent
SOURCES = {
    "ds01hub": "ds01hub",
    "spawner": "ds01hub.spawner",
    "server_extension": "ds01hub.server_extension",
}


def test_the_committed_reference_is_what_the_code_generates():
    assert DEFAULT_OUTPUT.read_text() == render(), (
        "docs/settings.md has drifted from the code: run "
        "`python -m ds01hub.cli.settings_reference` and commit docs/settings.md"
    )
    assert settings_reference.main(["--check"]) == 0


def test_every_setting_has_help_and_appears_under_its_class():
    text = render()
    for cls, _ in CLASSES:
        for name, trait in cls.class_own_traits(config=True).items():
            assert (trait.help or "").strip(), f"{cls.__name__}.{name} has no help="
            assert f"### `{cls.__name__}.{name}`" in text


def test_a_changed_setting_changes_the_reference(tmp_path):
    class Example(Configurable):
        """An example."""

        retries = Integer(3, help="How often to try.").tag(config=True)

    text = render([(Example, "here")])
    assert "### `Example.retries`\n\nInt, default `3`\n\nHow often to try.\n" in text
    output = tmp_path / "settings.md"
    output.write_text(text)
    assert settings_reference.main(["--check", "--output", str(output)]) == 1


def test_every_configurable_class_of_the_project_is_listed():
    listed = {cls for cls, _ in CLASSES}
    found = set()
    for folder, package in SOURCES.items():
        for path in (REPO / folder).rglob("*.py"):
            if "tag(config=True)" not in path.read_text():
                continue
            relative = path.relative_to(REPO / folder).with_suffix("")
            module = importlib.import_module(".".join([package, *relative.parts]))
            found |= {
                cls
                for _, cls in inspect.getmembers(module, inspect.isclass)
                if issubclass(cls, Configurable)
                and cls.__module__ == module.__name__
                and cls.class_own_traits(config=True)
            }
    assert found and found <= listed, sorted(c.__name__ for c in found - listed)
    assert re.search(r"^## DS01Spawner$", render(), re.MULTILINE)
