"""One request/reply on a supervisor's control socket, with ckpt's errors."""

from __future__ import annotations

import os
from typing import Any

from ckpt._contract import ExitCode
from ckpt_cli.errors import CkptError, ConfigError


def request(socket_path: str, message: dict[str, Any]) -> dict[str, Any]:
    """One request/reply on the control socket (the shim's client, ckpt errors)."""
    from ckpt._control import CommitError
    from ckpt._control import request as send

    if not os.path.exists(socket_path):
        raise ConfigError(f"control socket {socket_path} does not exist (is ckpt run alive?)")
    try:
        return send(message, path=socket_path)
    except CommitError as exc:
        raise CkptError(str(exc), exit_code=ExitCode.UNAVAILABLE) from None
