"""restore(): newest usable snapshot, exact content, fallbacks, target untouched on failure."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

import ckpt._fs as ckpt_fs
from ckpt_cli import restore as restore_mod
from ckpt_cli.backends import Backend, open_backend
from ckpt_cli.errors import ConfigError, RestoreError
from ckpt_cli.kept import recover_interrupted
from ckpt_cli.manifest import Entry, Manifest, hash_bytes
from ckpt_cli.repo_tools import DamagedError
from ckpt_cli.repository import Repository, chunk_key
from ckpt_cli.restore import restore
from ckpt_cli.snapshotter import Snapshotter

from .helpers import CHUNK, OLD_NS, DelegatingBackend, data, tree, write

MakeSnap = Callable[..., Snapshotter]


@pytest.fixture
def src(tmp_path: Path) -> Path:
    d = tmp_path / "src"
    d.mkdir()
    return d


@pytest.fixture
def target(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    return out / "data"


def _populate(src: Path) -> None:
    write(src / "model.pt", data(1, 2 * CHUNK + 17), mode=0o640, mtime_ns=OLD_NS + 123)
    write(src / "run.sh", b"#!/bin/sh\n", mode=0o755, mtime_ns=OLD_NS + 456)
    write(src / "sub" / "deep" / "opt.pt", data(2, CHUNK), mode=0o600, mtime_ns=OLD_NS + 789)
    write(src / "empty.bin", b"", mtime_ns=OLD_NS + 1)
    (src / "emptydir").mkdir()
    (src / "latest").symlink_to("sub/deep/opt.pt")
    (src / "sub" / "up").symlink_to("../model.pt")
    (src / "dangling").symlink_to("missing-file")
    os.chmod(src / "sub", 0o750)
    for d, ns in (
        (src / "sub" / "deep", OLD_NS + 11),
        (src / "sub", OLD_NS + 22),
        (src / "emptydir", OLD_NS + 33),
    ):
        os.utime(d, ns=(ns, ns))


def _snap(repo: Repository, src: Path, make: MakeSnap) -> Manifest:
    s = make(repo, src)
    m = s.snapshot(reason="t").manifest
    assert m is not None
    return m


def _leftovers(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name != target.name)


def _never(msg: str) -> None:
    pytest.fail(f"unexpected warning: {msg}")


def test_restore_into_missing_dir(
    local_repo: Repository, src: Path, target: Path, make_snapshotter: MakeSnap
) -> None:
    _populate(src)
    m = _snap(local_repo, src, make_snapshotter)
    restored = restore(local_repo, target, warn=_never)
    assert restored is not None
    assert restored.manifest == m
    assert restored.skipped == []
    assert tree(target) == tree(src)
    assert (target / "sub").stat().st_mode & 0o7777 == 0o750
    assert (target / "model.pt").stat().st_mode & 0o7777 == 0o640
    assert (target / "model.pt").stat().st_mtime_ns == OLD_NS + 123
    assert os.readlink(target / "latest") == "sub/deep/opt.pt"
    assert (target / "latest").read_bytes() == data(2, CHUNK)
    assert (target / "dangling").is_symlink()
    assert target.stat().st_mode & 0o7777 == 0o700  # a new --dir is private
    assert _leftovers(target) == []


def test_restore_replaces_existing_content(
    local_repo: Repository, src: Path, target: Path, make_snapshotter: MakeSnap
) -> None:
    _populate(src)
    _snap(local_repo, src, make_snapshotter)
    write(target / "stale.pt", b"old junk")
    write(target / "model.pt", b"older model")
    write(target / "sub" / "other", b"x")
    (target / "old-link").symlink_to("stale.pt")

    before = tree(target)
    warned: list[str] = []

    restored = restore(local_repo, target, warn=warned.append)

    assert restored is not None
    assert tree(target) == tree(src)
    assert not (target / "stale.pt").exists()
    assert not (target / "old-link").is_symlink()
    # What the snapshot does not hold is moved aside, whole, and said so.
    [kept] = _leftovers(target)
    assert kept.startswith(f".{target.name}.ckpt-kept-")
    assert tree(target.parent / kept) == before
    assert len(warned) == 1 and str(target.parent / kept) in warned[0]


def test_restore_over_a_snapshot_keeps_nothing(
    local_repo: Repository, src: Path, target: Path, make_snapshotter: MakeSnap
) -> None:
    """A dir that holds an older snapshot exactly: every file is durable,
    nothing is kept; a file that changed since is kept alone."""
    write(src / "a.pt", b"one", mtime_ns=OLD_NS)
    write(src / "b.pt", b"two", mtime_ns=OLD_NS)
    s = make_snapshotter(local_repo, src)
    s.snapshot(reason="t")
    assert restore(local_repo, target, warn=_never) is not None
    write(src / "a.pt", b"one, later", mtime_ns=OLD_NS + 5)
    s.snapshot(reason="t")
    assert restore(local_repo, target, warn=_never) is not None  # replaces generation 1
    assert _leftovers(target) == []
    write(target / "a.pt", b"edited here", mtime_ns=OLD_NS + 9)
    warned: list[str] = []
    assert restore(local_repo, target, warn=warned.append) is not None
    [kept] = _leftovers(target)
    assert sorted(tree(target.parent / kept)) == ["a.pt"]
    assert (target.parent / kept / "a.pt").read_bytes() == b"edited here"
    assert len(warned) == 1


def test_restore_replaces_without_rename_exchange(
    local_repo: Repository,
    src: Path,
    target: Path,
    make_snapshotter: MakeSnap,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where renameat2(RENAME_EXCHANGE) is missing, the two-rename fallback is used."""
    _populate(src)
    _snap(local_repo, src, make_snapshotter)
    write(target / "stale.pt", b"old junk")
    monkeypatch.setattr(ckpt_fs, "_renameat2", lambda: None)
    assert restore(local_repo, target, warn=lambda _m: None) is not None
    assert tree(target) == tree(src)
    [kept] = _leftovers(target)
    assert sorted(tree(target.parent / kept)) == ["stale.pt"]


def test_restore_picks_newest(
    local_repo: Repository, src: Path, target: Path, make_snapshotter: MakeSnap
) -> None:
    s = make_snapshotter(local_repo, src)
    write(src / "f", b"one")
    s.snapshot(reason="t")
    write(src / "f", b"two", mtime_ns=OLD_NS + 10**9)
    newest = s.snapshot(reason="t").manifest
    assert newest is not None
    restored = restore(local_repo, target, warn=_never)
    assert restored is not None
    assert restored.manifest.id == newest.id
    assert (target / "f").read_bytes() == b"two"


def _two_snapshots(repo: Repository, src: Path, make: MakeSnap) -> tuple[Manifest, Manifest]:
    s = make(repo, src)
    write(src / "f", data(1, 2 * CHUNK))
    write(src / "g", b"unchanged")
    m1 = s.snapshot(reason="t").manifest
    write(src / "f", data(1, CHUNK) + data(2, CHUNK), mtime_ns=OLD_NS + 10**9)
    m2 = s.snapshot(reason="t").manifest
    assert m1 is not None
    assert m2 is not None
    return m1, m2


def _only_in(newer: Manifest, older: Manifest) -> str:
    [digest] = newer.chunk_digests() - older.chunk_digests()
    return digest


@pytest.mark.parametrize("damage", ["corrupt", "missing", "truncated"])
def test_damaged_chunk_of_newest_falls_back(
    local_repo: Repository, src: Path, target: Path, make_snapshotter: MakeSnap, damage: str
) -> None:
    m1, m2 = _two_snapshots(local_repo, src, make_snapshotter)
    digest = _only_in(m2, m1)
    if damage == "corrupt":
        local_repo.backend.write(chunk_key(digest), b"\0" * CHUNK)
    elif damage == "missing":
        local_repo.backend.delete(chunk_key(digest))
    else:
        local_repo.backend.write(chunk_key(digest), b"short")
    warnings: list[str] = []

    restored = restore(local_repo, target, warn=warnings.append)

    assert restored is not None
    assert restored.manifest.id == m1.id
    assert (target / "f").read_bytes() == data(1, 2 * CHUNK)
    assert (target / "g").read_bytes() == b"unchanged"
    assert len(warnings) == 1
    assert m2.id in warnings[0]
    assert len(restored.skipped) == 1
    assert m2.id in restored.skipped[0]
    assert _leftovers(target) == []


def test_damaged_manifest_of_newest_falls_back(
    local_repo: Repository, src: Path, target: Path, make_snapshotter: MakeSnap
) -> None:
    m1, m2 = _two_snapshots(local_repo, src, make_snapshotter)
    local_repo.backend.write(m2.key, m2.to_bytes()[:40])
    warnings: list[str] = []
    restored = restore(local_repo, target, warn=warnings.append)
    assert restored is not None
    assert restored.manifest.id == m1.id
    assert len(warnings) == 1
    assert m2.id in warnings[0]


def test_explicit_snapshot(
    local_repo: Repository, src: Path, target: Path, make_snapshotter: MakeSnap
) -> None:
    m1, _m2 = _two_snapshots(local_repo, src, make_snapshotter)
    restored = restore(local_repo, target, snapshot=m1.id, warn=_never)
    assert restored is not None
    assert restored.manifest.id == m1.id
    assert (target / "f").read_bytes() == data(1, 2 * CHUNK)
    by_generation = restore(local_repo, target, snapshot="2", warn=_never)
    assert by_generation is not None
    assert (target / "f").read_bytes() == data(1, CHUNK) + data(2, CHUNK)


def _existing_target(target: Path) -> dict[str, tuple[object, ...]]:
    write(target / "mine.pt", b"precious local state", mode=0o600)
    write(target / "nested" / "x", b"x")
    (target / "link").symlink_to("mine.pt")
    return tree(target)


def test_explicit_corrupt_snapshot_is_an_error(
    local_repo: Repository, src: Path, target: Path, make_snapshotter: MakeSnap
) -> None:
    m1, m2 = _two_snapshots(local_repo, src, make_snapshotter)
    local_repo.backend.write(chunk_key(_only_in(m2, m1)), b"garbage")
    before = _existing_target(target)
    with pytest.raises(DamagedError) as info:  # 65: damaged, no retry mends it
        restore(local_repo, target, snapshot=m2.id, warn=_never)
    assert m2.id in str(info.value)
    assert tree(target) == before
    assert _leftovers(target) == []


def test_explicit_unknown_snapshot_is_an_error(
    local_repo: Repository, src: Path, target: Path, make_snapshotter: MakeSnap
) -> None:
    _two_snapshots(local_repo, src, make_snapshotter)
    before = _existing_target(target)
    with pytest.raises(ConfigError, match="--snapshot"):  # 78: bad input, not an outage
        restore(local_repo, target, snapshot="ffffffff", warn=_never)
    assert tree(target) == before


def test_all_snapshots_bad(
    local_repo: Repository, src: Path, target: Path, make_snapshotter: MakeSnap
) -> None:
    m1, m2 = _two_snapshots(local_repo, src, make_snapshotter)
    # the chunk both share is gone: neither snapshot can be restored
    [shared] = [
        d for d in m1.chunk_digests() & m2.chunk_digests() if d == hash_bytes(data(1, CHUNK))
    ]
    local_repo.backend.write(chunk_key(shared), b"rotten")
    before = _existing_target(target)
    warnings: list[str] = []
    with pytest.raises(RestoreError):
        restore(local_repo, target, warn=warnings.append)
    assert tree(target) == before
    assert _leftovers(target) == []
    assert any(m2.id in w for w in warnings)


def test_all_snapshots_bad_missing_target_stays_missing(
    local_repo: Repository, src: Path, target: Path, make_snapshotter: MakeSnap
) -> None:
    write(src / "f", b"content")
    m = _snap(local_repo, src, make_snapshotter)
    local_repo.backend.delete(chunk_key(m.entries[0].chunks[0]))
    with pytest.raises(RestoreError):
        restore(local_repo, target, warn=lambda _m: None)
    assert not target.exists()
    assert _leftovers(target) == []


@pytest.mark.parametrize(
    ("link", "dest"),
    [
        ("evil", "../../etc"),
        ("evil", ".."),
        ("evil", "/etc/passwd"),
        ("a/evil", "../../outside"),
    ],
)
def test_symlink_escaping_is_skipped(
    local_repo: Repository,
    src: Path,
    target: Path,
    make_snapshotter: MakeSnap,
    link: str,
    dest: str,
) -> None:
    write(src / "f", b"good")
    good = _snap(local_repo, src, make_snapshotter)
    f = good.entries[0]
    entries = [f, Entry(link, "symlink", 0o777, target=dest)]
    if "/" in link:
        entries.insert(0, Entry("a", "dir", 0o755))
    bad = Manifest(
        id="badbadba",
        generation=good.generation + 1,
        entries=tuple(sorted(entries, key=lambda e: e.path)),
        chunk_size=local_repo.chunk_size,
        created=0.0,
    )
    local_repo.write_manifest(bad)
    warnings: list[str] = []

    restored = restore(local_repo, target, warn=warnings.append)

    assert restored is not None
    assert restored.manifest.id == good.id
    assert not os.path.lexists(target / link)
    assert (target / "f").read_bytes() == b"good"
    assert len(warnings) == 1
    assert "badbadba" in warnings[0]


def test_symlink_up_but_inside_is_restored(local_repo: Repository, target: Path) -> None:
    entries = (
        Entry("a", "dir", 0o755),
        Entry("a/b", "dir", 0o755),
        Entry("a/b/up", "symlink", 0o777, target="../../top"),
    )
    m = Manifest(
        id="0000aaaa", generation=1, entries=entries, chunk_size=local_repo.chunk_size, created=0.0
    )
    local_repo.write_manifest(m)
    restored = restore(local_repo, target, warn=_never)
    assert restored is not None
    assert os.readlink(target / "a" / "b" / "up") == "../../top"


def test_empty_remote_is_none(local_repo: Repository, target: Path) -> None:
    assert restore(local_repo, target, warn=_never) is None
    assert not target.exists()


def test_empty_remote_leaves_existing_dir(local_repo: Repository, target: Path) -> None:
    before = _existing_target(target)
    assert restore(local_repo, target, warn=_never) is None
    assert tree(target) == before


def test_target_is_a_file(local_repo: Repository, target: Path) -> None:
    target.write_bytes(b"file")
    with pytest.raises(ConfigError):
        restore(local_repo, target, warn=_never)
    assert target.read_bytes() == b"file"


# ---------------------------------------------------------------- recover_interrupted


def test_recover_puts_back_moved_aside_dir(target: Path) -> None:
    old = target.parent / f".{target.name}.ckpt-old-1a2b3c4d"
    write(old / "model.pt", b"the real state")
    junk = target.parent / f".{target.name}.ckpt-restore-5e6f7a8b"
    write(junk / "half.pt", b"half")
    unrelated = target.parent / ".other.ckpt-old-00000000"
    write(unrelated / "keep", b"keep")

    recover_interrupted(target)

    assert (target / "model.pt").read_bytes() == b"the real state"
    assert not old.exists()
    assert not junk.exists()
    assert (unrelated / "keep").read_bytes() == b"keep"


def test_recover_keeps_moved_aside_when_target_exists(target: Path) -> None:
    """It may hold the only copy of a file: renamed to a kept dir, never deleted."""
    write(target / "current", b"current")
    old = target.parent / f".{target.name}.ckpt-old-1a2b3c4d"
    write(old / "previous", b"previous")
    recover_interrupted(target)
    assert os.listdir(target) == ["current"]
    assert (target / "current").read_bytes() == b"current"
    assert not old.exists()
    [kept] = [p for p in target.parent.iterdir() if ".ckpt-kept-" in p.name]
    assert (kept / "previous").read_bytes() == b"previous"


def test_recover_with_missing_parent_is_a_no_op(tmp_path: Path) -> None:
    recover_interrupted(tmp_path / "nope" / "data")
    assert not (tmp_path / "nope").exists()


def test_restore_recovers_interrupted_first(local_repo: Repository, target: Path) -> None:
    """An interrupted swap left the target moved aside; with nothing to restore
    the directory is still put back."""
    old = target.parent / f".{target.name}.ckpt-old-1a2b3c4d"
    write(old / "model.pt", b"state")
    assert restore(local_repo, target, warn=_never) is None
    assert (target / "model.pt").read_bytes() == b"state"


# ---------------------------------------------------------------- local failures


def test_local_failure_is_restore_error_and_target_untouched(
    local_repo: Repository,
    src: Path,
    target: Path,
    make_snapshotter: MakeSnap,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _two_snapshots(local_repo, src, make_snapshotter)
    before = _existing_target(target)
    calls: list[Path] = []

    def disk_full(repo: Repository, manifest: Manifest, dest: Path, **kw: object) -> None:
        calls.append(dest)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dest))

    monkeypatch.setattr(restore_mod, "materialise", disk_full)
    with pytest.raises(RestoreError) as info:
        restore(local_repo, target, warn=_never)
    assert len(calls) == 1  # a local failure does not try older snapshots
    assert "No space left" in str(info.value)
    assert tree(target) == before


def test_local_failure_after_writing_cleans_temp(
    local_repo: Repository,
    src: Path,
    target: Path,
    make_snapshotter: MakeSnap,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _two_snapshots(local_repo, src, make_snapshotter)
    before = _existing_target(target)
    real = restore_mod.materialise

    def fill_then_fail(repo: Repository, manifest: Manifest, dest: Path, **kw: object) -> None:
        real(repo, manifest, dest, **kw)  # type: ignore[arg-type]
        assert dest.is_dir()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(restore_mod, "materialise", fill_then_fail)
    with pytest.raises(RestoreError):
        restore(local_repo, target, warn=_never)
    assert tree(target) == before
    assert _leftovers(target) == []


# ---------------------------------------------------------------- snapshot -> restore round trip


@pytest.mark.parametrize(
    "odd",
    [
        "backslash-name",
        "absolute-symlink",
        "escaping-symlink",
        "non-utf8-name",
    ],
)
def test_every_snapshot_written_is_restorable(
    local_repo: Repository, src: Path, target: Path, make_snapshotter: MakeSnap, odd: str
) -> None:
    """Whatever legal local directory the snapshotter records, restore() must be able
    to use that snapshot: at least the ordinary files come back and no snapshot is
    skipped as damaged."""
    write(src / "model.pt", data(1, CHUNK + 3))
    if odd == "backslash-name":
        write(src / "weird\\name.pt", b"legal on POSIX")
    elif odd == "absolute-symlink":
        (src / "dataset").symlink_to("/usr/share")
    elif odd == "escaping-symlink":
        (src / "shared").symlink_to("../shared-data")
    else:
        with open(os.fsencode(src) + b"/\xff\xfe.bin", "wb") as f:
            f.write(b"latin-1 name")
    m = _snap(local_repo, src, make_snapshotter)
    warnings: list[str] = []

    restored = restore(local_repo, target, warn=warnings.append)

    assert warnings == []
    assert restored is not None
    assert restored.manifest.id == m.id
    assert (target / "model.pt").read_bytes() == data(1, CHUNK + 3)


def test_sha256_repository_keeps_its_hash(
    tmp_path: Path, src: Path, target: Path, make_snapshotter: MakeSnap
) -> None:
    """A repository made by ckpt before blake3 says "sha256" in ckpt.json: new
    snapshots name chunks by sha256 there, and old and new ones restore."""
    backend = open_backend(str(tmp_path / "old-remote"))
    backend.write(
        "ckpt.json",
        b'{"format": "ckpt", "version": 1, "chunk_size": %d, "hash": "sha256"}' % CHUNK,
    )
    repo = Repository.open(backend, create=False)
    assert repo is not None and repo.hash_name == "sha256"
    _populate(src)
    m = _snap(repo, src, make_snapshotter)
    assert m.hash == "sha256"
    stored = {k.rsplit("/", 1)[-1] for k in backend.list("chunks/")}
    assert stored == m.chunk_digests()
    payload = (src / "model.pt").read_bytes()
    assert hashlib.sha256(payload[:CHUNK]).hexdigest() in stored
    assert hash_bytes(payload[:CHUNK]) not in stored  # not blake3
    restored = restore(repo, target, warn=_never)
    assert restored is not None and restored.manifest == m
    assert tree(target) == tree(src)


def test_manifest_with_another_hash_is_damaged(
    local_repo: Repository, src: Path, target: Path, make_snapshotter: MakeSnap
) -> None:
    """A manifest naming chunks by another hash than its repository's is never
    restored: its chunks could not be verified (the older snapshot is)."""
    _populate(src)
    good = _snap(local_repo, src, make_snapshotter)
    bad = dataclasses.replace(good, hash="sha256", id="0123abcd", generation=9)
    local_repo.write_manifest(bad)
    warnings: list[str] = []
    restored = restore(local_repo, target, warn=warnings.append)
    assert restored is not None and restored.manifest == good
    assert warnings == [
        "snapshot 0123abcd (generation 9) names its chunks by sha256, the repository by "
        "blake3; trying the previous one"
    ]


def test_recover_keeps_the_old_content_of_a_swap_cut_short(target: Path) -> None:
    """Killed after the exchange, before the old content was renamed: the
    target carries the swap's marker and the staging name holds the old
    content, which is kept (a staging dir with no marked target is deleted)."""
    write(target / "new.pt", b"restored")
    (target / ".ckpt-moving").write_text('{"phase": "swap"}')
    old = target.parent / f".{target.name}.ckpt-restore-0a0b0c0d"
    write(old / "mine.pt", b"only copy")
    recover_interrupted(target)
    assert os.listdir(target) == ["new.pt"]
    [kept] = [p for p in target.parent.iterdir() if ".ckpt-kept-" in p.name]
    assert (kept / "mine.pt").read_bytes() == b"only copy"
    assert not old.exists()


def test_recover_never_adopts_a_symlink(target: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    write(elsewhere / "id_rsa", b"key")
    link = target.parent / f".{target.name}.ckpt-old-1a2b3c4d"
    link.symlink_to(elsewhere)
    recover_interrupted(target)
    assert not os.path.lexists(target)
    assert link.is_symlink() and (elsewhere / "id_rsa").read_bytes() == b"key"


def test_restored_mode_drops_special_and_world_write() -> None:
    assert restore_mod.restored_mode(0o4755) == 0o755
    assert restore_mod.restored_mode(0o1777) == 0o775
    assert restore_mod.restored_mode(0o2640) == 0o640
    assert restore_mod.restored_mode(0o666) == 0o664


class _Readers(DelegatingBackend):
    """Records the thread that reads each chunk."""

    def __init__(self, inner: Backend, local: bool) -> None:
        super().__init__(inner)
        self.local_io = local
        self.readers: dict[str, str] = {}

    def read(self, key: str) -> bytes:
        if key.startswith("chunks/"):
            self.readers[key.rsplit("/", 1)[-1]] = threading.current_thread().name
        return super().read(key)


@pytest.mark.parametrize("local", [True, False])
def test_tiny_files_are_restored_on_one_thread_only_from_a_local_repository(
    tmp_path: Path, local: bool
) -> None:
    """From a local repository a file of reader.TINY bytes or less is
    written by the restoring thread itself (hand-offs of the GIL cost more
    than threads overlap); from a remote it goes to the pool like every
    other file, so round trips overlap. Either way the tree comes back
    whole, modes and mtimes included."""
    src = tmp_path / "src"
    for i in range(50):
        write(src / f"d{i % 3}" / f"t{i}.bin", data(200 + i, 10 + i), mode=0o600 + (i % 2) * 0o40)
    write(src / "empty.bin", b"")
    write(src / "big.bin", data(9, 3 * CHUNK))
    repo = Repository(open_backend(str(tmp_path / "remote")), chunk_size=CHUNK)
    snap = Snapshotter(repo, src, run="t")
    try:
        assert snap.snapshot(reason="test").manifest is not None
    finally:
        snap.close()
    backend = _Readers(repo.backend, local)
    out = tmp_path / "out"

    restore(Repository(backend, chunk_size=CHUNK), out, warn=lambda _m: None)

    assert tree(out) == tree(src)
    tiny = {hash_bytes(data(200 + i, 10 + i)) for i in range(50)}
    big = {hash_bytes(data(9, 3 * CHUNK)[i : i + CHUNK]) for i in range(0, 3 * CHUNK, CHUNK)}
    tiny_readers = {backend.readers[d] for d in tiny}
    assert all(backend.readers[d].startswith("ckpt-restore") for d in big)
    if local:
        assert tiny_readers == {threading.current_thread().name}
    else:
        assert all(r.startswith("ckpt-restore") for r in tiny_readers), tiny_readers
