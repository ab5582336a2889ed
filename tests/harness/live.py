"""Fixtures of the live tests (a real host's paths): the users' commands as `ds01hub install`
puts them, under a world-readable temp root, so every Unix user can run them."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

from ds01hub.host import install

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def commands() -> Path:
    """The bin directory of the installed users' commands (venv from /usr/bin/python3 in
    <root>/opt/ds01hub, links in <root>/usr/local/bin)."""
    root = Path(tempfile.mkdtemp(prefix="ds01t-install-"))
    root.chmod(0o755)
    layout = replace(install.Layout(), root=root)
    try:
        install.install_commands(REPO, layout)
        yield layout.bindir
    finally:
        shutil.rmtree(root, ignore_errors=True)
