"""docs/settings.md, generated from the configurable classes' traitlets (their `help=`).

    python -m ds01hub.cli.settings_reference            # rewrite docs/settings.md
    python -m ds01hub.cli.settings_reference --check    # exit 1 when it differs from the code

The reference is written from the code, never by hand, so it cannot drift: a unit test
(tests/test_settings_reference.py) fails when the committed file differs from what `render`
makes. Only the settings each class declares itself are listed (not DockerSpawner's or
traitlets' Application's own, which their projects document). Defaults are the static ones;
a setting whose default comes from the environment says so in its help.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Sequence
from pathlib import Path

from traitlets import TraitType
from traitlets.config import Configurable

from ds01hub.cli.admin import CullCommand
from ds01hub.server_extension.handlers import DS01Extension
from ds01hub.services.broker.app import Broker
from ds01hub.services.node_exporter import NodeExporterApp
from ds01hub.services.notebook.app import DS01Service
from ds01hub.services.ops.app import OpsService
from ds01hub.services.settings import HostSettings, ImageBuildSettings, RegistrySettings
from ds01hub.spawner import DS01Spawner

#: Each configurable class with where its settings are set.
CLASSES: Sequence[tuple[type[Configurable], str]] = (
    (DS01Spawner, "`c.DS01Spawner.NAME = ...` in jupyterhub_config.py"),
    (Broker, "`--Broker.NAME=...` in the broker's command (`configure_broker(broker_args=...)`)"),
    (DS01Service, "`--DS01Service.NAME=...` in the ds01 service's command"),
    (OpsService, "`--OpsService.NAME=...` in the ops service's command (also `ds01hub cull`)"),
    (CullCommand, "`ds01hub cull --CullCommand.NAME=...` (its own flags: see --help)"),
    (NodeExporterApp, "`python -m ds01hub.services.node_exporter --NAME=...` on each node"),
    (DS01Extension, "`c.DS01Extension.NAME = ...` in the single-user server's jupyter config"),
    (HostSettings, "`--HostSettings.NAME=...` for every service at once, or per service"),
    (ImageBuildSettings, "`--ImageBuildSettings.NAME=...`, or per service"),
    (RegistrySettings, "`--RegistrySettings.NAME=...` for the broker and ds01 service at once"),
)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUTPUT = REPO / "docs" / "settings.md"

HEADER = """\
# Settings reference

Generated from the code by `python -m ds01hub.cli.settings_reference` (each setting's
traitlets `help=`); do not edit by hand: tests/test_settings_reference.py fails when this file
and the code differ. Defaults shown are the static ones; where a default comes from the
environment, the help says so.
"""


def render(classes: Sequence[tuple[type[Configurable], str]] = CLASSES) -> str:
    """The whole reference as Markdown (pure: the same code gives the same text)."""
    parts = [HEADER]
    for cls, where in classes:
        parts.append(f"\n## {cls.__name__}\n\n{_first_line(cls)}\nSet as {where}.\n")
        mixins = [c.__name__ for c, _ in classes if c is not cls and issubclass(cls, c)]
        if mixins:
            parts.append(f"Also has the settings of {', '.join(mixins)} (below).\n")
        for name, trait in sorted(cls.class_own_traits(config=True).items()):
            parts.append(_setting(cls.__name__, name, trait))
    return "".join(parts)


def _first_line(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    return doc.split("\n\n", 1)[0].replace("\n", " ") + "\n"


def _setting(owner: str, name: str, trait: TraitType) -> str:
    default = trait.default_value_repr()
    help_text = inspect.cleandoc(trait.help or "") or "(no help: add `help=` to the trait)"
    return f"\n### `{owner}.{name}`\n\n{type(trait).__name__}, default `{default}`\n\n{help_text}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="the file to write")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if it differs")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(
                f"{args.output} differs from the code; run "
                "`python -m ds01hub.cli.settings_reference` and commit it",
                file=sys.stderr,
            )
            return 1
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
