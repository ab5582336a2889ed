"""The broker's wire protocol, shared by the broker (server) and the users' commands (client).

HTTP/1.1 with JSON on a unix socket, routes under `API_PREFIX` (docs/architecture.md, "User
operations, hub client, broker"). `container-run` upgrades its connection with
`Upgrade: EXEC_UPGRADE`; after the 101 the broker sends the container's output as Docker does,
and the client sends its input in frames: kind (1 byte), payload size (4 bytes, big-endian),
payload. Framing is needed because the end of input must reach the shell (EOF) while its output
still flows, and tornado streams cannot half-close.
"""

from __future__ import annotations

import struct

from ds01hub import paths

DEFAULT_SOCKET = str(paths.BROKER_SOCKET)
API_PREFIX = "/v1"
EXEC_UPGRADE = "ds01-exec"

INPUT_HEADER = struct.Struct(">BI")
INPUT_DATA, INPUT_EOF, INPUT_RESIZE = 0, 1, 2
MAX_INPUT_FRAME = 1 << 20


def encode_input(kind: int, payload: bytes = b"") -> bytes:
    return INPUT_HEADER.pack(kind, len(payload)) + payload


def encode_resize(rows: int, cols: int) -> bytes:
    return encode_input(INPUT_RESIZE, struct.pack(">HH", min(rows, 65535), min(cols, 65535)))


def decode_input_header(header: bytes) -> tuple[int, int]:
    kind, size = INPUT_HEADER.unpack(header)
    return kind, size
