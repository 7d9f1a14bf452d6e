"""What every framework adapter shares: hearing the checkpoint signal, committing
with a warning instead of an exception, and noticing that a framework saved.

Standard library only; the adapters (ckpt.lightning, ckpt.hf, ckpt.keras) mix
`CommittingCallback` into their framework's callback class.
"""

from __future__ import annotations

import contextlib
import os
import warnings
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ckpt._checkpoint import checkpoint, is_temp
from ckpt._control import CommitError
from ckpt._preempt import on_preemption

#: One file's identity for change detection: path, size, mtime, inode.
Stamp = tuple[str, int, int, int]


def fingerprint(dirs: Iterable[Path]) -> frozenset[Stamp]:
    """Every non-temp file below dirs, as (path, size, mtime_ns, inode)."""
    out: set[Stamp] = set()
    for d in dirs:
        for root, dirnames, filenames in os.walk(d):
            dirnames[:] = [n for n in dirnames if not is_temp(n)]
            for name in filenames:
                if is_temp(name):
                    continue
                p = os.path.join(root, name)
                with contextlib.suppress(OSError):
                    st = os.lstat(p)
                    out.add((p, st.st_size, st.st_mtime_ns, st.st_ino))
    return frozenset(out)


class CommittingCallback:
    """Mixin: `_preempted` turns True on the checkpoint signal; `_commit()` commits
    the checkpoint directory and records `last_snapshot`, warning on failure so
    training goes on."""

    def _init_committing(self, wait: bool, timeout: float | None) -> None:
        self.wait = wait
        self.timeout = timeout
        #: Id of the last snapshot this callback committed (None before any).
        self.last_snapshot: str | None = None
        self._cp = checkpoint()
        self._preempted = False
        self._listen()

    def _listen(self) -> None:
        """Have the checkpoint signal set self._preempted. The shim keeps its
        callbacks for the life of the process: it holds this object weakly."""
        ref = weakref.ref(self)

        def _on_signal() -> None:  # runs in the signal handler: only set a flag
            cb = ref()
            if cb is not None:
                cb._preempted = True

        on_preemption(_on_signal)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled (e.g. in a process started by a spawn launcher): listen there too."""
        self.__dict__.update(state)
        self._listen()

    def _commit(self, what: str, step: int | None = None) -> str | None:
        """Commit, tagged with the training step where the framework knows it
        (several nodes: each restores the newest step all of them committed)."""
        try:
            snapshot = self._cp.commit(wait=self.wait, timeout=self.timeout, step=step)
        except CommitError as exc:
            warnings.warn(f"ckpt: commit of {what} failed: {exc}", RuntimeWarning, stacklevel=3)
            return None
        if snapshot is not None:
            self.last_snapshot = snapshot
        return snapshot
