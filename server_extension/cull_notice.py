"""The idle culler's warning, shown in the notebook itself.

The culler (`ds01hub.services.ops.culler`) writes its warning into the container as
`/tmp/ds01hub/cull-warning.txt` (and empties it when the warning lapses). This IPython
extension, loaded into every kernel of the single-user image by the
`etc/ipython/ipython_kernel_config.py` that the package installs, looks at that file before
each cell runs and prints a new warning once, on stderr, so it stands out in the cell's output
in JupyterLab and in plain notebooks alike. The hub's pages and the CLI show the same warning
(`ds01hub.services.ops.culler.hub_announcement`, `pending_warnings`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

__all__ = ["WARNING_FILE", "CullNotice", "load_ipython_extension"]

#: Where the culler puts the warning (`ds01hub.services.ops.culler.CONTAINER_WARNING_PATH`).
WARNING_FILE = Path("/tmp/ds01hub/cull-warning.txt")


class CullNotice:
    """Prints the warning in force, once per distinct text (a renewed warning names a new
    time, so it is shown again)."""

    def __init__(self, path: Path = WARNING_FILE, stream: TextIO | None = None):
        self.path = path
        self.stream = stream
        self.shown = ""

    def current(self) -> str:
        try:
            return self.path.read_text(errors="replace").strip()
        except OSError:
            return ""

    def before_cell(self, *_info: Any) -> None:
        text = self.current()
        if text and text != self.shown:
            print(f"ds01 warning: {text}", file=self.stream or sys.stderr, flush=True)
        self.shown = text


def load_ipython_extension(ipython: Any) -> None:
    ipython.events.register("pre_run_cell", CullNotice().before_cell)
