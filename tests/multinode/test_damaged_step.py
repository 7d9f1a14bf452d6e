"""A step whose part on one rank has a corrupt chunk: every rank goes back to
the step before it, the first that finds the damage marks it (ckpt run and
ckpt restore alike), instead of exit 69 ("retry later") for ever while the
previous step sits whole in the remote.

Each rank's two steps are made by a real `ckpt run` whose child commits them
(`ckpt commit --step S`); the damage is one flipped byte of a chunk only rank
1's step 20 names, written straight into the store.
"""

from __future__ import annotations

import json
from pathlib import Path

from ckpt._contract import ExitCode
from integration._util import CKPT, PY

from .conftest import Remote

#: The child of the runs that make the steps: a file per step, each committed.
MAKE_STEPS = (
    'printf "rank $CKPT_RANK step 10 %0100000d" 0 > "$CKPT_DIR/w.bin" && "$0" commit --step 10 && '
    'printf "rank $CKPT_RANK step 20 %0100000d" 0 > "$CKPT_DIR/w.bin" && "$0" commit --step 20'
)
#: The child of the replacement: what it was given, as JSON on stdout.
REPORT = (
    "import json, os, pathlib; d = pathlib.Path(os.environ['CKPT_DIR']); "
    "print('CHILD ' + json.dumps({'step': os.environ.get('CKPT_RESTORED_STEP'), "
    "'w': (d / 'w.bin').read_bytes()[:15].decode() if (d / 'w.bin').exists() else None}))"
)


def _make_steps(remote: Remote, tmp_path: Path) -> str:
    """Steps 10 and 20 on ranks 0 and 1; flip a byte of the one chunk that
    only rank 1's step 20 names. Returns that snapshot's id."""
    for rank in (0, 1):
        res = remote.ckpt(
            "run", "--rank", str(rank), "--world-size", "2",
            "--dir", str(tmp_path / f"made-{rank}"), "--remote", remote.url,
            "--", "sh", "-c", MAKE_STEPS, str(CKPT),
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
    key, doc = remote.manifest_of(1, 20)
    others = {c for r in (0, 1) for k, m in remote.manifests(r) if k != key for c in _chunks(m)}
    (digest,) = _chunks(doc) - others
    name = f"chunks/{digest[:2]}/{digest}"
    data = bytearray(remote.view.read(name))
    data[len(data) // 2] ^= 0x01
    remote.put(name, bytes(data))
    assert remote.ls()["complete_steps"][:2] == [20, 10]
    return str(doc["id"])


def _chunks(doc: dict[str, object]) -> set[str]:
    entries = doc.get("entries", [])
    assert isinstance(entries, list)
    return {c for e in entries for c in e.get("chunks", ())}


def _child(stdout: str) -> dict[str, object]:
    line = next(ln for ln in stdout.splitlines() if ln.startswith("CHILD "))
    doc: dict[str, object] = json.loads(line[len("CHILD ") :])
    return doc


def _replace(remote: Remote, tmp_path: Path, rank: int) -> tuple[str, dict[str, object]]:
    """A replacement of rank `rank` on an empty --dir whose child reports
    what it was given: (ckpt's stderr, the child's report)."""
    res = remote.ckpt(
        "run", "--rank", str(rank), "--world-size", "2", "--dir", str(tmp_path / f"new-{rank}"),
        "--remote", remote.url, "--", PY, "-c", REPORT,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return res.stderr, _child(res.stdout)


def test_a_corrupt_chunk_in_a_ranks_part_sends_every_rank_back_one_step(
    remote: Remote, tmp_path: Path
) -> None:
    damaged = _make_steps(remote, tmp_path)

    # Rank 1 meets the damage: it restores step 10, and says why.
    said, child = _replace(remote, tmp_path, 1)
    assert child == {"step": "10", "w": "rank 1 step 10 "}, said
    assert f"snapshot {damaged}" in said and "corrupt" in said, said
    assert "marked it suspect" in said, said

    # Rank 0, whose own part of step 20 is whole, starts from step 10 too.
    said, child = _replace(remote, tmp_path, 0)
    assert child == {"step": "10", "w": "rank 0 step 10 "}, said

    # ls, restore and run agree: step 20 is no longer the newest complete one.
    assert remote.ls()["complete_steps"][0] == 10
    res = remote.restore(tmp_path / "restored-1", 1, 2)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "restored-1" / "w.bin").read_bytes().startswith(b"rank 1 step 10 ")


def test_ckpt_restore_of_a_ranks_damaged_part_falls_back_too(
    remote: Remote, tmp_path: Path
) -> None:
    damaged = _make_steps(remote, tmp_path)
    res = remote.restore(tmp_path / "restored-1", 1, 2)
    assert res.returncode == ExitCode.OK, res.stderr
    assert (tmp_path / "restored-1" / "w.bin").read_bytes().startswith(b"rank 1 step 10 ")
    assert f"snapshot {damaged}" in res.stderr and "marked it suspect" in res.stderr, res.stderr
    # The mark is in the remote: rank 0 restores step 10 without reading rank 1's chunks.
    res = remote.restore(tmp_path / "restored-0", 0, 2)
    assert res.returncode == ExitCode.OK, res.stderr
    assert (tmp_path / "restored-0" / "w.bin").read_bytes().startswith(b"rank 0 step 10 ")
