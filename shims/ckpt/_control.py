"""Client side of the supervisor's control socket. Standard library only.

One request per connection: a JSON object on one line, one JSON reply line.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from ckpt._contract import ENV_SOCKET

#: The longest reply read (a status document is a few KiB): a socket that
#: streams without end is refused instead of filling memory.
MAX_REPLY = 1 << 20


class CommitError(RuntimeError):
    """The supervisor could not make the checkpoint durable (the reason is the message)."""


def socket_path() -> str | None:
    """The control socket of the supervising `ckpt run`, or None outside one."""
    return os.environ.get(ENV_SOCKET) or None


def request(
    message: dict[str, Any], timeout: float | None = None, path: str | None = None
) -> dict[str, Any]:
    """Send one request to `path` (default: $CKPT_SOCKET); CommitError if there
    is no supervisor or it does not answer."""
    path = path or socket_path()
    if path is None:
        raise CommitError(f"not running under `ckpt run` ({ENV_SOCKET} is not set)")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(json.dumps(message).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                more = s.recv(65536)
                if not more:
                    break
                data += more
                if len(data) > MAX_REPLY:
                    raise CommitError(f"control socket {path} sent more than {MAX_REPLY} bytes")
    except OSError as exc:
        raise CommitError(f"control socket {path}: {exc}") from None
    try:
        reply = json.loads(data)
    except (ValueError, RecursionError):
        raise CommitError(f"control socket {path} closed without a reply") from None
    if not isinstance(reply, dict):
        raise CommitError(f"control socket {path} sent {reply!r}")
    return reply
