"""PyTorch adapter: `torch.save` into the checkpoint directory through a temp
name and a rename, then commit; `torch.load` it back on the next attempt.

    import ckpt.torch
    state = ckpt.torch.load("state.pt")            # None on a fresh start
    ...
    ckpt.torch.save({"model": model.state_dict(), "step": step}, "state.pt")

save() returns once the snapshot holding the file is durable in the remote
(`ckpt run`), so the script may go on and overwrite it. Call it from one
process per node (rank 0) in distributed jobs. Imports torch when save() or
load() is called, never at import time; `import ckpt` does not import this module.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Any

import ckpt
from ckpt._fs import create_beside

__all__ = ["load", "path", "save"]


def path(name: str | os.PathLike[str]) -> Path:
    """Where `name` lives: inside the checkpoint directory, never outside it."""
    rel = Path(name)
    if rel.is_absolute() or not rel.parts or ".." in rel.parts:
        raise ValueError(
            f"{os.fspath(name)!r}: give a path relative to the checkpoint directory, without '..'"
        )
    return ckpt.checkpoint().path / rel


def save(
    obj: object,
    name: str | os.PathLike[str],
    *,
    commit: bool = True,
    wait: bool = True,
    timeout: float | None = None,
    step: int | None = None,
    **torch_save_kwargs: Any,
) -> str | None:
    """`torch.save(obj)` to `name` in the checkpoint directory, atomically: the
    bytes go to a temp name (never snapshotted) that is renamed over `name`.
    Then commit (unless commit=False) and return the snapshot id (None outside
    `ckpt run`); `step` tags the commit with the training step (several nodes:
    see ckpt.commit). Raises ckpt.CommitError if the snapshot could not be made durable."""
    import torch

    target = path(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    try:
        # Never through a link, never an existing file; target's mode if it
        # exists, so a private checkpoint stays private when rewritten.
        with os.fdopen(create_beside(tmp, target), "wb") as f:
            torch.save(obj, f, **torch_save_kwargs)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if not commit:
        return None
    return ckpt.checkpoint().commit(wait=wait, timeout=timeout, step=step)


def load(name: str | os.PathLike[str], **torch_load_kwargs: Any) -> Any:
    """`torch.load` of `name` in the checkpoint directory, or None if it does
    not exist (a fresh start). Keyword arguments go to torch.load (map_location,
    weights_only, ...)."""
    target = path(name)
    if not target.is_file():
        return None
    import torch

    return torch.load(target, **torch_load_kwargs)
