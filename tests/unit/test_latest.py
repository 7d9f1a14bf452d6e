"""ckpt.latest_checkpoint(): the newest complete entry of a checkpoint directory.

Newest = the highest number in the name when every candidate has one, else
the latest mtime. Temp names, empty files, empty directories and framework
directories without their completion marker are never returned.
"""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ckpt import TEMP_PATTERNS, latest_checkpoint

T0 = 1_700_000_000


def _file(path: Path, content: bytes = b"weights", *, mtime: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def _hf(root: Path, step: int, *, complete: bool, mtime: float | None = None) -> Path:
    d = root / f"checkpoint-{step}"
    _file(d / "model.safetensors", b"tensors")
    if complete:
        _file(d / "trainer_state.json", json.dumps({"global_step": step}).encode())
    if mtime is not None:
        os.utime(d, (mtime, mtime))
    return d


def test_numbers_are_compared_as_numbers_not_text(tmp_path: Path) -> None:
    # epoch-2 sorts after epoch-10 as text, and is the newer file: the number wins.
    _file(tmp_path / "epoch-10.pt", mtime=T0)
    _file(tmp_path / "epoch-2.pt", mtime=T0 + 100)
    _file(tmp_path / "epoch-9.pt", mtime=T0 + 50)
    assert latest_checkpoint(tmp_path) == tmp_path / "epoch-10.pt"


def test_lightning_names_are_ordered_by_the_global_step(tmp_path: Path) -> None:
    _file(tmp_path / "epoch=9-step=900.ckpt", mtime=T0 + 10)
    _file(tmp_path / "epoch=10-step=1000.ckpt", mtime=T0)
    _file(tmp_path / "epoch=1-step=100.ckpt", mtime=T0 + 20)
    assert latest_checkpoint(tmp_path) == tmp_path / "epoch=10-step=1000.ckpt"


#: One name per temp pattern a framework writes (the supervisor's own come below).
TEMP_NAMES = [
    "epoch-99.pt.tmp",
    ".epoch-99.pt.tmp-1a2b3c4d.tmp",
    "epoch-99.pt.tmp.123",
    "epoch-99.temp",
    "epoch-99.pt.partial",
    "epoch-99.part",
    "epoch-99.swp",
    "epoch-99.pt~",
    ".#epoch-99.pt",
    "epoch-99.orbax-checkpoint-tmp-1234",
    "epoch-99.orbax-checkpoint-tmp",
    "tmp-checkpoint-99",
]


@pytest.mark.parametrize("temp", TEMP_NAMES)
def test_temp_names_are_never_returned(tmp_path: Path, temp: str) -> None:
    _file(tmp_path / "epoch-3.pt", mtime=T0)
    _file(tmp_path / temp, mtime=T0 + 100)
    assert latest_checkpoint(tmp_path) == tmp_path / "epoch-3.pt"


def test_every_temp_pattern_is_covered_above() -> None:
    """The parametrized names above match every shared temp pattern (a new
    pattern needs a new case)."""
    covered = {p for p in TEMP_PATTERNS for n in TEMP_NAMES if fnmatch.fnmatchcase(n, p)}
    # .ckpt-* and .*.ckpt-restore-* are the supervisor's own names, tested below.
    missing = set(TEMP_PATTERNS) - covered - {".ckpt-*", ".*.ckpt-restore-*"}
    assert not missing


def test_supervisor_temp_dirs_are_never_returned(tmp_path: Path) -> None:
    _file(tmp_path / "epoch-3.pt", mtime=T0)
    _file(tmp_path / ".ckpt-save-99" / "x", mtime=T0 + 100)
    _file(tmp_path / ".epoch-99.ckpt-restore-abcd" / "x", mtime=T0 + 100)
    assert latest_checkpoint(tmp_path) == tmp_path / "epoch-3.pt"


def test_zero_length_files_are_not_checkpoints(tmp_path: Path) -> None:
    _file(tmp_path / "epoch-4.pt", mtime=T0)
    _file(tmp_path / "epoch-20.pt", b"", mtime=T0 + 100)  # being written, or a crash left it
    assert latest_checkpoint(tmp_path) == tmp_path / "epoch-4.pt"


def test_empty_directories_are_not_checkpoints(tmp_path: Path) -> None:
    _file(tmp_path / "step-5" / "model.pt")
    (tmp_path / "step-50").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "step-5"


def test_dangling_symlinks_are_not_checkpoints(tmp_path: Path) -> None:
    _file(tmp_path / "epoch-4.pt")
    (tmp_path / "epoch-40.pt").symlink_to(tmp_path / "nowhere.pt")
    assert latest_checkpoint(tmp_path) == tmp_path / "epoch-4.pt"


def test_hf_checkpoint_dirs_without_trainer_state_are_incomplete(tmp_path: Path) -> None:
    done = _hf(tmp_path, 500, complete=True, mtime=T0)
    _hf(tmp_path, 1000, complete=False, mtime=T0 + 100)  # the Trainer was killed mid-save
    assert latest_checkpoint(tmp_path) == done

    finished = _hf(tmp_path, 1500, complete=True, mtime=T0 + 200)
    assert latest_checkpoint(tmp_path) == finished
    assert latest_checkpoint(tmp_path, "checkpoint-*") == finished


def test_hf_marker_is_only_required_of_checkpoint_dirs(tmp_path: Path) -> None:
    # Any other directory with something inside is complete.
    d = tmp_path / "epoch-7"
    _file(d / "weights.bin")
    assert latest_checkpoint(tmp_path) == d


def test_mtime_decides_when_names_have_no_numbers(tmp_path: Path) -> None:
    _file(tmp_path / "best.pt", mtime=T0 + 100)
    _file(tmp_path / "last.pt", mtime=T0 + 50)
    _file(tmp_path / "model.pt", mtime=T0)
    assert latest_checkpoint(tmp_path) == tmp_path / "best.pt"
    os.utime(tmp_path / "model.pt", (T0 + 200, T0 + 200))
    assert latest_checkpoint(tmp_path) == tmp_path / "model.pt"


def test_mtime_decides_when_only_some_names_have_numbers(tmp_path: Path) -> None:
    _file(tmp_path / "epoch-99.pt", mtime=T0)
    _file(tmp_path / "final.pt", mtime=T0 + 100)
    assert latest_checkpoint(tmp_path) == tmp_path / "final.pt"


def test_pattern_selects_the_candidates(tmp_path: Path) -> None:
    _file(tmp_path / "epoch-3.pt")
    _file(tmp_path / "optimizer-30.pt")
    assert latest_checkpoint(tmp_path) == tmp_path / "optimizer-30.pt"
    assert latest_checkpoint(tmp_path, "epoch-*") == tmp_path / "epoch-3.pt"
    assert latest_checkpoint(tmp_path, "*.safetensors") is None


def test_none_when_there_is_nothing(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "missing") is None
    _file(tmp_path / "epoch-1.pt.tmp")
    _file(tmp_path / "epoch-2.pt", b"")
    _hf(tmp_path, 10, complete=False)
    assert latest_checkpoint(tmp_path) is None


def test_default_root_is_the_checkpoint_dir(tmp_path: Path) -> None:
    """Without a root it looks in $CKPT_DIR (a fresh process: checkpoint() is a singleton)."""
    ck = tmp_path / "ck"
    _file(ck / "epoch-2.pt")
    _file(ck / "epoch-10.pt")
    _file(tmp_path / "epoch-99.pt")  # the cwd: not looked at
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPT_")}
    env["CKPT_DIR"] = str(ck)
    out = subprocess.run(
        [sys.executable, "-c", "import ckpt; print(ckpt.latest_checkpoint())"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(ck / "epoch-10.pt")
