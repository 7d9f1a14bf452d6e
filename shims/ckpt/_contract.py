"""The contract between the supervisor and the child: env names and exit codes.

Standard library only. The supervisor (`ckpt_cli`) imports this module so that
both sides share one definition; this module never imports `ckpt_cli`.
"""

from __future__ import annotations

import enum

#: Absolute path of the checkpoint directory the child should write to.
ENV_DIR = "CKPT_DIR"
#: 1 on the first launch, incremented on every relaunch by the same supervisor.
ENV_ATTEMPT = "CKPT_ATTEMPT"
#: Id of the snapshot restored into ENV_DIR before launch; empty if none.
ENV_RESTORED = "CKPT_RESTORED"
#: Path of the supervisor's control socket (newline-delimited JSON).
ENV_SOCKET = "CKPT_SOCKET"
#: Identity of this `ckpt run` invocation, the same for every attempt.
ENV_RUN = "CKPT_RUN"
#: This node's rank and the number of nodes (0 and 1 on a single node).
ENV_RANK = "CKPT_RANK"
ENV_WORLD_SIZE = "CKPT_WORLD_SIZE"
#: The training step of the global generation restored (`commit(step=)`);
#: empty when what was restored carries no step, or nothing was restored.
ENV_RESTORED_STEP = "CKPT_RESTORED_STEP"

#: Name of the signal that means "checkpoint soon" (--checkpoint-signal), e.g. SIGUSR1.
ENV_CHECKPOINT_SIGNAL = "CKPT_CHECKPOINT_SIGNAL"
#: Path of the `ckpt` executable supervising the child (for shell scripts).
ENV_BIN = "CKPT_BIN"

#: Every variable the supervisor sets in the child's environment.
CHILD_ENV = (
    ENV_DIR,
    ENV_ATTEMPT,
    ENV_RESTORED,
    ENV_SOCKET,
    ENV_RUN,
    ENV_RANK,
    ENV_WORLD_SIZE,
    ENV_RESTORED_STEP,
    ENV_CHECKPOINT_SIGNAL,
    ENV_BIN,
)

#: Names that are never part of a checkpoint: writers' temp files and
#: directories. The supervisor never snapshots them and latest_checkpoint()
#: never returns them (fnmatch patterns, matched against one path component).
TEMP_PATTERNS: tuple[str, ...] = (
    "*.tmp",
    "*.tmp.*",
    "*.temp",
    "*.partial",
    "*.part",
    "*.swp",
    "*~",
    ".#*",
    "*.orbax-checkpoint-tmp-*",
    "*.orbax-checkpoint-tmp",  # orbax >= 0.11 names a step's temp dir so, no suffix
    "tmp-checkpoint-*",
    ".ckpt-*",
    ".*.ckpt-restore-*",
)


class ExitCode(enum.IntEnum):
    """Exit statuses with a fixed meaning. A child killed by signal N is 128+N."""

    OK = 0
    #: A command line ckpt cannot parse (click's own convention).
    USAGE = 2
    #: EX_DATAERR. `ckpt verify` found damaged snapshots (an unreadable
    #: manifest, a missing or corrupt chunk); `show` and `diff` were asked
    #: for a snapshot whose manifest does not parse; `ckpt commit` was refused
    #: because a file is not whole or cannot be read (the same commit fails again).
    DAMAGED = 65
    #: The remote cannot be reached or is held by another writer: try again later.
    UNAVAILABLE = 69
    #: A bug in ckpt: a crash log was written.
    SOFTWARE = 70
    #: EX_TEMPFAIL. A child exiting with it asks to be retried.
    RECOVERABLE = 75
    #: Bad input: a flag, a path, a remote or a repository ckpt will not use.
    CONFIG = 78
    #: The cloud announced that this machine is going away (--preemption) and
    #: ckpt stopped the job and flushed its last state (see the log for whether
    #: it became durable): start `ckpt run` again on another machine.
    PREEMPTED = 79
    #: The supervisor was stopped by SIGHUP / SIGINT / SIGTERM (128 + signal).
    SIGHUP = 129
    SIGINT = 130
    SIGTERM = 143
