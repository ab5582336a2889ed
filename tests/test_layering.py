"""The package layout is a layering: no module imports "upward" (docs/architecture.md, "Layers").

Core modules never import gpu/actions/services/cli/host; nothing below the CLI imports
`ds01hub.cli`. Read from the source with `ast`, so a function-level import counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: Where each installed package's source lives in the checkout (pyproject's package-dir).
SOURCES = {
    "ds01hub": REPO / "ds01hub",
    "ds01hub.spawner": REPO / "spawner",
    "ds01hub.server_extension": REPO / "server_extension",
    "ds01hub.widgets": REPO / "widgets",
}

#: Lowest first. A module may import its own layer and the layers below it. The longest
#: matching prefix decides a module's layer; `ds01hub.hub.services` registers the services in
#: the hub's config, so it sits with them (the hub client is below).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("ds01hub",)),
    ("gpu and hub client", ("ds01hub.gpu", "ds01hub.hub", "ds01hub.hub.client")),
    ("actions", ("ds01hub.actions",)),
    (
        "services and host",
        (
            "ds01hub.services",
            "ds01hub.dockerproxy",
            "ds01hub.spawner",
            "ds01hub.server_extension",
            "ds01hub.widgets",
            "ds01hub.hub.services",
            "ds01hub.host",
        ),
    ),
    ("cli", ("ds01hub.cli",)),
]


def layer_of(module: str) -> int:
    best, rank = "", 0
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best, rank = prefix, index
    return rank


def modules(sources: dict[str, Path]) -> dict[str, Path]:
    found = {}
    for package, root in sources.items():
        for path in root.rglob("*.py"):
            relative = path.relative_to(root)
            if package == "ds01hub" and relative.parts[0] in (
                "spawner",
                "server_extension",
                "widgets",
            ):
                continue  # the checkout's links to the sibling folders (README, "Layout")
            parts = [p for p in relative.with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def imports(module: str, path: Path) -> set[str]:
    """Every ds01hub module `module` imports, relative imports resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            names |= {f"{target}.{a.name}" for a in node.names}  # `from pkg import module`
    return {n for n in names if n == "ds01hub" or n.startswith("ds01hub.")}


def upward_imports(sources: dict[str, Path] = SOURCES) -> list[str]:
    known = modules(sources)
    wrong = []
    for module, path in sorted(known.items()):
        mine = layer_of(module)
        for target in sorted(imports(module, path)):
            if target not in known and target.rpartition(".")[0] in known:
                continue  # a name imported from a module, not a module
            if layer_of(target) > mine:
                wrong.append(
                    f"{module} ({LAYERS[mine][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
                )
    return wrong


def test_no_module_imports_upward():
    assert upward_imports() == []


def test_the_rule_sees_an_upward_import(tmp_path):
    """The check can fail: a core module importing the CLI is reported."""
    core = tmp_path / "ds01hub"
    (core / "cli").mkdir(parents=True)
    (core / "__init__.py").write_text("")
    (core / "units.py").write_text("def f():\n    from ds01hub.cli import output\n")
    (core / "cli" / "__init__.py").write_text("")
    (core / "cli" / "output.py").write_text("")
    assert upward_imports({"ds01hub": core}) == [
        "ds01hub.units (core) imports ds01hub.cli (cli)",
        "ds01hub.units (core) imports ds01hub.cli.output (cli)",
    ]


#: The two that run before any venv exists (`python3 -m ds01hub.host.bootstrap` / `.install`,
#: standard library only) declare their own arguments; `ds01hub` reuses them.
OWN_ARGUMENTS = {"ds01hub.host.bootstrap", "ds01hub.host.install"}


def test_command_line_arguments_are_declared_in_the_cli_only():
    """argparse `add_argument`/`add_parser` calls live in ds01hub.cli (docs/architecture.md):
    no service, host or core module knows the command line, but the two stdlib entry points."""
    declaring = set()
    for module, path in modules(SOURCES).items():
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("add_argument", "add_parser", "add_subparsers")
            ):
                declaring.add(module)
    assert {m for m in declaring if not m.startswith("ds01hub.cli")} == OWN_ARGUMENTS
