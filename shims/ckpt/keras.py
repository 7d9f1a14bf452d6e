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
import os
import sys
import zipfile
from pathlib import Path
from typing import Any

import keras

import ckpt
from ckpt._adapter import CommittingCallback, Stamp, fingerprint
from ckpt._checkpoint import is_temp
from ckpt._fs import create_beside

__all__ = ["CkptCallback", "resume_path"]


def _whole(p: Path) -> bool:
    """Not a temp name, and a zip with its end record (`.keras` files are zips;
    one cut short by a crash has none)."""
    if is_temp(p.name):
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
class CkptCallback(CommittingCallback, keras.callbacks.Callback):  # type: ignore[misc]
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
        self.directory = Path(directory) if directory is not None else ckpt.checkpoint().path
        self.filename = filename
        self._seen: frozenset[Stamp] = frozenset()
        self._init_committing(wait, timeout)

    # -- hooks

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._seen = fingerprint([self.directory])

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
        now = fingerprint([self.directory])
        if now != self._seen:
            self._seen = now
            self._commit("the checkpoint ModelCheckpoint saved")

    def _save_preempted(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / self.filename
        # ".NAME.tmp.RANDOM.keras": a temp name (never snapshotted) with the suffix keras wants
        suffix = ".weights.h5" if self.filename.endswith(".weights.h5") else ".keras"
        tmp = self.directory / f".{self.filename}.tmp.{os.urandom(8).hex()}{suffix}"
        try:
            # Made first (never through a link, never an existing file, the
            # mode of the file it replaces); keras then rewrites it.
            os.close(create_beside(tmp, final))
            if suffix == ".keras":
                self.model.save(str(tmp))
            else:
                self.model.save_weights(str(tmp))
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self._seen = fingerprint([self.directory])  # our own save: committed just below
        snapshot = self._commit(f"the preemption checkpoint {final}")
        print(
            f"ckpt: preemption warning: saved {final}"
            + (f", committed as snapshot {snapshot}" if snapshot else ""),
            file=sys.stderr,
            flush=True,
        )
