"""Lightning adapter: commit every checkpoint Lightning writes, save one more at
the next batch end after a preemption warning, and find the one to resume from.

    import ckpt, ckpt.lightning
    from lightning.pytorch.callbacks import ModelCheckpoint
    trainer = L.Trainer(callbacks=[ModelCheckpoint(dirpath=ckpt.checkpoint().path),
                                   ckpt.lightning.CkptCallback()])
    trainer.fit(model, ckpt_path=ckpt.lightning.resume_path())

Lightning runs ModelCheckpoint after every other callback, so CkptCallback sees
a save at the next hook (the next batch end, epoch end, or the end of
training) by a change in the files of the ModelCheckpoint directories, and
commits then: the files are whole on disk before the commit is asked for.

Imports `lightning.pytorch` (or `pytorch_lightning` where only that is
installed) when this module is imported; `import ckpt` never imports it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ckpt
from ckpt._adapter import CommittingCallback, Stamp, fingerprint
from ckpt._checkpoint import is_temp

if TYPE_CHECKING:
    import lightning.pytorch as pl
else:
    try:
        import lightning.pytorch as pl
    except ImportError:  # the standalone package
        import pytorch_lightning as pl

__all__ = ["CkptCallback", "resume_path"]


def _inside(path: Path, root: Path) -> bool:
    return path.resolve() == root.resolve() or root.resolve() in path.resolve().parents


def _whole(p: Path) -> bool:
    """A .ckpt that a reader can use: not a temp name, and either a torch.save
    zip with its end record (a truncated file has none) or a non-empty
    directory (sharded strategies write one)."""
    if is_temp(p.name):
        return False
    try:
        if p.is_dir():
            return any(True for _ in p.iterdir())
        return p.is_file() and p.stat().st_size > 0 and zipfile.is_zipfile(p)
    except OSError:
        return False


def resume_path(dirpath: str | os.PathLike[str] | None = None) -> str | None:
    """The newest complete `*.ckpt` below `dirpath` (default: the checkpoint
    directory), to pass as `trainer.fit(..., ckpt_path=...)`; None on a fresh
    start. Newest is the latest modification time (restores keep it); files
    cut short by a crash and temp names are skipped."""
    root = Path(dirpath) if dirpath is not None else ckpt.checkpoint().path
    if not root.is_dir():
        return None
    found: list[tuple[int, str, Path]] = []
    for p in root.rglob("*.ckpt"):
        if any(is_temp(part) for part in p.relative_to(root).parts):
            continue
        with contextlib.suppress(OSError):
            found.append((p.stat().st_mtime_ns, p.name, p))
    for _, _, p in sorted(found, reverse=True):
        if _whole(p):
            return str(p)
    return None


def _replace(tmp: Path, final: Path) -> None:
    """Rename tmp over final; a directory in the way is moved aside first."""
    if final.is_dir() and not final.is_symlink():
        old = final.with_name(f".{final.name}.old.tmp")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


# (The base class is Any to mypy where lightning is not installed.)
class CkptCallback(CommittingCallback, pl.Callback):  # type: ignore[misc,unused-ignore]
    """Commit after each ModelCheckpoint save; on the checkpoint signal (a
    preemption warning from `ckpt run`), save `filename` at the next batch
    end and commit it.

    dirpath: where the preemption checkpoint goes (default: the first
    ModelCheckpoint's directory, else the checkpoint directory).
    wait/timeout: passed to ckpt.commit(). A failed commit is reported as a
    warning and training goes on; `last_snapshot` holds the id of the last
    successful one.
    """

    def __init__(
        self,
        *,
        dirpath: str | os.PathLike[str] | None = None,
        filename: str = "preempted.ckpt",
        wait: bool = True,
        timeout: float | None = None,
    ) -> None:
        super().__init__()
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.filename = filename
        self._watched: list[Path] = []
        self._seen: frozenset[Stamp] = frozenset()
        self._init_committing(wait, timeout)

    # -- hooks

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # ModelCheckpoint resolved its directory in setup(), which ran by now.
        dirs = []
        for cb in trainer.checkpoint_callbacks:
            raw = getattr(cb, "dirpath", None)
            if raw:
                dirs.append(Path(raw))
        self._watched = dirs
        if os.environ.get(ckpt.ENV_DIR) and trainer.is_global_zero:
            for d in dirs:
                if not _inside(d, self._cp.path):
                    warnings.warn(
                        f"ckpt: ModelCheckpoint saves to {d}, outside the directory "
                        f"`ckpt run` protects ({self._cp.path}): those files are not "
                        "snapshotted (set ModelCheckpoint(dirpath=ckpt.checkpoint().path))",
                        RuntimeWarning,
                        stacklevel=2,
                    )
        self._seen = fingerprint(self._watched)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._commit_if_saved(trainer)
        # Every rank must decide at the same step (the signal reaches them at different ones).
        preempted = trainer.strategy.reduce_boolean_decision(self._preempted, all=False)
        if preempted:
            self._preempted = False
            self._save_preempted(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._commit_if_saved(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._commit_if_saved(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._commit_if_saved(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._watched:
            self._commit_if_saved(trainer)

    # -- work

    def _commit_if_saved(self, trainer: pl.Trainer) -> None:
        now = fingerprint(self._watched)
        if now != self._seen:
            self._seen = now
            self._commit_rank0(trainer, "the checkpoint ModelCheckpoint saved")

    def _commit_rank0(self, trainer: pl.Trainer, what: str) -> str | None:
        """Commit (local rank 0 only: one request per node, to its supervisor)."""
        if trainer.local_rank != 0:
            return None
        return self._commit(what, step=int(trainer.global_step))

    def _save_preempted(self, trainer: pl.Trainer) -> None:
        if self.dirpath is not None:
            directory = self.dirpath
        elif self._watched:
            directory = self._watched[0]
        else:
            directory = self._cp.path
        final = directory / self.filename
        tmp = directory / f".{self.filename}.tmp"  # a temp name: never snapshotted
        if trainer.is_global_zero:
            directory.mkdir(parents=True, exist_ok=True)
            if tmp.is_dir():
                shutil.rmtree(tmp)
        trainer.strategy.barrier("ckpt.preempted.prepare")
        trainer.save_checkpoint(tmp)  # every rank: sharded strategies write together
        if trainer.is_global_zero:
            _replace(tmp, final)
        trainer.strategy.barrier("ckpt.preempted.rename")
        self._seen = fingerprint(self._watched)  # our own save: committed just below
        snapshot = self._commit_rank0(trainer, f"the preemption checkpoint {final}")
        if trainer.is_global_zero:
            print(
                f"ckpt: preemption warning: saved {final} at step {trainer.global_step}"
                + (f", committed as snapshot {snapshot}" if snapshot else ""),
                file=sys.stderr,
                flush=True,
            )
