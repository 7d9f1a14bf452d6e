"""One conformance suite for the storage layer, run against every kind of store.

Each test gets a fresh, empty `store` (tests/stores.py) and runs once per kind:
memory, file, S3 (moto and s3rver), Azure (Azurite), GCS (emulator) and SFTP
(sshd). It exercises ckpt_cli.backends.open_backend and what is built on it: the
Repository, the lease, snapshot + restore, and GC. Objects stay few and small:
the GCS emulator slows down as objects accumulate.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckpt_cli.backends import Backend, NotFound, open_backend
from ckpt_cli.backends.urls import parse_storage_options
from ckpt_cli.errors import LeaseHeldError
from ckpt_cli.lease import LEASE_KEY
from ckpt_cli.manifest import Entry, Manifest, ManifestError, hash_bytes
from ckpt_cli.repository import (
    CONFIG_KEY,
    DEFAULT_CHUNK_SIZE,
    ChunkError,
    Repository,
    chunk_key,
    iter_manifests,
    newest_manifest,
)
from ckpt_cli.restore import restore
from ckpt_cli.snapshotter import Snapshotter
from stores import Store
from unit.helpers import CHUNK, OLD_NS, data, tree, write


@pytest.fixture
def backend(store: Store) -> Backend:
    return open_backend(store.url, store.storage_options)


@pytest.fixture
def repo(backend: Backend) -> Repository:
    """A repository with a small chunk size, opened the way ckpt opens one."""
    config = {"format": "ckpt", "version": 1, "chunk_size": CHUNK, "hash": "blake3"}
    backend.write(CONFIG_KEY, json.dumps(config).encode())
    opened = Repository.open(backend, create=True)
    assert opened is not None
    assert opened.chunk_size == CHUNK
    return opened


@pytest.fixture
def snapshotter(repo: Repository, tmp_path: Path) -> Iterator[Snapshotter]:
    s = Snapshotter(repo, tmp_path / "src")
    yield s
    s.close()


def _never(msg: str) -> None:
    pytest.fail(f"unexpected warning: {msg}")


def _snapshot(s: Snapshotter) -> Manifest:
    m = s.snapshot(reason="test").manifest
    assert m is not None
    return m


def _manifest(generation: int, snap_id: str, entries: tuple[Entry, ...] = ()) -> Manifest:
    return Manifest(
        id=snap_id,
        generation=generation,
        entries=entries,
        chunk_size=CHUNK,
        created=1000.0 + generation,
        host="h",
        source="/src",
    )


def _commit(repo: Repository, generation: int, snap_id: str, files: dict[str, bytes]) -> Manifest:
    """Upload the chunks of files (each at most one chunk) and a manifest naming them."""
    entries = []
    for path, content in sorted(files.items()):
        assert len(content) <= CHUNK
        digest = hash_bytes(content)
        repo.put_chunk(digest, content)
        entries.append(Entry(path, "file", 0o644, len(content), OLD_NS, (digest,)))
    m = _manifest(generation, snap_id, tuple(entries))
    repo.write_manifest(m)
    return m


# ---------------------------------------------------------------- objects


def test_cli_options_are_the_storage_options(store: Store) -> None:
    """The -o flags a test hands to `ckpt` configure exactly what open_backend gets."""
    assert set(store.cli_options[0::2]) <= {"-o"}
    assert parse_storage_options(store.cli_options[1::2]) == store.storage_options


def test_write_read_overwrite(backend: Backend) -> None:
    every_byte = bytes(range(256)) * 3
    backend.write("a/b/c.bin", every_byte)
    assert backend.read("a/b/c.bin") == every_byte
    backend.write("a/b/c.bin", b"second version")
    assert backend.read("a/b/c.bin") == b"second version"
    backend.write("top", b"")
    assert backend.read("top") == b""


def test_read_absent_is_not_found(backend: Backend) -> None:
    with pytest.raises(NotFound):
        backend.read("never/written")
    backend.write("dir/present", b"x")
    with pytest.raises(NotFound):
        backend.read("dir/absent")


def test_list(backend: Backend) -> None:
    assert backend.list("") == []
    assert backend.list("missing/") == []
    keys = ["a/1", "a/b/2", "a/b/c/3", "b/4", "top"]
    for key in keys:
        backend.write(key, key.encode())
    assert sorted(backend.list("")) == keys
    assert sorted(backend.list("a/")) == ["a/1", "a/b/2", "a/b/c/3"]
    assert sorted(backend.list("a/b/")) == ["a/b/2", "a/b/c/3"]
    assert backend.list("missing/") == []
    assert backend.list("a/missing/") == []


def test_names(backend: Backend) -> None:
    """What a location holds one level down (a location `ckpt ls` finds no
    repository in): nothing while it is empty, then its objects' top names."""
    assert backend.names() == []
    for key in ("a/1", "a/b/2", "top"):
        backend.write(key, b"x")
    assert sorted(backend.names()) == ["a", "top"]


def test_delete(backend: Backend) -> None:
    backend.write("d/one", b"1")
    backend.write("d/two", b"2")
    backend.delete("d/one")
    with pytest.raises(NotFound):
        backend.read("d/one")
    assert backend.list("d/") == ["d/two"]
    backend.delete("d/one")  # already gone: not an error
    backend.delete("never/existed")
    assert backend.read("d/two") == b"2"


def test_rename(backend: Backend) -> None:
    """What a multi-node GC round does to a chunk: chunks/ -> trash/ and back."""
    backend.write("chunks/ab/abc", b"payload")
    backend.rename("chunks/ab/abc", "trash/ab/abc")
    assert backend.read("trash/ab/abc") == b"payload"
    assert backend.list("chunks/") == []
    assert backend.list("trash/") == ["trash/ab/abc"]
    backend.write("chunks/ab/abc", b"payload")  # uploaded again meanwhile: replaced
    backend.rename("trash/ab/abc", "chunks/ab/abc")
    assert backend.read("chunks/ab/abc") == b"payload"
    assert backend.list("trash/") == []
    with pytest.raises(NotFound):
        backend.rename("trash/ab/abc", "chunks/ab/abc")


def test_create_exclusive(backend: Backend) -> None:
    assert backend.create_exclusive("x/lock", b"first") is True
    assert backend.create_exclusive("x/lock", b"second") is False
    assert backend.read("x/lock") == b"first"
    backend.delete("x/lock")
    assert backend.create_exclusive("x/lock", b"third") is True
    assert backend.read("x/lock") == b"third"


def test_full_size_chunk_round_trip(backend: Backend) -> None:
    """An object as large as ckpt's default chunk (8 MiB) goes through whole."""
    payload = data(7, DEFAULT_CHUNK_SIZE)
    backend.write("big", payload)
    assert backend.read("big") == payload


def test_write_views_of_a_reused_buffer(backend: Backend) -> None:
    """A view of a whole chunk buffer, and of part of one, arrive byte for
    byte; the buffer is changed after each write returns (as the chunk pool
    reuses it), which must not change what was stored."""
    buf = bytearray(data(8, 3 * 1024 * 1024))
    first = bytes(buf)
    backend.write("v/whole", memoryview(buf))
    buf[:] = data(9, len(buf))
    backend.write("v/part", memoryview(buf)[:5000])
    part = bytes(buf[:5000])
    buf[:] = bytes(len(buf))
    assert backend.read("v/whole") == first
    assert backend.read("v/part") == part


def test_read_into(backend: Backend) -> None:
    """Where a backend reads straight into a buffer: the object's size, the
    bytes in the view, nothing beyond it; NotFound for an absent object."""
    read_into = getattr(backend, "read_into", None)
    if read_into is None:
        pytest.skip("this backend has no read_into")
    payload = data(10, 200_000)
    backend.write("r/obj", payload)
    buf = bytearray(len(payload) + 8)
    assert read_into("r/obj", memoryview(buf)[: len(payload)]) == len(payload)
    assert bytes(buf[: len(payload)]) == payload and buf[-8:] == bytes(8)
    short = bytearray(1000 + 8)
    assert read_into("r/obj", memoryview(short)[:1000]) == len(payload)
    assert short[1000:] == bytes(8), "nothing written past the view"
    with pytest.raises(NotFound):
        read_into("r/absent", memoryview(bytearray(10)))


# ---------------------------------------------------------------- repository


def test_open_create_then_reopen(store: Store, backend: Backend) -> None:
    assert Repository.open(backend, create=False) is None
    created = Repository.open(backend, create=True)
    assert created is not None
    assert created.chunk_size == DEFAULT_CHUNK_SIZE
    config = json.loads(backend.read(CONFIG_KEY))
    assert (config["format"], config["version"], config["hash"]) == ("ckpt", 1, "blake3")
    # a second process: a new backend object on the same URL
    again = Repository.open(open_backend(store.url, store.storage_options), create=False)
    assert again is not None
    assert again.chunk_size == DEFAULT_CHUNK_SIZE
    assert backend.list("") == [CONFIG_KEY]


def test_chunks_put_get_verify(store: Store, repo: Repository) -> None:
    payload = data(1, CHUNK)
    digest = hash_bytes(payload)
    assert repo.put_chunk(digest, memoryview(payload)) is True
    assert repo.put_chunk(digest, payload) is False  # known: not sent again
    assert repo.has_chunk(digest)
    assert repo.get_chunk(digest, CHUNK) == payload
    assert repo.backend.list("chunks/") == [chunk_key(digest)]
    # a fresh repository learns the chunk by listing
    fresh = Repository(open_backend(store.url, store.storage_options), CHUNK)
    assert fresh.has_chunk(digest)
    assert fresh.put_chunk(digest, payload) is False
    # damage is detected on read
    repo.backend.write(chunk_key(digest), bytes(CHUNK))
    with pytest.raises(ChunkError, match="corrupt"):
        repo.get_chunk(digest, CHUNK)
    with pytest.raises(ChunkError, match="bytes, expected"):
        repo.get_chunk(digest, CHUNK + 1)
    absent = hash_bytes(b"never stored")
    with pytest.raises(ChunkError, match="missing"):
        repo.get_chunk(absent)


def test_manifests_order_and_newest(repo: Repository) -> None:
    assert repo.snapshots() == []
    assert newest_manifest(repo) is None
    m1 = _manifest(1, "ffffffff")
    m10 = _manifest(10, "00000000")
    m2 = _manifest(2, "88888888")
    for m in (m1, m10, m2):
        repo.write_manifest(m)
    assert [r.generation for r in repo.snapshots()] == [10, 2, 1]
    assert repo.next_generation() == 11
    assert newest_manifest(repo) == m10
    assert repo.load(repo.snapshots()[1]) == m2
    found = repo.find("8888")
    assert found is not None
    assert found.generation == 2
    # a garbage manifest newer than all others is reported, and skipped
    repo.backend.write("snapshots/0000000011-abcdabcd.json", b"{not json")
    loaded = list(iter_manifests(repo))
    assert [r.generation for r, _ in loaded] == [11, 10, 2, 1]
    assert isinstance(loaded[0][1], ManifestError)
    assert newest_manifest(repo) == m10


# ---------------------------------------------------------------- snapshot, restore


def _populate(src: Path) -> None:
    write(src / "model.pt", data(1, 2 * CHUNK + 17), mode=0o640, mtime_ns=OLD_NS + 123)
    write(src / "sub" / "deep" / "opt.pt", data(2, CHUNK), mode=0o600, mtime_ns=OLD_NS + 789)
    write(src / "empty.bin", b"", mtime_ns=OLD_NS + 1)
    write(src / "dup.pt", data(1, CHUNK), mtime_ns=OLD_NS + 2)  # shares a chunk with model.pt
    (src / "emptydir").mkdir()
    (src / "latest").symlink_to("sub/deep/opt.pt")
    os.chmod(src / "sub", 0o750)
    for d, ns in (
        (src / "sub" / "deep", OLD_NS + 11),
        (src / "sub", OLD_NS + 22),
        (src / "emptydir", OLD_NS + 33),
    ):
        os.utime(d, ns=(ns, ns))


def test_snapshot_then_restore(repo: Repository, snapshotter: Snapshotter, tmp_path: Path) -> None:
    src = snapshotter.root
    _populate(src)
    m = _snapshot(snapshotter)
    assert len(repo.backend.list("chunks/")) == 4  # model.pt's first chunk is dup.pt's
    target = tmp_path / "out" / "data"
    restored = restore(repo, target, warn=_never)
    assert restored is not None
    assert restored.manifest == m
    assert restored.skipped == []
    assert tree(target) == tree(src)
    assert sorted(p.name for p in target.parent.iterdir()) == ["data"]


def _two_snapshots(snapshotter: Snapshotter) -> tuple[Manifest, Manifest]:
    src = snapshotter.root
    write(src / "f", data(1, 2 * CHUNK))
    write(src / "g", b"unchanged")
    m1 = _snapshot(snapshotter)
    write(src / "f", data(1, CHUNK) + data(2, CHUNK), mtime_ns=OLD_NS + 10**9)
    m2 = _snapshot(snapshotter)
    return m1, m2


@pytest.mark.parametrize("damage", ["corrupt", "missing", "garbage-manifest"])
def test_damaged_newest_snapshot_falls_back(
    repo: Repository, snapshotter: Snapshotter, tmp_path: Path, damage: str
) -> None:
    m1, m2 = _two_snapshots(snapshotter)
    [only_new] = m2.chunk_digests() - m1.chunk_digests()
    if damage == "corrupt":
        repo.backend.write(chunk_key(only_new), bytes(CHUNK))  # right size, wrong bytes
    elif damage == "missing":
        repo.backend.delete(chunk_key(only_new))
    else:
        repo.backend.write(m2.key, m2.to_bytes()[:40])
    warnings: list[str] = []
    target = tmp_path / "out" / "data"

    restored = restore(repo, target, warn=warnings.append)

    assert restored is not None
    assert restored.manifest.id == m1.id
    assert (target / "f").read_bytes() == data(1, 2 * CHUNK)
    assert (target / "g").read_bytes() == b"unchanged"
    assert len(warnings) == 1
    assert m2.id in warnings[0]
    assert len(restored.skipped) == 1


# ---------------------------------------------------------------- gc


def test_gc_keeps_newest(repo: Repository) -> None:
    shared, only1, only2, only3 = (data(i, 64) for i in range(4))
    m1 = _commit(repo, 1, "aaaaaaa1", {"s": shared, "f": only1})
    m2 = _commit(repo, 2, "aaaaaaa2", {"s": shared, "f": only2})
    m3 = _commit(repo, 3, "aaaaaaa3", {"s": shared, "f": only3})
    orphan = b"orphan of a crashed upload"
    repo.put_chunk(hash_bytes(orphan), orphan)

    report = repo.gc(2)

    assert report.deleted_snapshots == [m1.key]
    assert report.kept == [m3.key, m2.key]
    assert report.deleted_chunks == 2  # only1 and the orphan
    assert [r.key for r in repo.snapshots()] == [m3.key, m2.key]
    remaining = {k.rsplit("/", 1)[-1] for k in repo.backend.list("chunks/")}
    assert remaining == m2.chunk_digests() | m3.chunk_digests()
    for m in (m2, m3):
        for digest in m.chunk_digests():
            repo.get_chunk(digest)


# ---------------------------------------------------------------- lease


def test_lease(repo: Repository) -> None:
    first = repo.lease("owner-a", 60.0)
    assert first.acquire() is None
    assert first.held
    assert json.loads(repo.backend.read(LEASE_KEY))["owner"] == "owner-a"
    second = repo.lease("owner-b", 60.0)
    with pytest.raises(LeaseHeldError):
        second.acquire()
    assert not second.held
    first.heartbeat()
    first.release()
    assert not first.held
    with pytest.raises(NotFound):
        repo.backend.read(LEASE_KEY)
    assert second.acquire() is None
    assert json.loads(repo.backend.read(LEASE_KEY))["owner"] == "owner-b"
    second.release()
