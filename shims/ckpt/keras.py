"""Keras 3 adapter (any backend, e.g. KERAS_BACKEND=torch): commit after the
ModelCheckpoint callback saved, save the model at the next batch end after a
preemption warning and commit it, and find the newest whole `.keras` file.

    import ckpt, ckpt.keras
    d = ckpt.checkpoint().path
    path = ckpt.keras.resume_path()                 # None on a fresh start
    model = keras.saving.load_model(path) if path else build_and_compile()
    model.fit(x, y, callbacks=[keras.callbacks.ModelCheckpoint(str(d / "epoch-{epoch:03d}.keras")),
                               ckpt.keras.CkptCallback()])

CkptCallback sees a save by a change in the files of `directory` (default: the
checkpoint directory) at every batch end, epoch end and at the end of
training. Put it after ModelCheckpoint in the callback list and the commit
follows the save in the same hook; before it, at the next batch end.

Imports keras when this module is imported; `import ckpt` never does.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import sys
import warnings
import weakref
import zipfile
from pathlib import Path
from typing import Any

import keras

import ckpt

__all__ = ["CkptCallback", "resume_path"]

#: One file's identity for change detection: path, size, mtime, inode.
_Stamp = tuple[str, int, int, int]


def _is_temp(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in ckpt.TEMP_PATTERNS)


def _fingerprint(directory: Path) -> frozenset[_Stamp]:
    """Every non-temp file below directory, as (path, size, mtime_ns, inode)."""
    out: set[_Stamp] = set()
    for root, dirnames, filenames in os.walk(directory):
        dirnames[:] = [n for n in dirnames if not _is_temp(n)]
        for name in filenames:
            if _is_temp(name):
                continue
            p = os.path.join(root, name)
            with contextlib.suppress(OSError):
                st = os.lstat(p)
                out.add((p, st.st_size, st.st_mtime_ns, st.st_ino))
    return frozenset(out)


def _whole(p: Path) -> bool:
    """Not a temp name, and a zip with its end record (`.keras` files are zips;
    one cut short by a crash has none)."""
    if _is_temp(p.name):
        return False
    try:
        return p.is_file() and p.stat().st_size > 0 and zipfile.is_zipfile(p)
    except OSError:
        return False


def resume_path(
    dirpath: str | os.PathLike[str] | None = None, pattern: str = "*.keras"
) -> str | None:
    """The newest whole file matching `pattern` in `dirpath` (default: the
    checkpoint directory), for keras.saving.load_model(); None on a fresh
    start. Newest is the latest modification time (restores keep it)."""
    root = Path(dirpath) if dirpath is not None else ckpt.checkpoint().path
    if not root.is_dir():
        return None
    found: list[tuple[int, str, Path]] = []
    for p in root.glob(pattern):
        with contextlib.suppress(OSError):
            found.append((p.stat().st_mtime_ns, p.name, p))
    for _, _, p in sorted(found, reverse=True):
        if _whole(p):
            return str(p)
    return None


# (keras ships no type information: its base class is Any to mypy.)
class CkptCallback(keras.callbacks.Callback):  # type: ignore[misc]
    """Commit after ModelCheckpoint saved into `directory`; on the checkpoint
    signal (a preemption warning from `ckpt run`), save the model to
    `directory/filename` at the next batch end (temp name + rename) and commit.

    directory: where ModelCheckpoint writes (default: the checkpoint directory).
    filename: `*.keras` (whole model with optimizer) or `*.weights.h5`.
    wait/timeout: passed to ckpt.commit(). A failed commit is reported as a
    warning and training goes on; `last_snapshot` holds the id of the last
    successful one.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        filename: str = "preempted.keras",
        wait: bool = True,
        timeout: float | None = None,
    ) -> None:
        super().__init__()
        if not filename.endswith((".keras", ".weights.h5")):
            raise ValueError(f"filename {filename!r}: use a .keras or .weights.h5 name")
        self._cp = ckpt.checkpoint()
        self.directory = Path(directory) if directory is not None else self._cp.path
        self.filename = filename
        self.wait = wait
        self.timeout = timeout
        #: Id of the last snapshot this callback committed (None before any).
        self.last_snapshot: str | None = None
        self._seen: frozenset[_Stamp] = frozenset()
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

        ckpt.on_preemption(_on_signal)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled (e.g. in a process started by a spawn launcher): listen there too."""
        self.__dict__.update(state)
        self._listen()

    # -- hooks

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._seen = _fingerprint(self.directory)

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._commit_if_saved()
        if self._preempted:
            self._preempted = False
            self._save_preempted()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._commit_if_saved()

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._commit_if_saved()

    # -- work

    def _commit_if_saved(self) -> None:
        now = _fingerprint(self.directory)
        if now != self._seen:
            self._seen = now
            self._commit("the checkpoint ModelCheckpoint saved")

    def _commit(self, what: str) -> str | None:
        try:
            snapshot = self._cp.commit(wait=self.wait, timeout=self.timeout)
        except ckpt.CommitError as exc:
            warnings.warn(f"ckpt: commit of {what} failed: {exc}", RuntimeWarning, stacklevel=2)
            return None
        if snapshot is not None:
            self.last_snapshot = snapshot
        return snapshot

    def _save_preempted(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / self.filename
        # ".NAME.tmp.keras": a temp name (never snapshotted) with the suffix keras wants
        suffix = ".weights.h5" if self.filename.endswith(".weights.h5") else ".keras"
        tmp = self.directory / f".{self.filename}.tmp{suffix}"
        try:
            if suffix == ".keras":
                self.model.save(str(tmp))
            else:
                self.model.save_weights(str(tmp))
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self._seen = _fingerprint(self.directory)  # our own save: committed just below
        snapshot = self._commit(f"the preemption checkpoint {final}")
        print(
            f"ckpt: preemption warning: saved {final}"
            + (f", committed as snapshot {snapshot}" if snapshot else ""),
            file=sys.stderr,
            flush=True,
        )
