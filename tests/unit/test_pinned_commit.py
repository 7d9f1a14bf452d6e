"""Snapshotter.pin() + snapshot(pinned=...): the state at the pin, or a loud failure.

A pin scans the directory and holds every regular file open. A writer that
replaces a file (temp name + rename) after the pin cannot change the commit:
the old inode stays readable through the pinned descriptor. A writer that
changes a pinned file in place before it is read makes the commit fail with
TornCommitError, and nothing is written for it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from ckpt_cli.manifest import Manifest
from ckpt_cli.repository import Repository
from ckpt_cli.restore import restore
from ckpt_cli.snapshotter import Pinned, Snapshotter, TornCommitError

from .helpers import CHUNK, OLD_NS, data, write

MakeSnap = Callable[..., Snapshotter]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


def _open_fds_on(path: Path) -> int:
    """Descriptors of this process open on `path` (also once it is deleted)."""
    wanted = {str(path), f"{path} (deleted)"}
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") in wanted:
                count += 1
        except OSError:
            continue
    return count


def _restored(repo: Repository, manifest: Manifest, dest: Path) -> dict[str, bytes]:
    done = restore(repo, dest, snapshot=manifest.id, warn=lambda _msg: None)
    assert done is not None and done.manifest.id == manifest.id
    return {
        p.relative_to(dest).as_posix(): p.read_bytes()
        for p in sorted(dest.rglob("*"))
        if p.is_file()
    }


def _replace(path: Path, content: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(content)
    os.replace(tmp, path)


# ---------------------------------------------------- changed in place: loud failure


@pytest.mark.parametrize("how", ["overwrite-same-size", "append", "truncate"])
def test_pinned_file_changed_in_place_fails_the_commit_and_writes_nothing(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap, how: str
) -> None:
    big = write(root / "model.bin", data(1, 5 * CHUNK + 17))
    write(root / "other.txt", b"other")
    snap = make_snapshotter(local_repo, root)
    pinned = snap.pin()
    assert _open_fds_on(big) == 1, "pin() holds the file open"

    with open(big, "r+b") as f:  # in place: same inode
        if how == "overwrite-same-size":
            f.seek(-CHUNK, os.SEEK_END)
            f.write(data(2, CHUNK))
        elif how == "append":
            f.seek(0, os.SEEK_END)
            f.write(b"garbage at the end")
        else:
            f.truncate(CHUNK)

    with pytest.raises(TornCommitError, match=r"model\.bin.*changed in place"):
        snap.snapshot(reason="commit", pinned=pinned)

    assert local_repo.snapshots() == [], "a torn commit writes no manifest"
    assert snap.parent is None
    assert pinned.fds == {}
    assert _open_fds_on(big) == 0, "the pinned descriptors are closed after a failure"


def test_torn_commit_keeps_the_parent_and_the_next_commit_takes_the_new_content(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap, tmp_path: Path
) -> None:
    f = write(root / "model.bin", data(1, 3 * CHUNK))
    snap = make_snapshotter(local_repo, root)
    first = snap.snapshot(reason="commit", pinned=snap.pin()).manifest
    assert first is not None

    write(f, data(2, 3 * CHUNK), mtime_ns=OLD_NS + 10**9)  # a new version, finished
    pinned = snap.pin()
    with open(f, "r+b") as fh:  # ... and changed in place again after the pin
        fh.write(b"torn")
    with pytest.raises(TornCommitError):
        snap.snapshot(reason="commit", pinned=pinned)
    assert snap.parent == first
    assert [r.id for r in local_repo.snapshots()] == [first.id]

    # The writer finished: the next commit takes what is on disk now.
    now = f.read_bytes()
    again = snap.snapshot(reason="commit", pinned=snap.pin()).manifest
    assert again is not None and again.parent == first.id
    assert _restored(local_repo, again, tmp_path / "out") == {"model.bin": now}


def test_file_unchanged_since_the_last_snapshot_changed_in_place_after_the_pin(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap, tmp_path: Path
) -> None:
    """Its content at the pin is already in the remote (same size, mtime, inode):
    the commit records that, without reading the file, and does not fail."""
    v1 = data(1, 2 * CHUNK)
    f = write(root / "model.bin", v1)
    write(root / "step.txt", b"1")
    snap = make_snapshotter(local_repo, root)
    first = snap.snapshot(reason="t").manifest
    assert first is not None
    write(root / "step.txt", b"2", mtime_ns=OLD_NS + 10**9)  # so the commit has news

    pinned = snap.pin()
    with open(f, "r+b") as fh:
        fh.write(b"in place, after the pin")
    result = snap.snapshot(reason="commit", pinned=pinned)

    assert result.manifest is not None
    assert _restored(local_repo, result.manifest, tmp_path / "out") == {
        "model.bin": v1,
        "step.txt": b"2",
    }
    assert _open_fds_on(f) == 0


# ---------------------------------------------------- replaced or deleted: the pinned content


def test_file_replaced_by_rename_after_the_pin_keeps_its_pinned_content(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap, tmp_path: Path
) -> None:
    old = data(1, 4 * CHUNK + 3)
    f = write(root / "model.bin", old)
    write(root / "state.json", b'{"step": 1}')
    snap = make_snapshotter(local_repo, root)
    pinned = snap.pin()

    _replace(f, data(2, 4 * CHUNK + 3))  # same size, new inode
    _replace(root / "state.json", b'{"step": 2}')
    write(root / "later.txt", b"written after the pin")
    (root / "sub").mkdir()

    result = snap.snapshot(reason="commit", pinned=pinned)

    m = result.manifest
    assert m is not None
    assert [e.path for e in m.entries] == ["model.bin", "state.json"]
    assert _restored(local_repo, m, tmp_path / "out") == {
        "model.bin": old,
        "state.json": b'{"step": 1}',
    }
    assert _open_fds_on(f) == 0
    # The directory itself moved on: a commit now sees the new state.
    again = snap.snapshot(reason="commit", pinned=snap.pin()).manifest
    assert again is not None
    assert sorted(e.path for e in again.entries) == [
        "later.txt",
        "model.bin",
        "state.json",
        "sub",
    ]


def test_file_deleted_after_the_pin_is_still_in_the_commit(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap, tmp_path: Path
) -> None:
    content = data(3, 2 * CHUNK)
    f = write(root / "gone.bin", content)
    snap = make_snapshotter(local_repo, root)
    pinned = snap.pin()
    f.unlink()
    assert _open_fds_on(f) == 1

    m = snap.snapshot(reason="commit", pinned=pinned).manifest

    assert m is not None
    assert _restored(local_repo, m, tmp_path / "out") == {"gone.bin": content}
    assert _open_fds_on(f) == 0


def test_pin_of_a_missing_directory_is_empty(
    local_repo: Repository, tmp_path: Path, make_snapshotter: MakeSnap
) -> None:
    snap = make_snapshotter(local_repo, tmp_path / "missing")
    pinned = snap.pin()
    assert isinstance(pinned, Pinned)
    assert pinned.entries == [] and pinned.fds == {}
    assert snap.snapshot(reason="commit", pinned=pinned).manifest is None
    assert local_repo.snapshots() == []
