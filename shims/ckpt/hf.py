"""Hugging Face Trainer adapter: commit after every checkpoint the Trainer
saves, ask for a save at the next step end after a preemption warning, and
find the newest complete checkpoint-N directory to resume from.

    import ckpt, ckpt.hf
    args = TrainingArguments(output_dir=str(ckpt.checkpoint().path), save_steps=100, ...)
    trainer = Trainer(model, args, ..., callbacks=[ckpt.hf.CkptCallback()])
    trainer.train(resume_from_checkpoint=ckpt.hf.resume_from_checkpoint(args.output_dir))

The Trainer calls on_save after checkpoint-N is complete on disk (model,
optimizer, RNG states, then trainer_state.json, then old checkpoints rotated
away), so the commit holds whole checkpoints. A model saved later with
trainer.save_model() is committed only by an explicit ckpt.commit().

Imports transformers when this module is imported; `import ckpt` never does.
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

import ckpt
from ckpt._adapter import CommittingCallback

__all__ = ["CkptCallback", "resume_from_checkpoint"]

_CHECKPOINT_DIR = re.compile(r"checkpoint-(\d+)")
#: Written last into checkpoint-N by the Trainer: its presence marks a whole checkpoint.
TRAINER_STATE = "trainer_state.json"


def _complete(d: Path) -> bool:
    """checkpoint-N is whole when its trainer_state.json (written last) parses."""
    try:
        state = json.loads((d / TRAINER_STATE).read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(state, dict) and "global_step" in state


def resume_from_checkpoint(output_dir: str | os.PathLike[str] | None = None) -> str | None:
    """The newest complete `checkpoint-N` directory in `output_dir` (default:
    the checkpoint directory) for `trainer.train(resume_from_checkpoint=...)`,
    or None on a fresh start. A directory whose trainer_state.json is missing
    or cut short (the save was interrupted) is skipped for the one before it."""
    root = Path(output_dir) if output_dir is not None else ckpt.checkpoint().path
    if not root.is_dir():
        return None
    found = []
    for d in root.iterdir():
        m = _CHECKPOINT_DIR.fullmatch(d.name)
        if m and d.is_dir():
            found.append((int(m.group(1)), d))
    for _, d in sorted(found, reverse=True):
        if _complete(d):
            return str(d)
    return None


def _any_rank(flag: bool, args: TrainingArguments) -> bool:
    """True if flag is set on any process: the ranks get the signal at different
    steps, and all must decide to save at the same one."""
    if args.world_size <= 1:
        return flag
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1 if flag else 0], device=args.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# (The base class is Any to mypy where transformers is not installed.)
class CkptCallback(CommittingCallback, TrainerCallback):  # type: ignore[misc,unused-ignore]
    """Commit after each save (on_save); on the checkpoint signal (a
    preemption warning from `ckpt run`) set control.should_save at the next
    step end, so that step is saved and then committed.

    wait/timeout: passed to ckpt.commit(). A failed commit is reported as a
    warning and training goes on; `last_snapshot` holds the id of the last
    successful one.
    """

    def __init__(self, *, wait: bool = True, timeout: float | None = None) -> None:
        self._init_committing(wait, timeout)

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        out = Path(args.output_dir or ".").resolve()
        root = self._cp.path.resolve()
        if (
            os.environ.get(ckpt.ENV_DIR)
            and state.is_world_process_zero
            and out != root
            and root not in out.parents
        ):
            warnings.warn(
                f"ckpt: the Trainer saves to {out}, outside the directory `ckpt run` "
                f"protects ({root}): those checkpoints are not snapshotted "
                "(set TrainingArguments(output_dir=str(ckpt.checkpoint().path)))",
                RuntimeWarning,
                stacklevel=2,
            )

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> TrainerControl:
        if _any_rank(self._preempted, args):
            self._preempted = False
            control.should_save = True
            if state.is_world_process_zero:
                print(
                    f"ckpt: preemption warning: saving checkpoint-{state.global_step} now",
                    file=sys.stderr,
                    flush=True,
                )
        return control

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> TrainerControl:
        if state.is_local_process_zero:  # one commit per node: to its supervisor
            self._commit(f"checkpoint-{state.global_step}", step=state.global_step)
        return control
