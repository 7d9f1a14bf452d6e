"""repair: what is torn in a directory, where its whole version is, and
putting it back (the torn one kept, never deleted); repo_tools.ChunkSource."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

from ckpt_cli import repair
from ckpt_cli.formats import DEFAULT
from ckpt_cli.repository import Repository
from ckpt_cli.snapshotter import Snapshotter, scan
from ckpt_cli.verify import ChunkSource

from .helpers import CHUNK, data


def _zip(payload: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", payload)
    return buf.getvalue()


def _put(root: Path, rel: str, content: bytes) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(content)


def _snapshot(repo: Repository, root: Path) -> None:
    s = Snapshotter(repo, root, run="t")
    try:
        s.adopt((repo.snapshots() and repo.load(repo.snapshots()[0])) or None, trust_local=False)
        s.snapshot(reason="test")
    finally:
        s.close()


def test_chunk_source_reads_only_the_chunks_asked_for(
    local_repo: Repository, tmp_path: Path
) -> None:
    root = tmp_path / "d"
    whole = _zip(data(1, 5 * CHUNK))
    _put(root, "model.pt", whole)
    _snapshot(local_repo, root)
    m = local_repo.load(local_repo.snapshots()[0])
    (e,) = m.files
    src = ChunkSource(local_repo, e, m.chunk_size)
    assert src.read(CHUNK - 2, 4) == whole[CHUNK - 2 : CHUNK + 2]
    assert src.read_chunks == [0, 1]
    assert DEFAULT.check_source("model.pt", src).ok is True
    assert 2 not in src.read_chunks and 3 not in src.read_chunks  # the middle: never read
    assert src.read(len(whole) - 1, 10) == whole[-1:] and src.read(len(whole), 5) == b""


def test_a_torn_file_is_put_back_from_the_newest_whole_version(
    local_repo: Repository, tmp_path: Path
) -> None:
    root = tmp_path / "d"
    v1, v2 = _zip(b"one" * 50), _zip(b"two" * 50)
    _put(root, "model.pt", v1)
    _put(root, "log.txt", b"a")
    _snapshot(local_repo, root)
    _put(root, "model.pt", v2)
    _snapshot(local_repo, root)
    torn = v1[:40]
    _put(root, "model.pt", torn)  # the child died mid-save, in place
    _put(root, "log.txt", b"ab")
    _put(root, "new.pt", _zip(b"n")[:30])  # torn, never snapshotted
    done = repair.repair_dir(local_repo, root, (), parent=None, warn=lambda _m: None)
    assert (root / "model.pt").read_bytes() == v2
    assert (root / "log.txt").read_bytes() == b"ab"  # not torn: untouched
    assert [(t.path, ref.generation) for t, ref in done.restored] == [("model.pt", 2)]
    assert [t.path for t in done.left] == ["new.pt"] and (root / "new.pt").exists()
    assert done.kept is not None and (done.kept / "model.pt").read_bytes() == torn
    assert done.kept.parent == root and done.kept.name.startswith(".ckpt-kept-")
    # The kept dir is never snapshotted, and the next look finds nothing new.
    assert not any(le.path.startswith(".ckpt") for le in scan(root))
    again = repair.repair_dir(local_repo, root, (), parent=None, warn=lambda _m: None)
    assert not again.restored and [t.path for t in again.left] == ["new.pt"]


def test_a_torn_version_a_snapshot_recorded_is_not_a_source(
    local_repo: Repository, tmp_path: Path
) -> None:
    """The newest snapshot holds the torn bytes themselves (the old race):
    the version before it is put back."""
    root = tmp_path / "d"
    v1 = _zip(b"one" * 50)
    _put(root, "model.pt", v1)
    _snapshot(local_repo, root)
    _put(root, "model.pt", v1[:50])
    _snapshot(local_repo, root)  # recorded torn
    done = repair.repair_dir(local_repo, root, (), parent=None, warn=lambda _m: None)
    assert [ref.generation for _t, ref in done.restored] == [1]
    assert (root / "model.pt").read_bytes() == v1


def test_verified_parent_files_are_not_read_again(tmp_path: Path) -> None:
    root = tmp_path / "d"
    _put(root, "model.pt", b"PK\x03\x04 torn")
    entries = scan(root)
    (le,) = entries
    torn, _whole = repair.find_torn(root, entries, trusted={(le.path, le.size, le.mtime_ns)})
    assert torn == []
    torn, _whole = repair.find_torn(root, entries)
    assert [(t.path, t.type, t.check) for t in torn] == [("model.pt", "file", "zip")]


def test_torn_dirs_first_and_their_whole_siblings(tmp_path: Path) -> None:
    root = tmp_path / "d"
    for rel in ("checkpoint-1/optimizer.pt", "checkpoint-1/trainer_state.json"):
        _put(root, rel, b"{}" if rel.endswith(".json") else _zip(b"x"))
    _put(root, "checkpoint-2/optimizer.pt", b"PK\x03\x04")  # torn, inside a torn dir
    torn, whole = repair.find_torn(root, scan(root))
    assert [(t.path, t.type) for t in torn] == [("checkpoint-2", "dir")]
    assert whole == {"checkpoint-1": "hf-trainer"}
    assert repair.has_whole_sibling(torn[0], whole)
    done = repair.apply(
        Repository(_backend(tmp_path), CHUNK),
        root,
        torn,
        whole,
        {},
        warn=lambda _m: None,
    )
    assert [t.path for t in done.aside] == ["checkpoint-2"]
    assert not (root / "checkpoint-2").exists()
    assert done.kept is not None and (done.kept / "checkpoint-2" / "optimizer.pt").exists()
    assert sorted(os.listdir(root)) == sorted(["checkpoint-1", done.kept.name])


def _backend(tmp_path: Path):  # type: ignore[no-untyped-def]
    from ckpt_cli.backends import open_backend

    return open_backend(str(tmp_path / "empty-remote"))
