"""Progress of a long step (an image build, a start that waits for a GPU) on the user's
terminal: one status line redrawn in place, with a bar, the time so far and, once the progress
says enough, an estimate of the time left. Without a terminal (a pipe, a log file) every
message is a plain line, as before.

Written here rather than with a progress-bar library: the bar is one line of text, and the
users' commands start with every command (`container-list` must answer in well under 150 ms),
so they carry no dependency that a few lines replace.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from typing import TextIO

from ds01hub.cli.output import paint
from ds01hub.units import human_duration

BAR_WIDTH = 20
#: Below this share done, an estimate of the time left is mostly noise: none is shown.
ETA_FROM = 0.05
#: Redraw sequence: back to the line's start, erase it.
REDRAW = "\r\x1b[2K"


def remaining_seconds(fraction: float, elapsed: float) -> float | None:
    """Time left if the rest goes as fast as what is done (None while too little is done)."""
    if fraction < ETA_FROM or fraction >= 1.0 or elapsed <= 0:
        return None
    return elapsed * (1.0 - fraction) / fraction


def render(
    what: str, fraction: float | None, message: str, elapsed: float, eta: float | None, width: int
) -> str:
    """The status line, cut to `width` columns: `what [#####-----] 45% 1m 2s, ETA 1m 20s: msg`."""
    parts = [what]
    if fraction is not None:
        done = round(max(0.0, min(1.0, fraction)) * BAR_WIDTH)
        parts.append(f"[{'#' * done}{'-' * (BAR_WIDTH - done)}] {fraction * 100:3.0f}%")
    timing = human_duration(elapsed)
    if eta is not None:
        timing += f", ETA {human_duration(eta)}"
    parts.append(timing)
    message = " ".join(message.split())  # one line, whatever the message holds
    line = " ".join(parts) + (f": {message}" if message else "")
    return line if len(line) <= width else line[: max(0, width - 1)] + "…"


class ProgressLine:
    """Shows progress events of one step on `stream`: redrawn in place on a terminal, plain
    lines (`what: [ 45%] message`) elsewhere. `close` ends the redrawn line."""

    def __init__(
        self,
        stream: TextIO,
        what: str,
        colour: bool,
        clock: Callable[[], float] = time.monotonic,
    ):
        isatty = getattr(stream, "isatty", None)
        self.stream = stream
        self.what = what
        self.colour = colour
        self.live = bool(isatty and isatty())
        self.clock = clock
        self.started = clock()
        self.drawn = False

    def update(self, fraction: float | None, message: str) -> None:
        if not self.live:
            prefix = f"[{fraction * 100:3.0f}%] " if fraction is not None else ""
            if message:
                self.stream.write(paint(f"{self.what}: {prefix}{message}", "grey", self.colour))
                self.stream.write("\n")
                self.stream.flush()
            return
        elapsed = self.clock() - self.started
        eta = remaining_seconds(fraction, elapsed) if fraction is not None else None
        width = shutil.get_terminal_size((80, 24)).columns - 1
        line = render(self.what, fraction, message, elapsed, eta, width)
        self.stream.write(REDRAW + paint(line, "grey", self.colour))
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


def event_fraction(progress: object, kind: str | None) -> float | None:
    """An event's progress as a share of 1: builds send 0.0-1.0, the hub's spawn events 0-100."""
    if not isinstance(progress, int | float) or isinstance(progress, bool):
        return None
    if isinstance(progress, float) and progress <= 1.0 and kind in ("step", "log"):
        return max(0.0, float(progress))
    return max(0.0, min(1.0, progress / 100))
