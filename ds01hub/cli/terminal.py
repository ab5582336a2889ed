"""`container-run`'s side of a shell in a container: relay the terminal over the broker socket.

Output comes back as Docker sends it: raw bytes with a terminal, or (without one, e.g. a script
piped in) stdout and stderr multiplexed into frames, which `FrameDecoder` splits again.
Input goes to the broker in small frames (ds01hub.services.broker.protocol): data, end of input, and
window sizes (SIGWINCH), so the end of a piped script reaches the shell as EOF while its output
flows.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import struct
import sys
import termios
import tty
from collections.abc import Iterator

from ds01hub.services.broker.protocol import INPUT_DATA, INPUT_EOF, encode_input, encode_resize


class FrameDecoder:
    """Docker's non-TTY attach stream: 8-byte headers (stream id, 0, 0, 0, big-endian size)
    followed by that many bytes; stream 1 is stdout, 2 stderr."""

    def __init__(self) -> None:
        self.buffer = b""

    def feed(self, data: bytes) -> Iterator[tuple[int, bytes]]:
        self.buffer += data
        while len(self.buffer) >= 8:
            stream, size = self.buffer[0], struct.unpack(">I", self.buffer[4:8])[0]
            if len(self.buffer) < 8 + size:
                return
            payload, self.buffer = self.buffer[8 : 8 + size], self.buffer[8 + size :]
            yield stream, payload


def terminal_size(fd: int) -> tuple[int, int]:
    """(rows, cols) of the terminal on fd (24x80 when unknown)."""
    try:
        size = os.get_terminal_size(fd)
        return size.lines, size.columns
    except OSError:
        return 24, 80


@contextlib.contextmanager
def raw_mode(fd: int, enabled: bool):
    """Raw input while relaying (keys like Ctrl-C go to the container), restored afterwards."""
    if not enabled:
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def relay_terminal(
    sock: socket.socket,
    initial: bytes,
    interactive: bool,
    stdin_fd: int | None = None,
    stdout_fd: int | None = None,
    stderr_fd: int | None = None,
) -> None:
    """Copy stdin to the broker and its output to stdout until the exec ends."""
    stdin_fd = sys.stdin.fileno() if stdin_fd is None else stdin_fd
    stdout_fd = sys.stdout.fileno() if stdout_fd is None else stdout_fd
    stderr_fd = sys.stderr.fileno() if stderr_fd is None else stderr_fd
    decoder = None if interactive else FrameDecoder()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    previous = None
    if interactive:

        def on_winch(_signum, _frame):
            with contextlib.suppress(OSError):
                os.write(wake_w, b"w")

        previous = signal.signal(signal.SIGWINCH, on_winch)

    def send(frame: bytes) -> bool:
        """False once the broker has closed (the exec ended): output may still be queued."""
        try:
            sock.sendall(frame)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    def emit(data: bytes) -> None:
        if decoder is None:
            _write_all(stdout_fd, data)
            return
        for stream, payload in decoder.feed(data):
            _write_all(stderr_fd if stream == 2 else stdout_fd, payload)

    try:
        with raw_mode(stdin_fd, interactive):
            if initial:
                emit(initial)
            reading_stdin = True
            while True:
                watched = [sock, wake_r] + ([stdin_fd] if reading_stdin else [])
                ready, _, _ = select.select(watched, [], [])
                if wake_r in ready:
                    os.read(wake_r, 1024)
                    send(encode_resize(*terminal_size(stdin_fd)))
                if sock in ready:
                    try:
                        data = sock.recv(65536)
                    except ConnectionResetError:
                        return
                    if not data:
                        return
                    emit(data)
                if reading_stdin and stdin_fd in ready:
                    data = os.read(stdin_fd, 65536)
                    reading_stdin = send(encode_input(INPUT_DATA if data else INPUT_EOF, data))
                    reading_stdin = reading_stdin and bool(data)
    finally:
        if previous is not None:
            signal.signal(signal.SIGWINCH, previous)
        os.close(wake_r)
        os.close(wake_w)
        sock.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
