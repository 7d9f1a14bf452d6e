"""`ckpt commit`: ask the running supervisor for a snapshot now, through its
control socket; wait until it is durable.
"""

from __future__ import annotations

from typing import Any

from ckpt._contract import ExitCode
from ckpt_cli import config, console, options
from ckpt_cli.commands._request import request
from ckpt_cli.errors import CkptError, ConfigError


def commit(
    socket_path: str | None, wait: bool, timeout: float | None, step: int | None = None
) -> int:
    if not socket_path:
        raise ConfigError(
            "no supervisor to commit to: CKPT_SOCKET is not set "
            "(run under `ckpt run`, or pass --socket)"
        )
    # The flags' ranges (2) already; the control socket's own checks, for
    # callers in Python and for nan (78, as for `ckpt run --debounce nan`).
    if timeout is not None:
        config.check_number(timeout, f"--timeout {timeout:g}", min=0, max=config.MAX_SECONDS)
    if step is not None:
        config.check_number(step, f"--step {step}", integer=True, min=0, max=options.MAX_STEP)
    message: dict[str, Any] = {"op": "commit", "wait": wait, "timeout": timeout}
    if step is not None:
        message["step"] = step
    reply = request(socket_path, message)
    if not reply.get("ok"):
        # A file that is not whole or cannot be read (65: the data, not the
        # remote) fails the same commit again; anything else may pass later.
        refused = reply.get("retryable") is False
        raise CkptError(
            f"commit failed: {reply.get('error')}",
            exit_code=ExitCode.DAMAGED if refused else ExitCode.UNAVAILABLE,
        )
    if reply.get("snapshot"):
        tagged = "" if reply.get("step") is None else f" (step {reply['step']})"
        console.info(f"committed: snapshot {reply['snapshot']}{tagged} is durable")
    elif reply.get("pinned"):
        console.info("pinned: the snapshot is being uploaded")
    return ExitCode.OK
