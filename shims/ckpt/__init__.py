"""`import ckpt`: what runs inside the child. Standard library only at import time.

    import ckpt
    cp = ckpt.checkpoint()          # the directory `ckpt run` protects ($CKPT_DIR)
    if cp.prev_exists(): state = cp.read()
    cp.write(new_state)             # atomic, then committed: durable when it returns
    ckpt.commit(step=1200)          # several nodes: each rank restores the newest
                                    # step that every rank committed
    if ckpt.preemption_requested(): save_now()
    raise ckpt.RecoverableError("flaky data node")   # uncaught: exit 75, retried

Framework adapters live in submodules that import their framework lazily:
ckpt.torch, ckpt.lightning, ckpt.hf, ckpt.keras.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from pathlib import Path
from types import TracebackType

from ckpt._checkpoint import PAYLOAD, Checkpoint, checkpoint, commit, latest_checkpoint
from ckpt._contract import (
    CHILD_ENV,
    ENV_ATTEMPT,
    ENV_BIN,
    ENV_CHECKPOINT_SIGNAL,
    ENV_DIR,
    ENV_RANK,
    ENV_RESTORED,
    ENV_RESTORED_STEP,
    ENV_RUN,
    ENV_SOCKET,
    ENV_WORLD_SIZE,
    TEMP_PATTERNS,
    ExitCode,
)
from ckpt._control import CommitError
from ckpt._preempt import on_preemption, preemption_requested

__all__ = [
    "CHILD_ENV",
    "ENV_ATTEMPT",
    "ENV_BIN",
    "ENV_CHECKPOINT_SIGNAL",
    "ENV_DIR",
    "ENV_RANK",
    "ENV_RESTORED",
    "ENV_RESTORED_STEP",
    "ENV_RUN",
    "ENV_SOCKET",
    "ENV_WORLD_SIZE",
    "PAYLOAD",
    "SHELL_SHIM",
    "TEMP_PATTERNS",
    "Checkpoint",
    "CommitError",
    "ExitCode",
    "RecoverableError",
    "checkpoint",
    "commit",
    "latest_checkpoint",
    "on_preemption",
    "preemption_requested",
]


#: The bash shim: `source "$(ckpt shell-shim --path)"` in a shell training script.
SHELL_SHIM = Path(__file__).with_name("ckpt.sh")


class RecoverableError(Exception):
    """Raise it (uncaught) to end the process with exit code 75: `ckpt run`
    relaunches the script, which resumes from its checkpoint."""


_previous_hook = sys.excepthook


def _excepthook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    _previous_hook(kind, value, tb)
    if issubclass(kind, RecoverableError):
        # The interpreter would exit 1 after an uncaught exception: finish the
        # normal shutdown work ourselves, then exit with the retry code.
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                stream.flush()
        atexit._run_exitfuncs()
        os._exit(ExitCode.RECOVERABLE)


sys.excepthook = _excepthook
