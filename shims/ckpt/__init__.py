"""`import ckpt`: what runs inside the child. Standard library only at import time.

This release carries the supervisor contract (env names, exit codes); the
cooperation API (commit, restore info, preemption callbacks) builds on it.
"""

from __future__ import annotations

from ckpt._contract import (
    CHILD_ENV,
    ENV_ATTEMPT,
    ENV_DIR,
    ENV_RESTORED,
    ENV_RUN,
    ENV_SOCKET,
    ExitCode,
)

__all__ = [
    "CHILD_ENV",
    "ENV_ATTEMPT",
    "ENV_DIR",
    "ENV_RESTORED",
    "ENV_RUN",
    "ENV_SOCKET",
    "ExitCode",
]
