"""The directory formats: is a checkpoint directory whole? Decided from
names alone (the directory's listing, its siblings', and which paths changed
since the last snapshot), no file is read.

- HF Trainer `checkpoint-N/`: has its trainer_state.json (Trainer's
  _save_checkpoint, transformers 5.23, writes it after the model, the
  optimizer, scheduler and RNG state). Told from other `checkpoint-N/` dirs
  (accelerate's save_state, diffusers' scripts) by a file only the Trainer
  writes (training_args.bin, optimizer.pt, scheduler.pt, scaler.pt,
  rng_state*.pth) or a sibling `checkpoint-M/` with a trainer_state.json;
  until one of these exists (the weights of the very first save) it is not
  recognised.
- torch.distributed.checkpoint (a dir with `*.distcp`): has `.metadata`, or
  `__R.metadata` for every rank R of its `__R_*.distcp` files (without
  collectives); FileSystemWriter.finish writes it last, by rename.
- orbax step dir (`_CHECKPOINT_METADATA` or `commit_success.txt` in it, or
  a step name beside steps that have one): when the commit-file convention
  is in use (the dir or a sibling step has commit_success.txt:
  CommitFileTemporaryPath writes it last), it has its commit_success.txt.
  With the default rename convention a step is whole once it has its final
  name; the temp names (`*.orbax-checkpoint-tmp*`) are snapshotter patterns.
- `changed` (paths added or modified since the last snapshot): a directory
  whose data was written again must have its marker written again too
  (optimizer.pt rewritten in an existing checkpoint-N/ without a new
  trainer_state.json, .distcp files without a new .metadata: a save in
  progress over an older one).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping

from ckpt_cli.formats.checks import UNRECOGNISED, Verdict

_HF_DIR = re.compile(r"checkpoint-\d+")
_HF_OWN = re.compile(
    r"training_args\.bin|optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth"
)
HF_STATE = "trainer_state.json"
_DCP_META = re.compile(r"\.metadata|__\d+\.metadata")
_DCP_RANK = re.compile(r"__(\d+)_")
_ORBAX_STEP = re.compile(r"(?:.*_)?\d+")
ORBAX_META = "_CHECKPOINT_METADATA"
ORBAX_COMMIT = "commit_success.txt"


def check_dir(
    rel: str,
    names: Collection[str],
    *,
    siblings: Mapping[str, Collection[str]] | None = None,
    changed: Collection[str] = (),
) -> Verdict:
    """The directory `rel` holding `names` (its direct children) is a whole
    checkpoint of a format it is recognised as; `siblings`: the other
    directories beside it (name -> their children's names)."""
    siblings = siblings or {}
    base = rel.rpartition("/")[2]
    verdicts = [
        v
        for v in (
            _hf_trainer(rel, base, names, siblings, changed),
            _dcp(rel, names, changed),
            _orbax(base, names, siblings),
        )
        if v is not None
    ]
    return next((v for v in verdicts if v.ok is False), verdicts[0] if verdicts else UNRECOGNISED)


def _hf_trainer(
    rel: str,
    base: str,
    names: Collection[str],
    siblings: Mapping[str, Collection[str]],
    changed: Collection[str],
) -> Verdict | None:
    if not _HF_DIR.fullmatch(base):
        return None
    own = [n for n in names if _HF_OWN.fullmatch(n)]
    beside = any(_HF_DIR.fullmatch(s) and HF_STATE in kids for s, kids in siblings.items())
    if not own and HF_STATE not in names and not beside:
        return None  # not told from accelerate's or diffusers' checkpoint-N
    if HF_STATE not in names:
        return Verdict(
            False, "hf-trainer", f"hf-trainer: no {HF_STATE} yet (the Trainer writes it last)"
        )
    again = sorted(n for n in own if f"{rel}/{n}" in changed)
    if again and f"{rel}/{HF_STATE}" not in changed:
        return Verdict(
            False, "hf-trainer", f"hf-trainer: {again[0]} written again, {HF_STATE} not yet"
        )
    return Verdict(True, "hf-trainer")


def _dcp(rel: str, names: Collection[str], changed: Collection[str]) -> Verdict | None:
    data = [n for n in names if n.endswith(".distcp")]
    if not data:
        return None
    metas = [n for n in names if _DCP_META.fullmatch(n)]
    if ".metadata" not in names:
        ranks = {m.group(1) for n in data if (m := _DCP_RANK.match(n))}
        if not metas or any(f"__{r}.metadata" not in names for r in ranks):
            return Verdict(False, "torch-dcp", "torch-dcp: no .metadata yet (written last)")
    rewritten = any(f"{rel}/{n}" in changed for n in data)
    if rewritten and not any(f"{rel}/{n}" in changed for n in metas):
        return Verdict(False, "torch-dcp", "torch-dcp: data written again, .metadata not yet")
    return Verdict(True, "torch-dcp")


def _orbax(
    base: str, names: Collection[str], siblings: Mapping[str, Collection[str]]
) -> Verdict | None:
    beside = any(ORBAX_COMMIT in kids for s, kids in siblings.items() if _ORBAX_STEP.fullmatch(s))
    step = ORBAX_META in names or ORBAX_COMMIT in names or (beside and _ORBAX_STEP.fullmatch(base))
    if not step:
        return None
    if (beside or ORBAX_COMMIT in names) and ORBAX_COMMIT not in names:
        return Verdict(False, "orbax", f"orbax: no {ORBAX_COMMIT} yet (written last)")
    return Verdict(True, "orbax")
