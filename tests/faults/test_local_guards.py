"""Data-loss guards on the local side, through the real binary: what a restore
replaces is moved aside unless a restorable snapshot holds it, a push of an
empty dir never empties a history, and a --dir that cannot be swapped by a
rename (a mount point, a read-only parent) is restored in place, never left
half-restored.

- `ckpt run` over a --dir older than the remote's snapshot, holding a file in
  no snapshot (mtime 2024): the file is moved to `.NAME.ckpt-kept-*` beside
  --dir, byte for byte, and the console says where; `ckpt restore --force`
  and a rank's "differs from snapshot" replacement do the same; a --dir that
  holds a restorable snapshot exactly leaves nothing behind.
- `ckpt push EMPTY REPO --keep 1` over a history: refused (78) naming
  --allow-empty, the remote unchanged; with the flag it goes through.
- A tmpfs mounted at --dir (a fresh volume, and one holding old files) and a
  writable --dir bind-mounted under a read-only parent: restored in place,
  the old files kept inside --dir; `ckpt restore --force` into the mount.
- A move in place cut short (the state a kill -9 leaves in either phase,
  and real kill -9s during the move of a dir of many entries): the next
  start finishes it; nothing is lost, the dir ends whole.

Mounting needs root (or skips with the reason).
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import CKPT
from integration._util import PY, manifests, wait_for

from ._io import _as_root, _run, _unmount, ckpt, one_error, tree
from ._tally import record

pytestmark = pytest.mark.timeout(300)

CONFIG = 78
OLD_NS = 1_704_067_200 * 10**9  # 2024-01-01: older than any snapshot a test takes
KIND = "data-loss guard: local"


def _ok(res: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stderr}"
    return res


def _write(path: Path, data: bytes, *, old: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if old:
        os.utime(path, ns=(OLD_NS, OLD_NS))


def _files(root: Path) -> dict[str, bytes]:
    return {k: v for k, (kind, v) in tree(root).items() if kind == "file" and isinstance(v, bytes)}


def _kept(where: Path, name: str | None = None) -> list[Path]:
    """Kept dirs: `.NAME.ckpt-kept-*` beside a dir (name given) or `.ckpt-kept-*` inside."""
    prefix = f".{name}.ckpt-kept-" if name else ".ckpt-kept-"
    return sorted(p for p in where.iterdir() if p.name.startswith(prefix))


def _remote_with(tmp_path: Path, files: dict[str, bytes]) -> Path:
    src = tmp_path / "src"
    for rel, data in files.items():
        _write(src / rel, data)
    remote = tmp_path / "remote"
    _ok(ckpt(["push", str(src), str(remote)], cwd=tmp_path))
    return remote


def _run_args(directory: Path, remote: Path, *extra: str) -> list[str]:
    return ["run", "--dir", str(directory), "--remote", str(remote), "--debounce", "0.2",
            *extra, "--", PY, "-c", "pass"]  # fmt: skip


SNAP = {"state.txt": b"the remote's newer state\n", "sub/opt.pt": os.urandom(4096)}


# ---------------------------------------------------------------- item 2: replaced, not deleted


def test_run_moves_older_files_in_no_snapshot_aside(tmp_path: Path) -> None:
    """Injected: --dir models holding weights.bin (mtime 2024, in no snapshot)
    and an older sub/opt.pt; the remote has a newer snapshot. Asserted: the run
    restores the snapshot, and both local files are in the kept dir beside
    models, byte for byte and with their mtime; one warning names it."""
    remote = _remote_with(tmp_path, SNAP)
    models = tmp_path / "models"
    weights = os.urandom(64 * 1024)
    _write(models / "weights.bin", weights, old=True)
    _write(models / "sub" / "opt.pt", b"an older optimizer state", old=True)
    os.utime(models / "sub", ns=(OLD_NS, OLD_NS))

    res = _ok(ckpt(_run_args(models, remote), cwd=tmp_path))

    assert _files(models) == SNAP
    [kept] = _kept(tmp_path, "models")
    assert _files(kept) == {"weights.bin": weights, "sub/opt.pt": b"an older optimizer state"}
    assert (kept / "weights.bin").stat().st_mtime_ns == OLD_NS
    said = [line for line in res.stderr.splitlines() if str(kept) in line]
    assert len(said) == 1 and "no restorable snapshot" in said[0], res.stderr
    record(KIND, 1, case="run replaces an older dir")


def test_restore_force_moves_aside_only_what_no_snapshot_holds(tmp_path: Path) -> None:
    """Injected: `ckpt restore --force` over (a) a dir that holds generation 1
    exactly and (b) the same dir plus a file of its own. Asserted: (a) leaves
    no kept dir (every byte is in a restorable snapshot); (b) keeps exactly the
    file of its own."""
    remote = _remote_with(tmp_path, {"state.txt": b"one\n"})
    _write(tmp_path / "src" / "state.txt", b"two, longer\n")
    _ok(ckpt(["push", str(tmp_path / "src"), str(remote)], cwd=tmp_path))
    ck = tmp_path / "ck"
    _ok(ckpt(["restore", str(remote), str(ck), "--snapshot", "1"], cwd=tmp_path))

    _ok(ckpt(["restore", str(remote), str(ck), "--force"], cwd=tmp_path))
    assert _files(ck) == {"state.txt": b"two, longer\n"}
    assert _kept(tmp_path, "ck") == []

    _write(ck / "notes.md", b"mine alone")
    _write(ck / "state.txt", b"edited after the restore")
    _ok(ckpt(["restore", str(remote), str(ck), "--force", "--snapshot", "1"], cwd=tmp_path))
    assert _files(ck) == {"state.txt": b"one\n"}
    [kept] = _kept(tmp_path, "ck")
    assert _files(kept) == {"notes.md": b"mine alone", "state.txt": b"edited after the restore"}
    record(KIND, 2, case="restore --force")


@pytest.mark.parametrize("how", ["restore --force", "run"])
@pytest.mark.parametrize("case", ["stored chunk emptied", "same size and mtime, other bytes"])
def test_a_replaced_file_is_deleted_only_where_a_snapshot_holds_its_bytes(
    tmp_path: Path, how: str, case: str
) -> None:
    """Injected: --dir holds a file with the path, size and mtime generation
    1 stores, while (a) generation 1's chunk of it was emptied in the remote
    (what a crash leaves of a chunk on a local remote that was not fsynced)
    or (b) the file's bytes are not the stored ones (a copy that kept the
    mtime). Then the remote's generation 2 is restored over it, by `ckpt
    restore --force` or `ckpt run`. Asserted: the local file is moved aside
    byte for byte (it was deleted as "held by a restorable snapshot")."""
    remote = _remote_with(tmp_path, {"x": b"precious-A"})
    _write(tmp_path / "src" / "x", b"newer-B")
    _ok(ckpt(["push", str(tmp_path / "src"), str(remote)], cwd=tmp_path))
    ck = tmp_path / "ck"
    _ok(ckpt(["restore", str(remote), str(ck), "--snapshot", "1"], cwd=tmp_path))
    if case == "stored chunk emptied":
        first = json.loads(sorted((remote / "snapshots").iterdir())[0].read_bytes())
        (digest,) = first["entries"][0]["chunks"]
        chunk = remote / "chunks" / digest[:2] / digest
        chunk.chmod(0o600)
        chunk.write_bytes(b"")
        mine = b"precious-A"
    else:
        st = (ck / "x").stat()
        mine = b"precious-Z"  # same size
        (ck / "x").write_bytes(mine)
        os.utime(ck / "x", ns=(st.st_atime_ns, st.st_mtime_ns))

    if how == "run":
        _ok(ckpt(_run_args(ck, remote), cwd=tmp_path))
    else:
        _ok(ckpt(["restore", str(remote), str(ck), "--force"], cwd=tmp_path))
    assert _files(ck) == {"x": b"newer-B"}
    [kept] = _kept(tmp_path, "ck")
    assert _files(kept) == {"x": mine}
    record(KIND, 1, case=how)


COMMIT_STEP = """
import os, pathlib, sys, ckpt
d = pathlib.Path(os.environ["CKPT_DIR"])
(d / f"shard-{os.environ['CKPT_RANK']}.bin").write_bytes(sys.argv[1].encode())
ckpt.commit(step=int(sys.argv[2]))
"""


def test_rank_replacement_moves_files_in_no_snapshot_aside(tmp_path: Path) -> None:
    """Injected: both ranks of 2 commit step 10; rank 0's --dir then gets a
    file of its own and an edited shard (both older than the snapshot).
    Asserted: rank 0's next start restores step 10 ("differs from snapshot")
    and the two local files are kept beside its --dir."""
    remote = tmp_path / "remote"
    script = tmp_path / "commit_step.py"
    script.write_text(COMMIT_STEP)
    dirs = [tmp_path / "r0", tmp_path / "r1"]
    for rank in (0, 1):
        args = ["run", "--dir", str(dirs[rank]), "--remote", str(remote), "--rank", str(rank),
                "--world-size", "2", "--", PY, str(script), f"rank {rank} at 10", "10"]  # fmt: skip
        _ok(ckpt(args, cwd=tmp_path))
    _write(dirs[0] / "shard-0.bin", b"edited by hand", old=True)
    _write(dirs[0] / "scratch.txt", b"in no snapshot", old=True)

    args = ["run", "--dir", str(dirs[0]), "--remote", str(remote), "--rank", "0",
            "--world-size", "2", "--", PY, "-c", "pass"]  # fmt: skip
    res = _ok(ckpt(args, cwd=tmp_path))

    assert "differs from snapshot" in res.stderr, res.stderr
    assert _files(dirs[0]) == {"shard-0.bin": b"rank 0 at 10"}
    [kept] = _kept(tmp_path, "r0")
    assert _files(kept) == {"shard-0.bin": b"edited by hand", "scratch.txt": b"in no snapshot"}
    record(KIND, 1, case="rank replacement")


def test_push_of_an_empty_dir_over_a_history_needs_allow_empty(tmp_path: Path) -> None:
    """Injected: `ckpt push EMPTY REPO --keep 1` over a remote whose newest
    snapshot holds files. Asserted: 78, one line naming --allow-empty, every
    object of the remote unchanged and still restorable; with --allow-empty
    the empty snapshot is pushed (the user asked for it) and is the newest,
    but it does not count toward --keep: the snapshot with files stays."""
    remote = _remote_with(tmp_path, SNAP)
    before = tree(remote)
    empty = tmp_path / "empty"
    empty.mkdir()

    res = ckpt(["push", str(empty), str(remote), "--keep", "1"], cwd=tmp_path)

    assert res.returncode == CONFIG, res.stderr
    one_error(res, str(empty), "--allow-empty")
    assert tree(remote) == before
    _ok(ckpt(["restore", str(remote), str(tmp_path / "back")], cwd=tmp_path))
    assert _files(tmp_path / "back") == SNAP

    _ok(ckpt(["push", str(empty), str(remote), "--keep", "1", "--allow-empty"], cwd=tmp_path))
    by_generation = sorted(manifests(remote), key=lambda m: m["generation"])
    assert [len(m["entries"]) > 0 for m in by_generation] == [True, False]
    old = by_generation[0]["id"]
    _ok(ckpt(["restore", str(remote), str(tmp_path / "old"), "--snapshot", old], cwd=tmp_path))
    assert _files(tmp_path / "old") == SNAP
    record(KIND, 1, case="push of an empty dir")


def test_a_run_on_an_empty_dir_with_no_restore_keeps_the_snapshot_with_files(
    tmp_path: Path,
) -> None:
    """Injected: `ckpt run --no-restore --keep 1` on an empty --dir over a
    remote whose only snapshot holds files, the child writing nothing.
    Asserted: the run snapshots the empty dir (the truth, what a restore now
    picks), and the snapshot with files is still there and restores byte for
    byte: an empty snapshot never counts toward --keep (it used to drop the
    only copy of the files)."""
    remote = _remote_with(tmp_path, SNAP)
    (old,) = [m["id"] for m in manifests(remote)]
    ck = tmp_path / "ck"
    ck.mkdir()
    args = ["run", "--no-restore", "--keep", "1", "--dir", str(ck), "--remote", str(remote)]
    _ok(ckpt([*args, "--", PY, "-c", "pass"], cwd=tmp_path))
    _ok(ckpt([*args, "--", PY, "-c", "pass"], cwd=tmp_path))  # and again: no pile-up
    by_generation = sorted(manifests(remote), key=lambda m: m["generation"])
    assert by_generation[0]["id"] == old
    assert [len(m["entries"]) > 0 for m in by_generation] == [True, False]
    _ok(ckpt(["restore", str(remote), str(tmp_path / "back"), "--snapshot", old], cwd=tmp_path))
    assert _files(tmp_path / "back") == SNAP
    record(KIND, 1, case="run --no-restore on an empty dir")


# ---------------------------------------------------------------- item 4: mount points


def _mount(argv: list[str]) -> None:
    res = _run(argv)
    if res.returncode != 0:
        pytest.skip(f"{' '.join(argv[:3])} failed: {res.stderr.strip()}")


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs mounted at tmp_path/vol (root only)."""
    if not _as_root():
        pytest.skip("mounting a volume at --dir needs root")
    vol = tmp_path / "vol"
    vol.mkdir()
    _mount(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(vol)])
    try:
        yield vol
    finally:
        _unmount(vol)


def test_a_snapshots_lost_and_found_is_restored_into_the_volumes_own(
    tmp_path: Path, volume: Path
) -> None:
    """Injected: a snapshot taken of a volume's root holds lost+found/lf (a
    file fsck once put there); the new volume at --dir has a lost+found of
    its own (with a file of its own). Asserted: the restore in place puts
    lost+found/lf into the volume's lost+found beside what was there; it was
    dropped with the staging dir while the restore said it restored it."""
    remote = _remote_with(tmp_path, {**SNAP, "lost+found/lf": b"found by fsck\n"})
    own = volume / "lost+found"
    own.mkdir()
    (own / "#1234").write_bytes(b"the new volume's own")
    _ok(ckpt(["restore", str(remote), str(volume), "--force"], cwd=tmp_path))
    assert _files(volume) == {
        **SNAP,
        "lost+found/lf": b"found by fsck\n",
        "lost+found/#1234": b"the new volume's own",
    }
    assert not [p for p in volume.iterdir() if p.name.startswith(".ckpt-restore-")]
    record(KIND, 1, case="lost+found on a volume")


def test_a_fresh_volume_at_dir_is_restored(tmp_path: Path, volume: Path) -> None:
    """Injected: --dir is a freshly mounted, empty tmpfs (a new volume after a
    preemption). Asserted: exit 0, the snapshot restored into it, the mount
    still there, no temp or marker left."""
    remote = _remote_with(tmp_path, SNAP)
    res = _ok(ckpt(_run_args(volume, remote), cwd=tmp_path))
    assert os.path.ismount(volume)
    assert _files(volume) == SNAP
    assert sorted(p.name for p in volume.iterdir()) == ["state.txt", "sub"], res.stderr
    record(KIND, 1, case="fresh volume at --dir")


def test_a_volume_with_old_files_is_restored_in_place(tmp_path: Path, volume: Path) -> None:
    """Injected: the volume at --dir holds an older file in no snapshot.
    Asserted: `ckpt run` restores in place and keeps the file inside the
    volume (`.ckpt-kept-*`: the parent is another filesystem); then
    `ckpt restore --force` into the mount works too and keeps nothing new."""
    remote = _remote_with(tmp_path, SNAP)
    _write(volume / "weights.bin", b"old weights", old=True)
    res = _ok(ckpt(_run_args(volume, remote), cwd=tmp_path))
    assert "restored in place" in res.stderr, res.stderr
    assert _files(volume) == {
        **SNAP,
        **{f"{k.name}/weights.bin": b"old weights" for k in _kept(volume)},
    }
    assert len(_kept(volume)) == 1

    res = _ok(ckpt(["restore", str(remote), str(volume), "--force"], cwd=tmp_path))
    assert len(_kept(volume)) == 1, res.stderr
    assert os.path.ismount(volume)
    record(KIND, 2, case="volume with old files")


def test_a_writable_dir_under_a_read_only_parent(tmp_path: Path) -> None:
    """Injected: the container layout: /ckpt read-only (a read-only bind
    mount), --dir /ckpt/data a writable bind mount inside it holding an old
    file. Asserted: exit 0 (not 78), restored in place, the old file kept in
    --dir, nothing written to the read-only parent."""
    if not _as_root():
        pytest.skip("bind mounts need root")
    remote = _remote_with(tmp_path, SNAP)
    parent, data, backing = tmp_path / "ckpt", tmp_path / "ckpt" / "data", tmp_path / "backing"
    data.mkdir(parents=True)
    _write(backing / "old.txt", b"from the last job", old=True)
    _mount(["mount", "--bind", str(parent), str(parent)])
    try:
        _mount(["mount", "-o", "remount,bind,ro", str(parent)])
        _mount(["mount", "--bind", str(backing), str(data)])
        try:
            res = _ok(ckpt(_run_args(data, remote), cwd=tmp_path))
            assert _files(data) == {
                **SNAP,
                **{f"{k.name}/old.txt": b"from the last job" for k in _kept(data)},
            }, res.stderr
            assert sorted(p.name for p in parent.iterdir()) == ["data"]
        finally:
            _unmount(data)
    finally:
        _unmount(parent)
    record(KIND, 1, case="read-only parent")


# ---------------------------------------------------------------- a move in place cut short


@pytest.mark.parametrize("phase", ["out", "in"])
def test_a_move_in_place_cut_short_is_finished_by_the_next_start(
    tmp_path: Path, volume: Path, phase: str
) -> None:
    """Injected: the state a kill -9 leaves in the middle of a restore in
    place (marker written; some old entries moved to the holding dir, or
    some new ones moved in). Asserted: the next `ckpt run` finishes the move
    before deciding anything: the snapshot whole in --dir, every old file in
    the kept dir, no staging or marker left, and it says so."""
    remote = _remote_with(tmp_path, SNAP)
    staging, holding = volume / ".ckpt-restore-0badc0de", volume / ".ckpt-kept-cut-short"
    _ok(ckpt(["restore", str(remote), str(staging)], cwd=tmp_path))
    holding.mkdir()
    old = {"a.bin": b"old a", "b.bin": b"old b", "c/d.bin": b"old d"}
    for rel, data in old.items():
        _write(volume / rel, data, old=True)
    if phase == "out":
        os.rename(volume / "a.bin", holding / "a.bin")
    else:
        for name in ("a.bin", "b.bin", "c"):
            os.rename(volume / name, holding / name)
        os.rename(staging / "state.txt", volume / "state.txt")
    (volume / ".ckpt-moving").write_text(
        json.dumps({"staging": staging.name, "holding": holding.name, "phase": phase})
    )

    res = _ok(ckpt(_run_args(volume, remote), cwd=tmp_path))

    assert "interrupted" in res.stderr, res.stderr
    assert {k: v for k, v in _files(volume).items() if not k.startswith(".ckpt-")} == SNAP
    assert _files(holding) == old
    assert not staging.exists() and not (volume / ".ckpt-moving").exists()
    record(KIND, 1, case=f"move in place cut short, phase {phase}")


KILLS = 6


def _marked_or_done(volume: Path, proc: subprocess.Popen[bytes]) -> bool:
    return (volume / ".ckpt-moving").exists() or proc.poll() is not None


def test_kill_9_during_a_restore_in_place(tmp_path: Path, volume: Path) -> None:
    """Injected: kill -9 of `ckpt restore --force` into a mount point at
    seeded moments after its marker appears, the dir holding 1,500 old
    entries (a move that takes a while). Asserted, after each kill and the
    next start: --dir holds exactly the snapshot and every old file is in a
    kept dir, whatever the moment."""
    seed = int(os.environ.get("CKPT_FAULT_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    remote = _remote_with(tmp_path, SNAP)
    cut = 0
    for i in range(KILLS):
        old = {f"old-{i}-{n}.bin": f"{i}/{n}".encode() for n in range(1500)}
        for rel, data in old.items():
            _write(volume / rel, data, old=True)
        proc = subprocess.Popen(
            [str(CKPT), "restore", str(remote), str(volume), "--force", "-q"],
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(
                functools.partial(_marked_or_done, volume, proc),
                what="the restore's marker",
                interval=0.001,
            )
            time.sleep(rng.random() * 0.05)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(30)
        cut += (volume / ".ckpt-moving").exists()
        _ok(ckpt(_run_args(volume, remote), cwd=tmp_path))
        files = _files(volume)
        assert {k: v for k, v in files.items() if not k.startswith(".ckpt-")} == SNAP, seed
        in_kept = {k.split("/", 1)[1]: v for k, v in files.items() if k.startswith(".ckpt-kept-")}
        assert old.items() <= in_kept.items(), f"old files lost (seed {seed})"
        assert not any(
            p.name.startswith((".ckpt-restore-", ".ckpt-moving")) for p in volume.iterdir()
        )
        for kept in _kept(volume):  # room for the next round (the tmpfs is small)
            shutil.rmtree(kept)
    record(KIND, KILLS, case="kill -9 during a restore in place", cut_short=cut, seed=seed)
