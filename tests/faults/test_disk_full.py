"""Disk full, on a real size-limited tmpfs (see _io.small_fs), with the real binary:

- a restore that needs more than the free space of the disk holding --dir:
  one clear error naming the dir and the full disk, the existing contents of
  --dir intact, no temp dir (or its bytes) left behind;
- the child fills the disk it checkpoints to (ENOSPC in the child): ckpt passes
  its failure on, and the last committed snapshot stays whole and restorable;
- the remote (a file:// remote on a small tmpfs) fills up during an upload:
  ckpt run ends with 69 (not durable), the local state is kept, and the remote
  still opens and restores its last complete snapshot; a remote that is full
  before ckpt writes its first object is a clean 69 and usable once space is freed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ckpt_cli.manifest import hash_bytes
from integration._util import PY, MiB, write_script

from ._io import SmallFs, ckpt, leftovers, one_error, small_fs, tree, warnings
from ._tally import record

pytestmark = pytest.mark.timeout(180)

UNAVAILABLE = 69
PAYLOAD = "payload"  # the shim's file for cp.write(bytes)


def _push(src: Path, remote: Path, cwd: Path, prefix: tuple[str, ...] = ()) -> None:
    res = ckpt(["push", str(src), str(remote)], cwd=cwd, prefix=prefix)
    assert res.returncode == 0, res.stderr


# ---------------------------------------------------------------- restore into a full disk


@pytest.mark.parametrize("shape", ["one chunk larger than the free space", "many files"])
def test_restore_larger_than_the_free_space_fails_and_leaves_the_dir_intact(
    tmp_path: Path, remote: Path, shape: str
) -> None:
    """Injected: --dir lives on a 4 MiB tmpfs that already holds the dir's own
    files; the snapshot needs more than what is free (either one file whose
    only chunk is larger than the free space, so the last write is a short
    one, or many files that fill the disk half-way through the restore).
    Asserted: exit 69 with one error naming --dir and the full disk; the dir
    keeps exactly its previous contents; no temp dir left beside it and the
    space is free again; a restore into a roomy disk still gives every byte."""
    with small_fs(tmp_path / "small", "4m") as fs:
        ck = fs.path / "ck"
        seen = fs.seen(ck)
        seen.mkdir()
        (seen / "mine.txt").write_text("local work, not in any snapshot")
        (seen / "sub").mkdir()
        (seen / "sub" / "old.bin").write_bytes(os.urandom(512 * 1024))
        before = tree(seen)
        free = fs.free()

        src = tmp_path / "src"
        src.mkdir()
        if shape == "many files":
            for i in range(6):
                (src / f"part-{i}.bin").write_bytes(os.urandom(free // 4))
        else:
            (src / "weights.bin").write_bytes(os.urandom(free + 128 * 1024))
        _push(src, remote, tmp_path)

        res = ckpt(["restore", str(remote), str(ck), "--force"], cwd=tmp_path, prefix=fs.prefix)

        assert res.returncode == UNAVAILABLE, res.stderr
        one_error(res, str(ck), "No space left on device")
        assert tree(seen) == before, "the existing contents of --dir were changed"
        assert leftovers(fs.view) == [], "temp dirs left beside --dir"
        assert sorted(p.name for p in fs.view.iterdir()) == ["ck"]
        assert fs.free() == free, "the restore's bytes were not all deleted"

    roomy = tmp_path / "roomy"
    ok = ckpt(["restore", str(remote), str(roomy)], cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert tree(roomy) == tree(src)
    record("disk full during restore")


# ---------------------------------------------------------------- the child fills the disk

#: Commits a small state through the shim, then writes until the disk is full
#: (ENOSPC: an uncaught OSError, exit 1). argv[1]: "commit" writes the big file
#: in place, "auto" (no shim commit) through a temp name it never renames.
FILLER = """
    import os, sys, time
    from pathlib import Path

    mode = sys.argv[1]
    d = Path(os.environ["CKPT_DIR"])
    if mode == "commit":
        import ckpt
        ckpt.checkpoint().write(b"state at step 1")
        big = d / "big.bin"
    else:
        tmp = d / "state.txt.tmp"
        tmp.write_text("state at step 1")
        os.replace(tmp, d / "state.txt")
        snaps = Path(sys.argv[2]) / "snapshots"
        while not (snaps.is_dir() and list(snaps.glob("[0-9]*.json"))):
            time.sleep(0.05)  # until ckpt made it durable (the remote is local)
        big = d / "big.bin.tmp"
    with open(big, "wb") as f:
        while True:
            f.write(os.urandom(256 * 1024))
"""


@pytest.mark.parametrize("mode", ["commit", "auto"])
def test_child_filling_the_disk_keeps_the_last_snapshot_whole(
    tmp_path: Path, remote: Path, mode: str
) -> None:
    """Injected: the child commits a state, then writes until the disk holding
    --dir (a 4 MiB tmpfs) is full and dies of ENOSPC (an uncaught OSError).
    Asserted: ckpt passes the child's exit 1 on with one error saying so, the
    child's own ENOSPC reaches the terminal, the newest snapshot is the
    committed state, whole, and restores byte for byte without the partial
    file; ckpt deleted nothing of the child's."""
    child = write_script(tmp_path / "filler.py", FILLER)
    with small_fs(tmp_path / "small", "4m") as fs:
        ck = fs.path / "ck"
        res = ckpt(
            [
                "run",
                "--dir",
                str(ck),
                "--remote",
                str(remote),
                "--debounce",
                "0.2",
                "--backoff",
                "0",
                "--",
                PY,
                str(child),
                mode,
                str(remote),
            ],
            cwd=tmp_path,
            prefix=fs.prefix,
        )
        assert res.returncode == 1, res.stderr
        assert "No space left on device" in res.stderr, "the child's ENOSPC was hidden"
        one_error(res, "exit code 1", child_traceback=True)
        assert fs.free() < 64 * 1024, "the disk was not full"
        local = tree(fs.seen(ck))

    state = {PAYLOAD: b"state at step 1"} if mode == "commit" else {"state.txt": b"state at step 1"}
    partial = "big.bin" if mode == "commit" else "big.bin.tmp"
    assert {k: v for k, v in local.items() if k != partial} == {
        k: ("file", v) for k, v in state.items()
    }
    assert partial in local, "ckpt deleted the child's file"

    out = tmp_path / "out"
    restored = ckpt(["restore", str(remote), str(out)], cwd=tmp_path)
    assert restored.returncode == 0, restored.stderr
    assert not warnings(restored.stderr), restored.stderr
    assert {k: v for k, v in tree(out).items()} == {k: ("file", v) for k, v in state.items()}
    record("disk full during child writes")


# ---------------------------------------------------------------- the remote fills up

#: Commits a small state (fits the remote), then a 6 MiB file that does not,
#: notes the CommitError outside --dir, and succeeds.
BIG_COMMIT = """
    import os, sys
    from pathlib import Path
    import ckpt

    d = Path(os.environ["CKPT_DIR"])
    cp = ckpt.checkpoint()
    cp.write(b"small state v1")
    tmp = d / "weights.bin.tmp"
    tmp.write_bytes(os.urandom(6 * 1024 * 1024))
    os.replace(tmp, d / "weights.bin")
    try:
        ckpt.commit()
    except ckpt.CommitError as exc:
        Path(sys.argv[1]).write_text(str(exc))
"""


def _chunks_verify(fs: SmallFs, remote: Path) -> None:
    """Every object under chunks/ is whole: its bytes hash to its name; no temp
    object was left with a final name or at all."""
    base = fs.seen(remote)
    names = [p for p in base.rglob("*") if p.is_file()]
    assert not [p.name for p in names if ".tmp-" in p.name], "temp objects left in the remote"
    for p in names:
        if p.parent.parent.name == "chunks":
            assert hash_bytes(p.read_bytes()) == p.name, f"torn chunk {p}"


def test_remote_filling_up_during_upload_ends_not_durable(tmp_path: Path) -> None:
    """Injected: the remote is a directory on a 4 MiB tmpfs; the child commits
    a small state (it fits), then a 6 MiB file (it does not: ENOSPC in the
    middle of the upload).
    Asserted: the child's commit fails with the reason; ckpt run exits 69 with
    an error naming the remote and "not durable"; the warning names the full
    disk; the local dir still has everything; the remote opens (`ckpt ls`),
    holds no torn or temp object, and restores the small state."""
    child = write_script(tmp_path / "big_commit.py", BIG_COMMIT)
    ck = tmp_path / "ck"
    commit_error = tmp_path / "commit-error.txt"
    with small_fs(tmp_path / "small", "4m") as fs:
        remote = fs.path / "remote"
        res = ckpt(
            [
                "run",
                "--dir",
                str(ck),
                "--remote",
                str(remote),
                "--debounce",
                "0.2",
                "--backoff",
                "0",
                "--flush-timeout",
                "3",
                "--",
                PY,
                str(child),
                str(commit_error),
            ],
            cwd=tmp_path,
            prefix=fs.prefix,
        )
        assert res.returncode == UNAVAILABLE, res.stderr
        assert any(
            "not durable" in line and str(remote) in line for line in res.stderr.splitlines()
        ), res.stderr
        assert any("No space left on device" in w for w in warnings(res.stderr)), res.stderr
        assert "Traceback" not in res.stderr and "unexpected error" not in res.stderr
        assert "No space left on device" in commit_error.read_text()
        _chunks_verify(fs, remote)

        listed = ckpt(["ls", str(remote), "--json"], cwd=tmp_path, prefix=fs.prefix)
        assert listed.returncode == 0, listed.stderr
        out = tmp_path / "out"
        restored = ckpt(["restore", str(remote), str(out)], cwd=tmp_path, prefix=fs.prefix)
        assert restored.returncode == 0, restored.stderr
        assert not warnings(restored.stderr), restored.stderr

    assert tree(out) == {PAYLOAD: ("file", b"small state v1")}
    local = tree(ck)
    assert local[PAYLOAD] == ("file", b"small state v1")
    assert len(local["weights.bin"][1]) == 6 * MiB, "the local state was not kept"
    record("disk full on remote")


def test_remote_full_before_the_first_object_is_a_clean_error(tmp_path: Path) -> None:
    """Injected: the remote's disk (a 1 MiB tmpfs) is full before ckpt writes
    anything, so even ckpt.json and lease.json cannot be written.
    Asserted: `ckpt push` and `ckpt run` exit 69 with one error naming the
    remote and the full disk (no crash), leave no object behind (an empty
    ckpt.json would make the remote unusable for good), and the child never
    starts; once space is freed, the same push works and restores."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "state.txt").write_text("v1")
    marker = tmp_path / "child-ran"
    with small_fs(tmp_path / "small", "1m") as fs:
        remote = fs.path / "remote"
        filler = fs.view / "filler"
        with open(filler, "wb", buffering=0) as f, pytest.raises(OSError, match="No space left"):
            while True:
                f.write(b"\0" * 65536)  # short writes until ENOSPC; nothing buffered
        for args in (
            ["push", str(src), str(remote)],
            [
                "run",
                "--dir",
                str(tmp_path / "ck"),
                "--remote",
                str(remote),
                "--",
                PY,
                "-c",
                f"open({str(marker)!r}, 'w')",
            ],
        ):
            res = ckpt(args, cwd=tmp_path, prefix=fs.prefix)
            assert res.returncode == UNAVAILABLE, res.stderr
            one_error(res, str(remote), "No space left on device")
            assert not [p for p in fs.seen(remote).rglob("*") if p.is_file()], "objects left"
        assert not marker.exists(), "the child started without a remote"

        filler.unlink()
        _push(src, remote, tmp_path, fs.prefix)
        out = tmp_path / "out"
        ok = ckpt(["restore", str(remote), str(out)], cwd=tmp_path, prefix=fs.prefix)
        assert ok.returncode == 0, ok.stderr
    assert tree(out) == {"state.txt": ("file", b"v1")}
    record("disk full on remote")
