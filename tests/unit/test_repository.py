"""The repository format on both backends: config, chunks, manifests, GC, lease."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import threading
import time

import pytest

from ckpt_cli.backends import Backend, NotFound
from ckpt_cli.errors import ConfigError, LeaseHeldError
from ckpt_cli.lease import LEASE_KEY, Lease, LeaseLostError, boot_id, here
from ckpt_cli.manifest import FORMAT_VERSION, Entry, Manifest, hash_bytes
from ckpt_cli.repository import (
    CONFIG_KEY,
    DEFAULT_CHUNK_SIZE,
    Buffers,
    ChunkError,
    Repository,
    SnapshotRef,
    chunk_key,
    iter_manifests,
    parse_suspect,
    pick,
    rank_stream,
    restore_tier,
    retained,
    snapshot_kind,
)

from .helpers import CHUNK, DelegatingBackend


class CountingBackend(DelegatingBackend):
    """Wraps a backend and records every key written."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.writes: list[str] = []
        self._lock = threading.Lock()

    def write(self, key: str, data: bytes) -> None:
        with self._lock:
            self.writes.append(key)
        self.inner.write(key, data)


def _file_entry(path: str, content: bytes, chunk_size: int = CHUNK) -> Entry:
    chunks = tuple(
        hash_bytes(content[i : i + chunk_size]) for i in range(0, len(content), chunk_size)
    )
    return Entry(path, "file", 0o644, len(content), 1, chunks)


def _manifest(
    generation: int, snap_id: str, entries: tuple[Entry, ...] = (), created: float = 1000.0
) -> Manifest:
    return Manifest(
        id=snap_id,
        generation=generation,
        entries=entries,
        chunk_size=CHUNK,
        created=created,
        host="h",
        source="/src",
    )


def _commit(
    repo: Repository,
    generation: int,
    snap_id: str,
    files: dict[str, bytes],
    created: float = 1000.0,
) -> Manifest:
    """Upload the chunks of files and write a manifest naming them."""
    entries = []
    for path, content in sorted(files.items()):
        for i in range(0, len(content), CHUNK):
            piece = content[i : i + CHUNK]
            repo.put_chunk(hash_bytes(piece), piece)
        entries.append(_file_entry(path, content))
    m = _manifest(generation, snap_id, tuple(entries), created)
    repo.write_manifest(m)
    return m


# ---------------------------------------------------------------- open


def test_open_without_create_on_empty_is_none(backend: Backend) -> None:
    assert Repository.open(backend, create=False) is None
    with pytest.raises(NotFound):
        backend.read(CONFIG_KEY)


def test_open_create_writes_config(backend: Backend) -> None:
    repo = Repository.open(backend, create=True)
    assert repo is not None
    assert repo.chunk_size == DEFAULT_CHUNK_SIZE
    config = json.loads(backend.read(CONFIG_KEY))
    assert config["format"] == "ckpt"
    assert config["version"] == FORMAT_VERSION
    assert config["hash"] == "blake3"
    again = Repository.open(backend, create=False)
    assert again is not None
    assert again.chunk_size == DEFAULT_CHUNK_SIZE


def test_open_keeps_existing_chunk_size(backend: Backend) -> None:
    backend.write(
        CONFIG_KEY,
        json.dumps(
            {"format": "ckpt", "version": 1, "chunk_size": 12345, "hash": "sha256"}
        ).encode(),
    )
    repo = Repository.open(backend, create=True)
    assert repo is not None
    assert repo.chunk_size == 12345
    assert repo.hash_name == "sha256"


@pytest.mark.parametrize(
    "raw",
    [
        b"this is not json",
        b"[1, 2, 3]",
        b'"ckpt"',
        b"",
    ],
)
def test_open_garbage_config(backend: Backend, raw: bytes) -> None:
    backend.write(CONFIG_KEY, raw)
    for create in (False, True):
        with pytest.raises(ConfigError):
            Repository.open(backend, create=create)
    assert backend.read(CONFIG_KEY) == raw  # never overwritten


@pytest.mark.parametrize(
    "config",
    [
        {"format": "ckpt", "version": 2, "chunk_size": 4096, "hash": "sha256"},
        {"format": "ckpt", "version": 0, "chunk_size": 4096, "hash": "sha256"},
        {"format": "other", "version": 1, "chunk_size": 4096, "hash": "sha256"},
        {"format": "ckpt", "version": 1, "chunk_size": 4096, "hash": "md5"},
        {"format": "ckpt", "version": 1, "chunk_size": 0, "hash": "sha256"},
        {"format": "ckpt", "version": 1, "chunk_size": "big", "hash": "sha256"},
        {"format": "ckpt", "version": 1, "hash": "sha256"},
    ],
)
def test_open_unusable_config(backend: Backend, config: dict[str, object]) -> None:
    backend.write(CONFIG_KEY, json.dumps(config).encode())
    with pytest.raises(ConfigError):
        Repository.open(backend, create=False)


# ---------------------------------------------------------------- chunks


def test_put_chunk_dedup(backend: Backend) -> None:
    counting = CountingBackend(backend)
    repo = Repository(counting, CHUNK)
    payload = b"hello chunk"
    digest = hash_bytes(payload)
    assert repo.put_chunk(digest, payload) is True
    assert repo.has_chunk(digest)
    assert repo.put_chunk(digest, payload) is False
    assert counting.writes == [chunk_key(digest)]
    # a fresh Repository learns the chunk from listing and does not rewrite it either
    fresh = Repository(counting, CHUNK)
    assert fresh.has_chunk(digest)
    assert fresh.put_chunk(digest, payload) is False
    assert counting.writes == [chunk_key(digest)]
    assert backend.read(chunk_key(digest)) == payload


def test_chunk_key_layout() -> None:
    digest = hash_bytes(b"x")
    assert chunk_key(digest) == f"chunks/{digest[:2]}/{digest}"


def test_get_chunk_round_trip(repo: Repository) -> None:
    payload = os.urandom(100)
    digest = hash_bytes(payload)
    repo.put_chunk(digest, memoryview(payload))
    assert repo.get_chunk(digest) == payload
    assert repo.get_chunk(digest, 100) == payload


def test_get_chunk_corrupt(repo: Repository) -> None:
    payload = b"a" * 64
    digest = hash_bytes(payload)
    repo.put_chunk(digest, payload)
    repo.backend.write(chunk_key(digest), b"b" * 64)  # same size, different bytes
    with pytest.raises(ChunkError) as info:
        repo.get_chunk(digest, 64)
    assert info.value.digest == digest


def test_get_chunk_missing(repo: Repository) -> None:
    digest = hash_bytes(b"never stored")
    with pytest.raises(ChunkError) as info:
        repo.get_chunk(digest)
    assert info.value.digest == digest
    assert "missing" in str(info.value)


def test_get_chunk_wrong_size(repo: Repository) -> None:
    payload = b"c" * 64
    digest = hash_bytes(payload)
    repo.put_chunk(digest, payload)
    with pytest.raises(ChunkError):
        repo.get_chunk(digest, 65)
    with pytest.raises(ChunkError):
        repo.get_chunk(digest, 63)


def test_forget_chunk_makes_it_uploadable_again(repo: Repository) -> None:
    payload = b"d" * 10
    digest = hash_bytes(payload)
    repo.put_chunk(digest, payload)
    repo.backend.write(chunk_key(digest), b"garbage")
    repo.forget_chunk(digest)
    assert repo.put_chunk(digest, payload) is True
    assert repo.get_chunk(digest, 10) == payload


# ---------------------------------------------------------------- manifests


def test_manifest_round_trip(repo: Repository) -> None:
    entries = (
        Entry("d", "dir", 0o750, mtime_ns=5),
        _file_entry("d/f", b"x" * (CHUNK + 1)),
        Entry("link", "symlink", 0o777, target="d/f"),
        _file_entry("empty", b""),
    )
    m = Manifest(
        id="0123abcd",
        generation=7,
        entries=entries,
        chunk_size=CHUNK,
        created=123.5,
        parent="deadbeef",
        host="host1",
        source="/data",
        run="run-1",
        attempt=2,
        reason="commit",
        new_bytes=10,
        new_chunks=1,
    )
    assert Manifest.from_bytes(m.to_bytes(), m.key) == m
    assert m.key == "snapshots/0000000007-0123abcd.json"
    repo.write_manifest(m)
    [ref] = repo.snapshots()
    assert (ref.generation, ref.id, ref.key) == (7, "0123abcd", m.key)
    assert repo.load(ref) == m
    assert m.total_size == CHUNK + 1
    assert [e.path for e in m.files] == ["d/f", "empty"]


def test_snapshots_ordered_by_generation_not_time_or_id(repo: Repository) -> None:
    # ids and creation times run against the generation order
    repo.write_manifest(_manifest(1, "ffffffff", created=3000.0))
    repo.write_manifest(_manifest(10, "00000000", created=1000.0))
    repo.write_manifest(_manifest(2, "88888888", created=2000.0))
    refs = repo.snapshots()
    assert [r.generation for r in refs] == [10, 2, 1]
    assert [r.id for r in refs] == ["00000000", "88888888", "ffffffff"]


def test_snapshots_ignores_foreign_keys(repo: Repository) -> None:
    repo.write_manifest(_manifest(1, "aaaaaaaa"))
    repo.backend.write("snapshots/README", b"hi")
    repo.backend.write("snapshots/0000000009-XYZ.json", b"{}")
    repo.backend.write("snapshots/9-abcdefab.json", b"{}")
    assert [r.id for r in repo.snapshots()] == ["aaaaaaaa"]


def test_find(repo: Repository) -> None:
    repo.write_manifest(_manifest(1, "abcd1111"))
    repo.write_manifest(_manifest(2, "abcd2222"))
    repo.write_manifest(_manifest(3, "12345678"))
    repo.write_manifest(_manifest(4, "fedcba98"))
    by_id = repo.find("abcd2222")
    assert by_id is not None
    assert by_id.generation == 2
    by_gen = repo.find("4")
    assert by_gen is not None
    assert by_gen.id == "fedcba98"
    prefix = repo.find("fedc")
    assert prefix is not None
    assert prefix.generation == 4
    unique = repo.find("abcd1")
    assert unique is not None
    assert unique.id == "abcd1111"
    assert repo.find("abcd") is None  # ambiguous prefix
    assert repo.find("fed") is None  # too short to be a prefix
    digits = repo.find("12345678")  # an id made of digits is found as an id
    assert digits is not None
    assert digits.generation == 3
    assert repo.find("99") is None
    assert repo.find("00000000") is None


def test_next_generation(repo: Repository) -> None:
    assert repo.next_generation() == 1
    repo.write_manifest(_manifest(5, "aaaaaaaa"))
    assert repo.next_generation() == 6
    repo.write_manifest(_manifest(2, "bbbbbbbb"))
    assert repo.next_generation() == 6


def test_load_vanished(repo: Repository) -> None:
    m = _manifest(1, "aaaaaaaa")
    repo.write_manifest(m)
    [ref] = repo.snapshots()
    repo.backend.delete(m.key)
    from ckpt_cli.manifest import ManifestError

    with pytest.raises(ManifestError):
        repo.load(ref)


def test_iter_manifests_reports_damage(repo: Repository) -> None:
    good = _manifest(1, "aaaaaaaa")
    repo.write_manifest(good)
    repo.backend.write("snapshots/0000000002-bbbbbbbb.json", b"{broken")
    from ckpt_cli.manifest import ManifestError

    out = list(iter_manifests(repo))
    assert [r.generation for r, _ in out] == [2, 1]
    assert isinstance(out[0][1], ManifestError)
    assert out[1][1] == good


# ---------------------------------------------------------------- gc


def _chunk_names(repo: Repository) -> set[str]:
    return {k.rsplit("/", 1)[-1] for k in repo.backend.list("chunks/")}


def test_gc_keeps_newest_and_referenced_chunks(repo: Repository) -> None:
    shared = b"S" * CHUNK
    only1 = b"1" * CHUNK
    only2 = b"2" * CHUNK
    only3 = b"3" * CHUNK
    m1 = _commit(repo, 1, "aaaaaaa1", {"s": shared, "f": only1})
    m2 = _commit(repo, 2, "aaaaaaa2", {"s": shared, "f": only2})
    m3 = _commit(repo, 3, "aaaaaaa3", {"s": shared, "f": only3, "g": only1})
    orphan = b"orphan"
    repo.put_chunk(hash_bytes(orphan), orphan)

    report = repo.gc(2)

    assert sorted(report.deleted_snapshots) == [m1.key]
    assert report.kept == [m3.key, m2.key]
    assert [r.key for r in repo.snapshots()] == [m3.key, m2.key]
    remaining = _chunk_names(repo)
    # only1 is named by the kept m3 even though the dropped m1 named it first
    assert remaining == {
        hash_bytes(shared),
        hash_bytes(only1),
        hash_bytes(only2),
        hash_bytes(only3),
    }
    assert report.deleted_chunks == 1  # the orphan
    for m in (m2, m3):
        for e in m.files:
            for d in e.chunks:
                repo.get_chunk(d)  # every kept manifest is still restorable


def test_gc_deletes_unreferenced_chunks_of_dropped(repo: Repository) -> None:
    _commit(repo, 1, "aaaaaaa1", {"f": b"old" * 100})
    m2 = _commit(repo, 2, "aaaaaaa2", {"f": b"new" * 100})
    report = repo.gc(1)
    assert report.deleted_chunks == 1
    assert _chunk_names(repo) == m2.chunk_digests()
    # the cache forgot the deleted chunk: putting it again uploads it
    old = b"old" * 100
    assert repo.put_chunk(hash_bytes(old), old) is True


def test_gc_nothing_to_drop_deletes_nothing(repo: Repository) -> None:
    _commit(repo, 1, "aaaaaaa1", {"f": b"x"})
    orphan = b"orphan"
    repo.put_chunk(hash_bytes(orphan), orphan)
    report = repo.gc(3, sweep=False)
    assert report.deleted_snapshots == []
    assert report.deleted_chunks == 0
    assert hash_bytes(orphan) in _chunk_names(repo)
    # A sweep collects orphans of crashed uploads even when nothing is dropped.
    report = repo.gc(3, sweep=True)
    assert report.deleted_snapshots == [] and report.deleted_chunks == 1
    assert hash_bytes(orphan) not in _chunk_names(repo)


def test_gc_a_damaged_manifest_is_kept_and_never_counted(repo: Repository) -> None:
    """A damaged manifest newer than the whole ones is kept (for inspection)
    but does not count: --keep 2 keeps two whole snapshots besides it."""
    m1 = _commit(repo, 1, "aaaaaaa1", {"f": b"one"})
    m2 = _commit(repo, 2, "aaaaaaa2", {"f": b"two"})
    damaged = "snapshots/0000000003-aaaaaaa3.json"
    repo.backend.write(damaged, b"garbage")
    report = repo.gc(2)
    assert report.deleted_snapshots == []
    assert [r.key for r in repo.snapshots()] == [damaged, m2.key, m1.key]
    report = repo.gc(1)
    assert report.deleted_snapshots == [m1.key]
    assert [r.key for r in repo.snapshots()] == [damaged, m2.key]
    assert _chunk_names(repo) == m2.chunk_digests()


def test_gc_a_snapshot_missing_a_chunk_never_displaces_a_whole_one(repo: Repository) -> None:
    """Generation 2 misses a chunk: --keep 1 keeps it (newer, for
    inspection, with the chunks it still has) and generation 1, the only
    restorable one. Once a whole snapshot is newer than both, they go."""
    m1 = _commit(repo, 1, "aaaaaaa1", {"f": b"one"})
    m2 = _commit(repo, 2, "aaaaaaa2", {"f": b"two", "g": b"gee"})
    repo.backend.delete(chunk_key(hash_bytes(b"two")))
    report = repo.gc(1, sweep=True)
    assert report.deleted_snapshots == [] and report.deleted_chunks == 0
    assert [r.key for r in repo.snapshots()] == [m2.key, m1.key]
    assert hash_bytes(b"gee") in _chunk_names(repo)
    # The verdict stands in later prunes, which list nothing.
    assert repo.gc(1, sweep=False).deleted_snapshots == []
    m3 = _commit(repo, 3, "aaaaaaa3", {"f": b"three"})
    report = repo.gc(1, sweep=False)
    assert sorted(report.deleted_snapshots) == sorted([m1.key, m2.key])
    assert _chunk_names(repo) == m3.chunk_digests()


def test_retained_counts_restorable_snapshots_only() -> None:
    refs = [SnapshotRef(g, f"{g:08x}", f"snapshots/{g:010d}-{g:08x}.json") for g in (5, 4, 3, 2, 1)]

    def gens(refs: list[SnapshotRef]) -> list[int]:
        return [r.generation for r in refs]

    whole = dict.fromkeys((5, 4, 3, 2, 1), True)
    kept, dropped = retained([(r, whole[r.generation]) for r in refs], 2)
    assert (gens(kept), gens(dropped)) == ([5, 4], [3, 2, 1])
    damaged = {5: False, 4: True, 3: False, 2: True, 1: True}
    kept, dropped = retained([(r, damaged[r.generation]) for r in refs], 2)
    assert (gens(kept), gens(dropped)) == ([5, 4, 3, 2], [1])
    none = dict.fromkeys((5, 4, 3, 2, 1), False)
    kept, dropped = retained([(r, none[r.generation]) for r in refs], 1)
    assert (gens(kept), gens(dropped)) == ([5, 4, 3, 2, 1], [])


# ---------------------------------------------------------------- lease


def _lease_doc(**overrides: object) -> bytes:
    doc: dict[str, object] = {
        "owner": "someone-else",
        "host": "another-host",
        "pid": 1,
        "boot": "",
        "heartbeat": time.time(),
        "ttl": 60.0,
    }
    doc.update(overrides)
    return json.dumps(doc).encode()


def _lease_owner(repo: Repository) -> str:
    return str(json.loads(repo.backend.read(LEASE_KEY))["owner"])


def test_lease_acquire_on_empty(repo: Repository) -> None:
    lease = repo.lease("me", 60.0)
    assert lease.acquire() is None
    assert lease.held
    doc = json.loads(repo.backend.read(LEASE_KEY))
    assert doc["owner"] == "me"
    assert doc["pid"] == os.getpid()
    assert doc["host"] == socket.gethostname()
    # re-acquiring our own lease is fine
    assert repo.lease("me", 60.0).acquire() is None


def test_lease_second_owner_is_refused(repo: Repository) -> None:
    first = repo.lease("owner-a", 60.0)
    first.acquire()
    second = repo.lease("owner-b", 60.0)
    with pytest.raises(LeaseHeldError):
        second.acquire()
    assert not second.held
    assert _lease_owner(repo) == "owner-a"


def test_lease_live_foreign_is_refused(repo: Repository) -> None:
    repo.backend.write(LEASE_KEY, _lease_doc())
    with pytest.raises(LeaseHeldError):
        repo.lease("me", 60.0).acquire()
    assert _lease_owner(repo) == "someone-else"


class FakeClock:
    """A monotonic clock that sleeping advances: a watch of a minute, at once."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_lease_stale_by_heartbeat_age(repo: Repository) -> None:
    """Stale by this machine's clock: taken over once watched unchanged for its ttl."""
    repo.backend.write(LEASE_KEY, _lease_doc(heartbeat=time.time() - 3600, ttl=60.0))
    clock = FakeClock()
    lease = Lease(repo.backend, "me", 60.0, clock=clock, sleep=clock.sleep)
    waits: list[str] = []
    why = lease.acquire(on_wait=waits.append)
    assert why is not None
    assert "heartbeat" in why and "did not change in 60s" in why
    assert clock.now - 1000.0 >= 60.0, "watched for the ttl on the monotonic clock"
    assert len(waits) == 1 and "watching" in waits[0]
    assert lease.held
    assert _lease_owner(repo) == "me"


def test_lease_ttl_comes_from_the_lease(repo: Repository) -> None:
    # 100 s old, but the holder promised heartbeats within 1000 s: still live
    repo.backend.write(LEASE_KEY, _lease_doc(heartbeat=time.time() - 100, ttl=1000.0))
    with pytest.raises(LeaseHeldError):
        repo.lease("me", 10.0).acquire()


def _dead_pid() -> int:
    pid = os.posix_spawn(sys.executable, [sys.executable, "-S", "-c", "pass"], dict(os.environ))
    os.waitpid(pid, 0)
    return pid


def test_lease_stale_at_once_for_dead_pid_on_this_host(repo: Repository) -> None:
    pid = _dead_pid()
    place = here()
    repo.backend.write(
        LEASE_KEY,
        _lease_doc(
            host=socket.gethostname(),
            boot=boot_id(),
            pidns=place.pidns,
            timens=place.timens,
            pid=pid,
            heartbeat=time.time(),
        ),
    )
    lease = repo.lease("me", 60.0)
    why = lease.acquire()
    assert why is not None
    assert str(pid) in why
    assert _lease_owner(repo) == "me"


def test_lease_live_pid_on_this_host_is_held(repo: Repository) -> None:
    repo.backend.write(
        LEASE_KEY,
        _lease_doc(
            host=socket.gethostname(), boot=boot_id(), pid=os.getpid(), heartbeat=time.time()
        ),
    )
    with pytest.raises(LeaseHeldError):
        repo.lease("me", 60.0).acquire()


def test_lease_dead_pid_on_other_host_is_held(repo: Repository) -> None:
    pid = _dead_pid()
    repo.backend.write(LEASE_KEY, _lease_doc(host="another-host", boot=boot_id(), pid=pid))
    with pytest.raises(LeaseHeldError):
        repo.lease("me", 60.0).acquire()


def test_lease_garbage_is_stale(repo: Repository) -> None:
    repo.backend.write(LEASE_KEY, b"not json at all")
    lease = repo.lease("me", 60.0)
    assert lease.acquire() is not None
    assert _lease_owner(repo) == "me"


def test_heartbeat_refreshes(repo: Repository) -> None:
    lease = repo.lease("me", 60.0)
    lease.acquire()
    before = json.loads(repo.backend.read(LEASE_KEY))["heartbeat"]
    # backdate the heartbeat, then refresh it
    doc = json.loads(repo.backend.read(LEASE_KEY))
    doc["heartbeat"] = before - 500
    repo.backend.write(LEASE_KEY, json.dumps(doc).encode())
    lease.heartbeat()
    after = json.loads(repo.backend.read(LEASE_KEY))
    assert after["owner"] == "me"
    assert after["heartbeat"] >= before


def test_heartbeat_raises_when_taken_over(repo: Repository) -> None:
    lease = repo.lease("me", 60.0)
    lease.acquire()
    repo.backend.write(LEASE_KEY, _lease_doc(owner="usurper"))
    with pytest.raises(LeaseLostError):
        lease.heartbeat()
    assert not lease.held
    assert _lease_owner(repo) == "usurper"  # not overwritten


def test_heartbeat_raises_when_the_lease_disappeared(repo: Repository) -> None:
    """Another writer took over and released it: writing it back would let a
    writer with older state go on over the newer one's."""
    lease = repo.lease("me", 60.0)
    lease.acquire()
    repo.backend.delete(LEASE_KEY)
    with pytest.raises(LeaseLostError, match="disappeared"):
        lease.heartbeat()
    assert not lease.held
    with pytest.raises(NotFound):
        repo.backend.read(LEASE_KEY)  # not re-created


def test_release_deletes_own_lease(repo: Repository) -> None:
    lease = repo.lease("me", 60.0)
    lease.acquire()
    lease.release()
    assert not lease.held
    with pytest.raises(NotFound):
        repo.backend.read(LEASE_KEY)
    # now another owner gets it at once
    assert repo.lease("other", 60.0).acquire() is None


def test_release_keeps_foreign_lease(repo: Repository) -> None:
    lease = repo.lease("me", 60.0)
    lease.acquire()
    repo.backend.write(LEASE_KEY, _lease_doc(owner="usurper"))
    lease.release()
    assert _lease_owner(repo) == "usurper"


def test_release_without_acquire_touches_nothing(repo: Repository) -> None:
    repo.backend.write(LEASE_KEY, _lease_doc(owner="me"))
    repo.lease("me", 60.0).release()
    assert _lease_owner(repo) == "me"


def test_gc_without_sweep_deletes_only_what_dropped_manifests_named(repo: Repository) -> None:
    _commit(repo, 1, "aaaaaaa1", {"f": b"old" * 100, "s": b"shared"})
    m2 = _commit(repo, 2, "aaaaaaa2", {"f": b"new" * 100, "s": b"shared"})
    orphan = b"orphan of a crashed upload"
    repo.put_chunk(hash_bytes(orphan), orphan)
    report = repo.gc(1, sweep=False)
    assert report.deleted_chunks == 1  # b"old" * 100 only
    assert _chunk_names(repo) == m2.chunk_digests() | {hash_bytes(orphan)}
    report = repo.gc(1, sweep=True)
    assert report.deleted_chunks == 1  # nothing dropped, but the sweep finds the orphan
    assert hash_bytes(orphan) not in _chunk_names(repo)


def test_lease_racing_acquires_have_one_winner(repo: Repository) -> None:
    """Many writers acquiring at once: exactly one holds the lease, with or
    without the confirmation pause (a local directory's create cannot race;
    the test double's check-then-put can, and is confirmed)."""
    leases = [repo.lease(f"owner-{i}", 60.0) for i in range(8)]
    barrier = threading.Barrier(len(leases))
    outcomes: list[str] = []

    def take(lease: Lease) -> None:
        barrier.wait()
        try:
            lease.acquire()
            outcomes.append("held")
        except LeaseHeldError:
            outcomes.append("refused")

    threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["held"] + ["refused"] * 7
    (winner,) = [lease for lease in leases if lease.held]
    assert _lease_owner(repo) == winner.owner


def test_a_buffer_is_reused_unless_its_transfer_raised() -> None:
    """A buffer comes back to the pool after its block; after a block that
    raised (a put that timed out may still be sending from it, a get
    abandoned mid-body may still be writing into it) it is never handed out
    again."""
    pool = Buffers(64)
    with pool.view(64) as v:
        first = v.obj
    with pool.view(10) as v:
        assert v.obj is first and len(v) == 10
    with pytest.raises(TimeoutError), pool.view(64) as v:
        assert v.obj is first
        raise TimeoutError("no answer")
    with pool.view(64) as v:
        assert v.obj is not first, "the buffer of the failed transfer is not reused"


def test_a_failed_transfer_does_not_keep_its_buffer_alive() -> None:
    """The error of a failed chunk is kept (its future holds it until the
    restore looks), the buffer is not: neither through the frames the error
    went through, where a view of it was (a socket read into a slice of it),
    nor through the error it was raised from (the retries' last one). A
    restore failing chunk after chunk held 8 MiB per failure until it
    stopped (823 MiB seen)."""
    import gc
    import tracemalloc

    size = 16 << 20

    def recv_into(part: memoryview) -> None:
        part[:4] = b"abcd"
        raise TimeoutError("no answer")

    def one_try(view: memoryview) -> None:
        try:
            recv_into(view[1:])
        except TimeoutError:
            raise RuntimeError("failed after 4 tries") from None

    pool = Buffers(size)
    kept: list[BaseException] = []
    tracemalloc.start()
    try:
        for _ in range(4):
            try:
                with pool.view(size) as v:
                    one_try(v)
            except RuntimeError as exc:
                kept.append(exc)
        gc.collect()
        held, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(kept) == 4 and isinstance(kept[0].__context__, TimeoutError)
    assert held < size, f"{held / 2**20:.0f} MiB still held by 4 failed transfers"


def test_a_backend_without_borrowed_buffers_gets_a_copy(local_repo: Repository) -> None:
    """put_chunk asks the backend (its borrows_buffers), not its class: a
    test double without it keeps what it is given, so it gets bytes."""
    kept: list[object] = []

    class Keeping(DelegatingBackend):
        def write(self, key: str, data: bytes) -> None:
            kept.append(data)
            self.inner.write(key, bytes(data))

    repo = Repository(Keeping(local_repo.backend), local_repo.chunk_size)
    assert local_repo.borrows_buffers and not repo.borrows_buffers
    buf = bytearray(b"abc")
    repo.put_chunk(hash_bytes(b"abc"), memoryview(buf))
    assert kept == [b"abc"] and isinstance(kept[0], bytes)


# ---------------------------------------------------------------- verified, suspect


def _refs(n: int) -> list[SnapshotRef]:
    """n snapshots, newest first (generation n down to 1)."""
    return [SnapshotRef(g, f"{g:08x}", f"snapshots/{g:010d}-{g:08x}.json") for g in range(n, 0, -1)]


def test_retained_never_counts_unverified_or_suspect_snapshots() -> None:
    refs = _refs(6)
    kinds = ["unverified", "not restorable", "whole", "unverified", "whole", "whole"]
    kept, dropped = retained(list(zip(refs, kinds, strict=True)), 1)
    # The newest whole one (gen 4) and every one newer than it: a suspect or
    # unverified newest never displaces the verified one a restore picks.
    assert [r.generation for r in kept] == [6, 5, 4]
    assert [r.generation for r in dropped] == [3, 2, 1]
    # Unverified ones newer than the counted ones: only the `keep` newest.
    many = ["unverified"] * 5 + ["whole"]
    kept, _dropped = retained(list(zip(refs, many, strict=True)), 2)
    assert [r.generation for r in kept] == [6, 5, 1]


def test_an_empty_snapshot_never_displaces_one_with_files() -> None:
    """`ckpt run --no-restore` on an empty --dir, or a push --allow-empty:
    the empty snapshot is kept (the newest state) but never counted, so
    the one with files stays; empty ones do not pile up either."""
    refs = _refs(4)
    kinds = ["empty", "empty", "empty", "whole"]
    kept, dropped = retained(list(zip(refs, kinds, strict=True)), 1)
    assert [r.generation for r in kept] == [4, 1]
    assert [r.generation for r in dropped] == [3, 2]
    dirs_only = _manifest(2, "00000002", (Entry("d", "dir", 0o755, mtime_ns=5),))
    assert snapshot_kind(dirs_only, True, False) == "empty"
    assert snapshot_kind(_manifest(1, "00000001"), True, False) == "empty"


def test_snapshot_kind_and_restore_tier() -> None:
    m = _manifest(1, "00000001", (Entry("f", "file", 0o644, 0, 1),))
    unverified = dataclasses.replace(m, verified=False)
    assert snapshot_kind(m, True, False) == "whole"
    assert snapshot_kind(dataclasses.replace(m, verified=True), True, False) == "whole"
    assert snapshot_kind(unverified, True, False) == "unverified"
    assert snapshot_kind(m, True, True) == "not restorable"
    assert snapshot_kind(m, False, False) == "not restorable"
    assert [restore_tier(m, False), restore_tier(unverified, False), restore_tier(m, True)] == [
        0,
        1,
        2,
    ]


def test_pick_prefers_verified_then_unverified_then_suspect() -> None:
    refs = _refs(3)
    base = [_manifest(r.generation, r.id) for r in refs]
    u = dataclasses.replace(base[0], verified=False)
    loaded = [(refs[0], u), (refs[1], base[1]), (refs[2], base[2])]
    assert pick(loaded, set()) == (refs[1], base[1])
    assert pick(loaded, {refs[1].key}) == (refs[2], base[2])
    assert pick(loaded, {refs[1].key, refs[2].key}) == (refs[0], u)  # the last resort
    only_suspect = [(refs[1], base[1])]
    assert pick(only_suspect, {refs[1].key}) == (refs[1], base[1])
    assert pick([], set()) is None


def test_suspect_marks_round_trip_and_are_dropped_with_their_snapshot(repo: Repository) -> None:
    m1 = _commit(repo, 1, "00000001", {"a": b"1"}, created=1.0)
    m2 = _commit(repo, 2, "00000002", {"a": b"2"}, created=2.0)
    ref1, ref2 = repo.snapshots()[1], repo.snapshots()[0]
    assert repo.suspect_keys() == set()
    repo.mark_suspect(ref2, "crash loop: attempts 1, 2 failed", run="r1")
    assert repo.suspect_keys() == {ref2.key}
    mark = repo.read_suspect(ref2.key)
    assert mark is not None and mark.why.startswith("crash loop") and mark.run == "r1"
    assert repo.read_suspect(ref1.key) is None
    # Retention: the suspect newest does not count, the one before it stays.
    repo.gc(1)
    assert [r.id for r in repo.snapshots()] == [m2.id, m1.id]
    assert repo.clear_suspect(ref2) and not repo.clear_suspect(ref2)
    assert repo.suspect_keys() == set()
    repo.mark_suspect(ref1, "old")
    _commit(repo, 3, "00000003", {"a": b"3"}, created=3.0)
    repo.gc(1)
    assert [r.generation for r in repo.snapshots()] == [3]
    assert repo.suspect_keys() == set(), "the mark of a dropped snapshot goes with it"


def test_a_mark_that_does_not_parse_still_marks() -> None:
    key = "snapshots/0000000001-00000001.json"
    assert parse_suspect(key, b"garbage").why.startswith("marked suspect")
    doc = {"format": "ckpt-suspect", "why": "x", "time": float("inf"), "host": "h"}
    got = parse_suspect(key, json.dumps(doc).encode())
    assert (got.why, got.time, got.host) == ("x", None, "h")
    assert parse_suspect(key, b"[" * 100_000).why.startswith("marked suspect")


def test_for_stream_is_a_view_of_another_stream(local_repo: Repository) -> None:
    """`ls --rank` and `restore --rank` read a rank's stream through a view:
    the repository they opened keeps its own stream, and the view shares
    the backend and the rooms."""
    rank1 = local_repo.for_stream(rank_stream(1, 2))
    _commit(rank1, 1, "00000001", {"w.bin": b"rank one"})
    assert local_repo.stream == "" and local_repo.snapshots() == []
    assert [r.generation for r in rank1.snapshots()] == [1]
    assert rank1.backend is local_repo.backend and rank1.chunks is local_repo.chunks
