"""One set of host paths (ds01hub.paths) and one behaviour for "no limits file"
(ds01hub.limits.load_limits_or_defaults), the same in every process and command."""

import ast
from pathlib import Path

import pytest

from ds01hub import paths
from ds01hub.limits import LimitsError, LimitsStore, load_limits_or_defaults

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = {"/var/lib/ds01hub", "/etc/ds01hub", "/etc/ds01hub/resource-limits.yaml"}
DEFAULTS |= {"/run/ds01hub/broker.sock", "/run/ds01hub/docker.sock", "/var/lib/ds01hub/proxy"}
DEFAULTS |= {"/srv/ds01hub/workspaces", "/var/run/docker.sock"}


def test_a_given_path_wins_then_the_environment_then_the_default():
    assert paths.state_dir(None, {}) == Path("/var/lib/ds01hub")
    assert paths.state_dir(None, {paths.ENV_STATE_DIR: "/srv/s"}) == Path("/srv/s")
    assert paths.state_dir("/x", {paths.ENV_STATE_DIR: "/srv/s"}) == Path("/x")
    assert paths.limits_path(None, {}) == paths.DEFAULT_LIMITS_PATH
    assert paths.limits_path(None, {paths.ENV_LIMITS: "/l.yaml"}) == Path("/l.yaml")
    assert not paths.limits_named(None, {}) and paths.limits_named(None, {paths.ENV_LIMITS: "x"})


def test_no_module_spells_a_default_path_of_its_own():
    """Docstrings and help texts may name them; code takes them from ds01hub.paths."""
    found = []
    for folder in ("ds01hub", "spawner", "widgets", "server_extension"):
        for file in (ROOT / folder).rglob("*.py"):
            if (
                file.is_symlink()
                or any(p.is_symlink() for p in file.parents)
                or file.name == "paths.py"
            ):
                continue
            tree = ast.parse(file.read_text())
            docstrings = {
                id(node.body[0].value)
                for node in ast.walk(tree)
                if isinstance(
                    node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
                )
                and node.body
                and isinstance(node.body[0], ast.Expr)
            }
            found += [
                f"{file.relative_to(ROOT)}:{node.lineno}"
                for node in ast.walk(tree)
                if isinstance(node, ast.Constant)
                and node.value in DEFAULTS
                and id(node) not in docstrings
            ]
    assert found == []


def test_no_limits_file_is_the_built_in_defaults_unless_one_was_named(tmp_path, monkeypatch):
    monkeypatch.delenv(paths.ENV_LIMITS, raising=False)
    monkeypatch.setattr(paths, "DEFAULT_LIMITS_PATH", tmp_path / "absent.yaml")
    assert load_limits_or_defaults().path.startswith("(built-in defaults")  # not an error
    with pytest.raises(LimitsError, match="file not found"):
        load_limits_or_defaults(tmp_path / "named.yaml")
    monkeypatch.setenv(paths.ENV_LIMITS, str(tmp_path / "env.yaml"))
    with pytest.raises(LimitsError, match="file not found"):
        load_limits_or_defaults()


def test_deleting_the_file_in_force_never_lifts_the_limits(tmp_path, monkeypatch):
    monkeypatch.delenv(paths.ENV_LIMITS, raising=False)
    file = tmp_path / "limits.yaml"
    monkeypatch.setattr(paths, "DEFAULT_LIMITS_PATH", file)
    store = LimitsStore()
    assert store.current.path.startswith("(built-in defaults")
    file.write_text("defaults:\n  max_gpus: 3\n")
    assert store.reload() and store.current.resolve("ann", ()).max_gpus == 3
    file.unlink()
    assert not store.reload() and store.current.resolve("ann", ()).max_gpus == 3
    assert "file not found" in (store.last_error or "")
