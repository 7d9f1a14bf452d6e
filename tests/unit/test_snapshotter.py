"""The snapshotter on a local file backend: what is read, uploaded and recorded."""

from __future__ import annotations

import errno
import io
import os
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from ckpt_cli import snapshotter
from ckpt_cli.backends import Backend, open_backend
from ckpt_cli.formats import Registry
from ckpt_cli.manifest import Manifest, hash_bytes
from ckpt_cli.repository import Repository
from ckpt_cli.restore import restore
from ckpt_cli.snapshotter import Snapshotter, UnreadableError, scan

from .helpers import CHUNK, OLD_NS, DelegatingBackend, data, write

MakeSnap = Callable[..., Snapshotter]


def _chunks_of(content: bytes) -> list[str]:
    return [hash_bytes(content[i : i + CHUNK]) for i in range(0, len(content), CHUNK)]


def _stored_chunks(repo: Repository) -> set[str]:
    return {k.rsplit("/", 1)[-1] for k in repo.backend.list("chunks/")}


def _by_path(m: Manifest) -> dict[str, object]:
    return {e.path: e for e in m.entries}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


def test_first_snapshot_reads_and_uploads_everything(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap
) -> None:
    a = data(1, 3 * CHUNK + 100)
    b = data(2, CHUNK)
    write(root / "a.bin", a)
    write(root / "sub" / "b.bin", b)
    write(root / "empty.bin", b"")
    snap = make_snapshotter(local_repo, root, run="run-x")

    result = snap.snapshot(reason="test", attempt=4)

    m = result.manifest
    assert m is not None
    assert result.parent is None
    assert result.newest is m
    assert result.files_read == 3
    assert result.bytes_read == len(a) + len(b)
    assert result.new_chunks == 5
    assert result.new_bytes == len(a) + len(b)
    assert result.unstable == []
    assert _stored_chunks(local_repo) == set(_chunks_of(a)) | set(_chunks_of(b))
    entries = _by_path(m)
    assert sorted(entries) == ["a.bin", "empty.bin", "sub", "sub/b.bin"]
    assert list(entries["a.bin"].chunks) == _chunks_of(a)  # type: ignore[attr-defined]
    assert entries["empty.bin"].chunks == ()  # type: ignore[attr-defined]
    assert entries["sub"].type == "dir"  # type: ignore[attr-defined]
    assert (m.generation, m.run, m.attempt, m.reason) == (1, "run-x", 4, "test")
    assert m.source == str(root)
    assert m.chunk_size == CHUNK
    # durable: the manifest is listed and loads back identical
    [ref] = local_repo.snapshots()
    assert local_repo.load(ref) == m


def test_duplicate_content_uploaded_once(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap
) -> None:
    same = data(3, 2 * CHUNK)
    write(root / "x", same)
    write(root / "y", same)
    # one reader thread: with several, two readers of the same digest may both
    # upload it (put_chunk is check-then-write; see the report), which is harmless
    result = make_snapshotter(local_repo, root, concurrency=1).snapshot(reason="t")
    assert result.bytes_read == 2 * len(same)
    assert result.new_chunks == 2
    assert result.new_bytes == len(same)


def test_unchanged_second_snapshot_reads_nothing(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap
) -> None:
    write(root / "a.bin", data(1, 2 * CHUNK))
    write(root / "b.bin", data(2, CHUNK + 1))
    snap = make_snapshotter(local_repo, root)
    first = snap.snapshot(reason="t").manifest
    assert first is not None

    result = snap.snapshot(reason="t")

    assert result.manifest is None
    assert result.parent == first
    assert result.newest == first
    assert result.bytes_read == 0
    assert result.files_read == 0
    assert result.new_chunks == 0
    assert len(local_repo.snapshots()) == 1


def test_racy_recent_files_are_read_again(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap
) -> None:
    """A file modified within the last second is not trusted from the stat cache."""
    content = data(1, CHUNK)
    (root / "fresh.bin").write_bytes(content)  # mtime: now
    snap = make_snapshotter(local_repo, root)
    assert snap.snapshot(reason="t").manifest is not None
    result = snap.snapshot(reason="t")
    assert result.manifest is None  # same content: no new snapshot
    assert result.bytes_read == len(content)


def test_changing_one_file_rereads_only_it(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap
) -> None:
    a = data(1, 3 * CHUNK)
    b = data(2, 3 * CHUNK)
    write(root / "a.bin", a)
    write(root / "b.bin", b)
    snap = make_snapshotter(local_repo, root)
    first = snap.snapshot(reason="t").manifest
    assert first is not None
    before = _stored_chunks(local_repo)

    # rewrite b with only its middle chunk different
    b2 = b[:CHUNK] + data(9, CHUNK) + b[2 * CHUNK :]
    write(root / "b.bin", b2, mtime_ns=OLD_NS + 10**9)
    result = snap.snapshot(reason="t")

    m = result.manifest
    assert m is not None
    assert m.parent == first.id
    assert m.generation == first.generation + 1
    assert result.files_read == 1
    assert result.bytes_read == len(b2)
    assert result.new_chunks == 1
    assert result.new_bytes == CHUNK
    assert _stored_chunks(local_repo) - before == {hash_bytes(b2[CHUNK : 2 * CHUNK])}
    entries = _by_path(m)
    assert list(entries["b.bin"].chunks) == _chunks_of(b2)  # type: ignore[attr-defined]
    assert entries["a.bin"].same_content(_by_path(first)["a.bin"])  # type: ignore[attr-defined]
    assert m.new_chunks == 1


def test_deleted_file_makes_new_snapshot_without_it(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap
) -> None:
    write(root / "a", b"a")
    write(root / "b", b"b")
    snap = make_snapshotter(local_repo, root)
    snap.snapshot(reason="t")
    (root / "b").unlink()
    m = snap.snapshot(reason="t").manifest
    assert m is not None
    assert [e.path for e in m.entries] == ["a"]


def test_temp_names_never_in_manifest(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap
) -> None:
    write(root / "keep.bin", b"keep")
    for name in (
        "a.tmp",
        "b.partial",
        "c.part",
        "d.tmp.123",
        "e.swp",
        "f~",
        ".#g",
        "tmp-checkpoint-5",
        ".ckpt-x",
    ):
        write(root / name, b"temp " + name.encode())
    write(root / "x.orbax-checkpoint-tmp-1" / "inner.bin", b"inner")
    write(root / "nested" / "deep.tmp", b"deep")
    write(root / "nested" / "ok.bin", b"ok")
    result = make_snapshotter(local_repo, root).snapshot(reason="t")
    m = result.manifest
    assert m is not None
    assert sorted(e.path for e in m.entries) == ["keep.bin", "nested", "nested/ok.bin"]
    assert result.bytes_read == len(b"keep") + len(b"ok")


def test_custom_patterns(local_repo: Repository, root: Path, make_snapshotter: MakeSnap) -> None:
    write(root / "a.log", b"log")
    write(root / "b.bin", b"bin")
    m = make_snapshotter(local_repo, root, patterns=("*.log",)).snapshot(reason="t").manifest
    assert m is not None
    assert [e.path for e in m.entries] == ["b.bin"]


def test_symlinks_recorded_as_symlinks(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap
) -> None:
    target = write(root / "ckpt-1" / "model.pt", data(5, 100))
    (root / "latest").symlink_to("ckpt-1")
    (root / "model").symlink_to("ckpt-1/model.pt")
    (root / "dangling").symlink_to("nowhere")
    result = make_snapshotter(local_repo, root).snapshot(reason="t")
    m = result.manifest
    assert m is not None
    entries = _by_path(m)
    for name, tgt in (("latest", "ckpt-1"), ("model", "ckpt-1/model.pt"), ("dangling", "nowhere")):
        e = entries[name]
        assert e.type == "symlink"  # type: ignore[attr-defined]
        assert e.target == tgt  # type: ignore[attr-defined]
        assert e.chunks == ()  # type: ignore[attr-defined]
    assert "latest/model.pt" not in entries  # a link to a dir is not followed
    assert result.bytes_read == target.stat().st_size  # the file is read once


def test_empty_dirs_recorded(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap
) -> None:
    (root / "empty").mkdir()
    (root / "outer" / "inner").mkdir(parents=True)
    os.chmod(root / "empty", 0o710)
    m = make_snapshotter(local_repo, root).snapshot(reason="t").manifest
    assert m is not None
    entries = _by_path(m)
    assert sorted(entries) == ["empty", "outer", "outer/inner"]
    assert all(e.type == "dir" for e in entries.values())  # type: ignore[attr-defined]
    assert entries["empty"].mode == 0o710  # type: ignore[attr-defined]


def test_fifos_and_sockets_are_not_data(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    os.mkfifo(root / "pipe")  # reading it would block forever
    monkeypatch.chdir(root)  # a relative socket path: tmp paths may exceed sun_path
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind("sock")
        write(root / "f", b"data")
        m = make_snapshotter(local_repo, root).snapshot(reason="t").manifest
    finally:
        sock.close()
    assert m is not None
    assert [e.path for e in m.entries] == ["f"]


def test_empty_root_first_time_writes_nothing(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap
) -> None:
    result = make_snapshotter(local_repo, root).snapshot(reason="t")
    assert result.manifest is None
    assert local_repo.snapshots() == []


def test_missing_root_writes_nothing(
    local_repo: Repository, tmp_path: Path, make_snapshotter: MakeSnap
) -> None:
    result = make_snapshotter(local_repo, tmp_path / "missing").snapshot(reason="t")
    assert result.manifest is None
    assert local_repo.snapshots() == []


def test_snapshot_keep_prunes(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap
) -> None:
    snap = make_snapshotter(local_repo, root)
    for i in range(4):
        write(root / "f", data(i, CHUNK), mtime_ns=OLD_NS + i * 10**9)
        assert snap.snapshot(reason="t", keep=2).manifest is not None
    refs = local_repo.snapshots()
    assert [r.generation for r in refs] == [4, 3]
    assert _stored_chunks(local_repo) == {hash_bytes(data(3, CHUNK)), hash_bytes(data(2, CHUNK))}


def test_may_write_is_asked_before_the_manifest(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap
) -> None:
    class Lost(Exception):
        pass

    def refuse() -> None:
        raise Lost

    write(root / "f", b"x")
    snap = make_snapshotter(local_repo, root, may_write=refuse)
    with pytest.raises(Lost):
        snap.snapshot(reason="t")
    assert local_repo.snapshots() == []


# ---------------------------------------------------------------- files changing while read


def _rewrite_during_read(
    monkeypatch: pytest.MonkeyPatch, path: Path, new_content: bytes, new_mtime_ns: int
) -> list[int]:
    """Patch os.preadv as seen by the snapshotter: the first chunk read of
    `path` returns the bytes on disk, then rewrites the file (same size, new
    mtime)."""
    real = os.preadv
    ino = path.stat().st_ino
    fired: list[int] = []

    def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        got = real(fd, buffers, offset)
        if not fired and os.fstat(fd).st_ino == ino:
            fired.append(offset)
            with open(path, "r+b") as f:
                f.write(new_content)
            os.utime(path, ns=(new_mtime_ns, new_mtime_ns))
        return got

    monkeypatch.setattr(os, "preadv", preadv)  # what the snapshotter's os.preadv resolves to
    return fired


def test_file_changing_while_read_keeps_previous_version(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1 = data(1, 2 * CHUNK)
    f = write(root / "model.pt", v1)
    write(root / "other", b"other v1")
    snap = make_snapshotter(local_repo, root, concurrency=1)
    first = snap.snapshot(reason="t").manifest
    assert first is not None

    v2 = data(2, 2 * CHUNK)
    write(f, v2, mtime_ns=OLD_NS + 10**9)
    write(root / "other", b"other v2", mtime_ns=OLD_NS + 10**9)  # so a snapshot is due
    fired = _rewrite_during_read(monkeypatch, f, data(3, 2 * CHUNK), OLD_NS + 2 * 10**9)

    result = snap.snapshot(reason="t")

    assert fired, "the patched pread never ran"
    assert result.unstable == ["model.pt"]
    m = result.manifest
    assert m is not None
    entries = _by_path(m)
    assert entries["model.pt"] == _by_path(first)["model.pt"]  # the previous version
    assert list(entries["model.pt"].chunks) == _chunks_of(v1)  # type: ignore[attr-defined]
    assert entries["other"] != _by_path(first)["other"]

    # once quiet, the next snapshot picks up what is on disk now
    monkeypatch.undo()
    again = snap.snapshot(reason="t")
    assert again.unstable == []
    assert again.manifest is not None
    assert list(_by_path(again.manifest)["model.pt"].chunks) == _chunks_of(  # type: ignore[attr-defined]
        data(3, 2 * CHUNK)
    )


def test_file_changing_while_read_without_previous_version_is_left_out(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = write(root / "model.pt", data(1, CHUNK))
    write(root / "stable", b"stable")
    fired = _rewrite_during_read(monkeypatch, f, data(2, CHUNK), OLD_NS + 10**9)
    result = make_snapshotter(local_repo, root).snapshot(reason="t")
    assert fired
    assert result.unstable == ["model.pt"]
    assert result.manifest is not None
    assert [e.path for e in result.manifest.entries] == ["stable"]


def test_file_growing_while_read_is_unstable(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Appending keeps the bytes already read valid, but the file is not complete."""
    f = write(root / "log.bin", data(1, CHUNK))
    write(root / "stable", b"stable")
    real = os.preadv
    ino = f.stat().st_ino
    fired: list[bool] = []

    def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        got = real(fd, buffers, offset)
        if not fired and os.fstat(fd).st_ino == ino:
            fired.append(True)
            st = os.stat(f)
            with open(f, "ab") as fh:
                fh.write(b"more")
            os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with mtime unchanged
        return got

    monkeypatch.setattr(os, "preadv", preadv)  # what the snapshotter's os.preadv resolves to
    result = make_snapshotter(local_repo, root).snapshot(reason="t")
    assert fired
    assert result.unstable == ["log.bin"]
    assert result.manifest is not None
    assert [e.path for e in result.manifest.entries] == ["stable"]


def test_a_strict_snapshot_writes_nothing_when_a_file_changes_while_read(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ckpt push` (strict): the whole directory or nothing. A file that
    changed while read raises naming it, and nothing is written; what was
    read whole is not read again by the next try, which takes the file."""
    f = write(root / "model.pt", data(1, 2 * CHUNK))
    write(root / "stable", b"stable")
    fired = _rewrite_during_read(monkeypatch, f, data(2, 2 * CHUNK), OLD_NS + 10**9)
    snap = make_snapshotter(local_repo, root, concurrency=1)
    with pytest.raises(snapshotter.ChangedWhileReadError) as err:
        snap.snapshot(reason="push", strict=True)
    assert fired and err.value.paths == ["model.pt"]
    assert local_repo.snapshots() == []

    monkeypatch.undo()
    again = snap.snapshot(reason="push", strict=True)
    assert again.files_read == 1  # model.pt alone: `stable` is in the stat cache
    assert again.manifest is not None
    entries = _by_path(again.manifest)
    assert sorted(entries) == ["model.pt", "stable"]
    assert list(entries["model.pt"].chunks) == _chunks_of(data(2, 2 * CHUNK))  # type: ignore[attr-defined]


def test_a_strict_snapshot_with_checks_is_held_back_by_a_torn_file(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap
) -> None:
    """With checks in force a strict snapshot is judged first: a file that
    fails its check holds it back (nothing read or written); whole, it is
    recorded verified with the check each file passed."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a/data.pkl", b"x" * 1000)
    whole = buf.getvalue()
    write(root / "model.pt", whole[: len(whole) // 2])
    snap = make_snapshotter(local_repo, root, checks=Registry())
    held = snap.snapshot(reason="push", strict=True)
    assert held.manifest is None and list(held.waiting) == ["model.pt"]
    assert "zip check" in held.waiting["model.pt"]
    assert local_repo.snapshots() == [] and held.files_read == 0

    write(root / "model.pt", whole, mtime_ns=OLD_NS + 10**9)
    taken = snap.snapshot(reason="push", strict=True)
    assert taken.manifest is not None and taken.manifest.verified is True
    assert _by_path(taken.manifest)["model.pt"].check == "zip"  # type: ignore[attr-defined]


# ---------------------------------------------------------------- adopt


def test_adopt_trust_local_seeds_cache(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap
) -> None:
    write(root / "a", data(1, 2 * CHUNK))
    write(root / "d" / "b", data(2, 100))
    m = make_snapshotter(local_repo, root).snapshot(reason="t").manifest
    assert m is not None

    fresh = make_snapshotter(local_repo, root)
    fresh.adopt(m, trust_local=True)
    result = fresh.snapshot(reason="t")
    assert result.manifest is None
    assert result.bytes_read == 0
    assert result.parent == m


def test_without_adopt_everything_is_read(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap
) -> None:
    a = data(1, 2 * CHUNK)
    write(root / "a", a)
    m = make_snapshotter(local_repo, root).snapshot(reason="t").manifest
    assert m is not None
    fresh = make_snapshotter(local_repo, root)
    result = fresh.snapshot(reason="t")
    assert result.bytes_read == len(a)
    assert result.new_chunks == 0  # already in the repository


def test_adopt_restored_dir(
    local_repo: Repository, root: Path, tmp_path: Path, make_snapshotter: MakeSnap
) -> None:
    """After a restore elsewhere, trust_local=True trusts the restored files;
    trust_local=False does not (other inodes, other source)."""
    a = data(1, 2 * CHUNK)
    write(root / "a", a)
    write(root / "d" / "b", data(2, 100))
    m = make_snapshotter(local_repo, root).snapshot(reason="t").manifest
    assert m is not None
    target = tmp_path / "restored"
    restored = restore(local_repo, target, warn=pytest.fail)
    assert restored is not None

    trusting = make_snapshotter(local_repo, target)
    trusting.adopt(m, trust_local=True)
    result = trusting.snapshot(reason="t")
    assert result.bytes_read == 0
    assert result.manifest is None

    wary = make_snapshotter(local_repo, target)
    wary.adopt(m, trust_local=False)
    result = wary.snapshot(reason="t")
    assert result.bytes_read == len(a) + 100


def test_adopt_skips_files_that_differ(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap
) -> None:
    write(root / "a", data(1, CHUNK))
    write(root / "b", data(2, CHUNK))
    m = make_snapshotter(local_repo, root).snapshot(reason="t").manifest
    assert m is not None
    b2 = data(3, CHUNK)
    write(root / "b", b2, mtime_ns=OLD_NS + 5 * 10**9)
    fresh = make_snapshotter(local_repo, root)
    fresh.adopt(m, trust_local=True)
    result = fresh.snapshot(reason="t")
    assert result.bytes_read == len(b2)
    assert result.manifest is not None


def test_adopt_none_clears(local_repo: Repository, root: Path, make_snapshotter: MakeSnap) -> None:
    write(root / "a", data(1, CHUNK))
    snap = make_snapshotter(local_repo, root)
    snap.snapshot(reason="t")
    snap.adopt(None, trust_local=True)
    assert snap.parent is None
    result = snap.snapshot(reason="t")
    assert result.bytes_read == CHUNK
    assert result.manifest is not None  # no parent: a new snapshot is recorded


def test_scan_sorted_and_typed(root: Path) -> None:
    write(root / "b", b"b")
    write(root / "a" / "c", b"c")
    (root / "l").symlink_to("b")
    entries = scan(root)
    assert [e.path for e in entries] == ["a", "a/c", "b", "l"]
    assert [e.type for e in entries] == ["dir", "file", "file", "symlink"]
    assert entries[3].target == "b"


def test_open_backend_repository_for_snapshots(
    tmp_path: Path, root: Path, make_snapshotter: MakeSnap
) -> None:
    """Repository.open with the default chunk size works end to end."""
    repo = Repository.open(open_backend(str(tmp_path / "store")), create=True)
    assert repo is not None
    write(root / "f", b"hello")
    m = make_snapshotter(repo, root).snapshot(reason="t").manifest
    assert m is not None
    assert repo.get_chunk(m.entries[0].chunks[0], 5) == b"hello"


def test_absolute_link_into_the_dir_is_recorded_relative_and_restores(
    local_repo: Repository, root: Path, tmp_path: Path, make_snapshotter: MakeSnap
) -> None:
    write(root / "step-2" / "model.pt", data(7, 50))
    (root / "latest").symlink_to(root / "step-2")  # absolute, but inside --dir
    (root / "step-2" / "self").symlink_to(root / "step-2" / "model.pt")
    result = make_snapshotter(local_repo, root).snapshot(reason="t")
    assert result.skipped_links == []
    entries = _by_path(result.manifest)  # type: ignore[arg-type]
    assert entries["latest"].target == "step-2"  # type: ignore[attr-defined]
    assert entries["step-2/self"].target == "model.pt"  # type: ignore[attr-defined]
    out = tmp_path / "elsewhere" / "restored"
    restore(local_repo, out, warn=pytest.fail)
    assert (out / "latest" / "model.pt").read_bytes() == data(7, 50)
    assert os.readlink(out / "latest") == "step-2"


def test_links_leading_outside_are_left_out_and_reported(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap
) -> None:
    write(root / "a.bin", b"a")
    (root / "dataset").symlink_to("/usr/share")
    (root / "up").symlink_to("../elsewhere")
    (root / "here").symlink_to(".")
    (root / "sneaky").symlink_to("here/..")  # escapes only through the other link
    result = make_snapshotter(local_repo, root).snapshot(reason="t")
    assert result.skipped_links == ["dataset", "sneaky", "up"]
    assert result.manifest is not None
    assert sorted(e.path for e in result.manifest.entries) == ["a.bin", "here"]


# ---------------------------------------------------------------- files ckpt cannot read
#
# As root every file is readable: the refusal is injected where the
# snapshotter meets it (os.open, os.preadv). Through the real binary without
# CAP_DAC_OVERRIDE: tests/faults/test_unreadable.py.


def _refuse_open(monkeypatch: pytest.MonkeyPatch, path: Path, err: int = errno.EACCES) -> None:
    real = os.open

    def fake(p: object, flags: int, *args: object, **kw: object) -> int:
        if os.fspath(p) == os.fspath(path):  # type: ignore[arg-type]
            raise OSError(err, os.strerror(err), os.fspath(path))  # type: ignore[arg-type]
        return real(p, flags, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", fake)


@pytest.mark.parametrize("size", [10, 3 * CHUNK], ids=["small", "big"])
def test_an_unreadable_file_keeps_its_previous_version_and_is_named(
    local_repo: Repository,
    root: Path,
    make_snapshotter: MakeSnap,
    monkeypatch: pytest.MonkeyPatch,
    size: int,
) -> None:
    f = write(root / "optim.pt", data(1, size))
    write(root / "model.pt", b"model v1")
    snap = make_snapshotter(local_repo, root)
    first = snap.snapshot(reason="t").manifest
    assert first is not None
    write(f, data(2, size), mtime_ns=OLD_NS + 10**9)
    write(root / "model.pt", b"model v2", mtime_ns=OLD_NS + 10**9)
    _refuse_open(monkeypatch, f)

    result = snap.snapshot(reason="t")

    assert result.unreadable == {"optim.pt": "Permission denied"}
    assert result.unstable == [], "not taken for a file that changed"
    m = result.manifest
    assert m is not None
    assert _by_path(m)["optim.pt"] == _by_path(first)["optim.pt"]
    assert _by_path(m)["model.pt"] != _by_path(first)["model.pt"]


def test_an_unreadable_new_file_is_left_out_but_named(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap, monkeypatch: pytest.MonkeyPatch
) -> None:
    _refuse_open(monkeypatch, write(root / "optim.pt", b"secret"))
    write(root / "model.pt", b"model")
    result = make_snapshotter(local_repo, root).snapshot(reason="t")
    assert result.unreadable == {"optim.pt": "Permission denied"}
    assert result.manifest is not None
    assert [e.path for e in result.manifest.entries] == ["model.pt"]


def test_a_strict_snapshot_and_a_pin_refuse_an_unreadable_file(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ckpt push` (strict) and a commit (a pin) need every file: they fail
    naming it, and write nothing."""
    _refuse_open(monkeypatch, write(root / "optim.pt", b"secret"))
    write(root / "model.pt", b"model")
    snap = make_snapshotter(local_repo, root)
    with pytest.raises(UnreadableError, match=r"optim\.pt .*Permission denied") as err:
        snap.snapshot(reason="push", strict=True)
    assert (err.value.path, err.value.reason) == ("optim.pt", "Permission denied")
    with pytest.raises(UnreadableError, match=r"optim\.pt"):
        snap.pin()
    assert local_repo.snapshots() == []


def test_a_vanished_file_is_not_unreadable(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deleted (or replaced by a link) between the scan and the open: it
    changed; a pin leaves it out, as it is no longer part of the moment."""
    f = write(root / "gone.pt", b"x")
    write(root / "model.pt", b"model")
    _refuse_open(monkeypatch, f, errno.ENOENT)
    snap = make_snapshotter(local_repo, root)
    result = snap.snapshot(reason="t")
    assert result.unreadable == {} and result.unstable == ["gone.pt"]
    pinned = snap.pin()
    try:
        assert "gone.pt" not in pinned.fds and "model.pt" in pinned.fds
    finally:
        pinned.close()


def test_a_read_error_is_unreadable_not_changed(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = write(root / "bad.bin", data(1, 2 * CHUNK))
    write(root / "ok.bin", b"ok")
    ino = f.stat().st_ino
    real = os.preadv

    def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        if os.fstat(fd).st_ino == ino:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    result = make_snapshotter(local_repo, root).snapshot(reason="t")
    assert result.unreadable == {"bad.bin": os.strerror(errno.EIO)}
    assert result.unstable == []
    assert result.manifest is not None
    assert [e.path for e in result.manifest.entries] == ["ok.bin"]


def test_a_fifo_in_place_of_a_scanned_file_does_not_hang_the_snapshot(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replaced by a FIFO between the scan and the open: opening it for
    reading must not wait for a writer that never comes."""
    write(root / "model.pt", b"model")
    write(root / "state.pt", b"state")
    entries = snapshotter.scan(root)
    (root / "state.pt").unlink()
    os.mkfifo(root / "state.pt")
    monkeypatch.setattr(snapshotter, "scan", lambda *_a, **_k: list(entries))
    snap = make_snapshotter(local_repo, root)
    result = snap.snapshot(reason="t")
    assert result.manifest is not None
    assert [e.path for e in result.manifest.entries] == ["model.pt"]
    pinned = snap.pin()
    try:
        assert sorted(pinned.fds) == ["model.pt"]
    finally:
        pinned.close()


def test_a_directory_that_cannot_be_listed_fails_the_snapshot_naming_it(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its files are not left out as if deleted: every kind of snapshot fails
    naming it (UnreadableError), and the stat cache is seeded without it."""
    write(root / "state" / "rng", b"rng")
    write(root / "model.pt", b"model")
    snap = make_snapshotter(local_repo, root)
    first = snap.snapshot(reason="t").manifest
    assert first is not None
    real = os.scandir
    locked = str(root / "state")

    def scandir(path: str) -> object:
        if os.fspath(path) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", locked)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    for take in (
        lambda: snap.snapshot(reason="t"),
        lambda: snap.snapshot(reason="push", strict=True),
        snap.pin,
    ):
        with pytest.raises(UnreadableError, match=r"state/ cannot be read") as err:
            take()
        assert err.value.reason == "Permission denied"
    snap.adopt(first, trust_local=True)  # no error: nothing is trusted
    assert snap.cache == {}
    assert [r.id for r in local_repo.snapshots()] == [first.id]


class _Threads(DelegatingBackend):
    """Records the thread that writes each chunk."""

    def __init__(self, inner: Backend, local: bool) -> None:
        super().__init__(inner)
        self.local_io = local
        self.writers: dict[str, str] = {}

    def write(self, key: str, data: bytes) -> None:
        if key.startswith("chunks/"):
            self.writers[key.rsplit("/", 1)[-1]] = threading.current_thread().name
        super().write(key, data)


@pytest.mark.parametrize("local", [True, False])
def test_tiny_files_are_written_by_one_thread_only_to_a_local_repository(
    tmp_path: Path, root: Path, make_snapshotter: MakeSnap, local: bool
) -> None:
    """To a local repository files up to reader.TINY go to one thread of their
    own (thread hand-offs cost more than they overlap); to a remote they go
    to the pool like every other file, so their round trips overlap. A
    file of several chunks is read by the pool either way."""
    tiny = {f"t{i}.bin": data(100 + i, 100 + i) for i in range(200)}
    for name, content in tiny.items():
        write(root / name, content)
    big = data(7, 3 * CHUNK)
    write(root / "big.bin", big)
    backend = _Threads(open_backend(str(tmp_path / "remote")), local)
    repo = Repository(backend, chunk_size=CHUNK)

    result = make_snapshotter(repo, root).snapshot(reason="test")

    assert result.manifest is not None and result.files_read == 201
    tiny_writers = {backend.writers[hash_bytes(c)] for c in tiny.values()}
    big_writers = {backend.writers[d] for d in _chunks_of(big)}
    assert all(w.startswith("ckpt-chunk") for w in big_writers), big_writers
    if local:
        assert len(tiny_writers) == 1 and tiny_writers.pop().startswith("ckpt-tiny")
    else:
        assert all(w.startswith("ckpt-chunk") for w in tiny_writers), tiny_writers
    entries = _by_path(result.manifest)
    for name, content in tiny.items():
        assert list(entries[name].chunks) == [hash_bytes(content)]  # type: ignore[attr-defined]
    assert list(entries["big.bin"].chunks) == _chunks_of(big)  # type: ignore[attr-defined]


@pytest.mark.parametrize("adopted", [False, True])
def test_a_chmod_alone_is_a_new_snapshot(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap, adopted: bool
) -> None:
    """chmod changes no size and no mtime: the stat cache vouches for the
    content, and the mode is still recorded anew (the entry the cache keeps
    is reused only while the mode is the same)."""
    content = data(3, 100)
    write(root / "a.bin", content, mode=0o640)
    snap = make_snapshotter(local_repo, root)
    first = snap.snapshot(reason="test").manifest
    assert first is not None
    if adopted:  # a new process: the cache comes from the manifest
        snap = make_snapshotter(local_repo, root)
        snap.adopt(first, trust_local=True)
    assert snap.snapshot(reason="test").manifest is None  # nothing changed
    os.chmod(root / "a.bin", 0o600)

    result = snap.snapshot(reason="test")

    assert result.manifest is not None and result.files_read == 0
    (entry,) = result.manifest.files
    assert entry.mode == 0o600 and list(entry.chunks) == [hash_bytes(content)]
    assert snap.snapshot(reason="test").manifest is None
