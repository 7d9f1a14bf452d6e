"""The storage format: versioned config, content-addressed chunks, write-once
manifests, a single-writer lease, retention and garbage collection.

    ckpt.json                      {"format": "ckpt", "version": 1, "chunk_size", "hash"}
    chunks/<h[:2]>/<h>             file contents in fixed-size chunks, named by their hash
                                   (blake3; sha256 in repositories made so)
    snapshots/<gen:010d>-<id>.json manifest, written in one put after its chunks
    lease.json                     the writer's lease, refreshed by a heartbeat
    ranks/<r>/snapshots/, ranks/<r>/lease.json
                                   rank r's own stream and lease (multi-node runs)
    gc/<seq:010d>-<id>.json        a multi-rank GC round; trash/<h[:2]>/<h> its chunks
    suspect/<snapshot key>         a crash-loop mark on that snapshot (why, when,
                                   host); the snapshot itself is untouched

Ordering: chunks before the manifest that names them; "latest" is derived by
listing snapshots/. A Repository is the one object callers hold; its rooms:
`chunks` (chunks/ and trash/), `snapshots` (names, by listing), `suspect`
(the crash-loop guard's marks), `retention` (judging, retention, GC). The
manifest format is in `manifest`, the lease in `lease`.
"""

from __future__ import annotations

import copy
import json
import secrets
from collections.abc import Collection, Iterable, Iterator

from ckpt_cli import retention
from ckpt_cli.backends import Backend, NotFound
from ckpt_cli.backends.recorder import Recorder
from ckpt_cli.chunks import CHUNKS, Buffers, ChunkError, Chunks, chunk_key, trash_key
from ckpt_cli.errors import ConfigError
from ckpt_cli.lease import LEASE_KEY, Lease
from ckpt_cli.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    HASH_NAME,
    HASHES,
    MAX_CHUNK_SIZE,
    Manifest,
    ManifestError,
    hasher,
)
from ckpt_cli.retention import (
    PREFERRED,
    GcPlan,
    GcReport,
    Verdicts,
    pick,
    restore_tier,
    retained,
    snapshot_kind,
    unverified_note,
)
from ckpt_cli.snapshots import (
    RANKS,
    STREAM_RE,
    SnapshotList,
    SnapshotRef,
    rank_stream,
    snapshot_ref,
    stream_rank,
)
from ckpt_cli.suspect import Suspect, SuspectMarks, parse_suspect

#: The format's names, where callers have always found them (some now live
#: in the rooms: chunks, snapshots, suspect, retention).
__all__ = [
    "CHUNKS",
    "CONFIG_KEY",
    "DEFAULT_CHUNK_SIZE",
    "PREFERRED",
    "RANKS",
    "Buffers",
    "ChunkError",
    "GcPlan",
    "GcReport",
    "Recorder",
    "Repository",
    "SnapshotRef",
    "Suspect",
    "chunk_key",
    "chunk_sizes",
    "iter_manifests",
    "newest_manifest",
    "parse_suspect",
    "pick",
    "rank_stream",
    "restore_tier",
    "retained",
    "snapshot_kind",
    "snapshot_ref",
    "stream_rank",
    "trash_key",
    "unverified_note",
]

DEFAULT_CHUNK_SIZE = 8 * 1024 * 1024
CONFIG_KEY = "ckpt.json"


def chunk_sizes(manifest: Manifest) -> dict[str, int]:
    """Every chunk a manifest names -> its length in bytes (the last chunk of a
    file is short)."""
    sizes: dict[str, int] = {}
    step = manifest.chunk_size
    for e in manifest.files:
        for i, digest in enumerate(e.chunks):
            sizes[digest] = min(step, e.size - i * step)
    return sizes


class Repository:
    """One remote in the ckpt format. Thread-safe for concurrent chunk puts."""

    def __init__(
        self, backend: Backend, chunk_size: int, hash_name: str = HASH_NAME, stream: str = ""
    ) -> None:
        self.backend = backend
        #: The snapshot stream this process reads and writes (rank_stream()).
        self.stream = stream
        #: Manifests by key as load_cached read them (or the error): they are
        #: written once and never changed, so retention, run after every
        #: snapshot, reads each one once per process.
        self.loaded: dict[str, Manifest | ManifestError] = {}
        self.chunk_size = chunk_size
        self.hash_name = hash_name
        #: The hex digest of a chunk, by the repository's own hash (ckpt.json).
        self.hash = hasher(hash_name)
        #: The rooms: chunks, snapshot names, suspect marks, verdicts.
        self.chunks = Chunks(backend, self.hash)
        self.names = SnapshotList(backend)
        self.marks = SuspectMarks(backend)
        self.verdicts = Verdicts()

    def for_stream(self, stream: str) -> Repository:
        """The same repository (backend, rooms, caches shared), reading and
        writing another snapshot stream: a rank's, for `ls --rank` and
        `restore --rank`. The stream is given, never assigned from outside."""
        view = copy.copy(self)
        view.stream = stream
        return view

    @property
    def borrows_buffers(self) -> bool:
        """put_chunk may be given a view of a buffer the caller reuses: the
        backend has finished with it when its write returns (a local
        directory, fsspec's stores: their `borrows_buffers`). Other backends
        (and test doubles) may keep what they are given: put_chunk hands them
        a copy, and a caller with bytes of its own passes those (no copy)."""
        return self.backend.borrows_buffers

    @property
    def local_io(self) -> bool:
        """Chunks are files on this machine (the backend's `local_io`):
        small files are snapshotted and restored by one thread."""
        return self.backend.local_io

    @property
    def display(self) -> str:
        return self.backend.display

    @classmethod
    def open(cls, backend: Backend, *, create: bool, stream: str = "") -> Repository | None:
        """Open the repository (reading and writing `stream`); None if there
        is none and create is False."""
        try:
            raw = backend.read(CONFIG_KEY)
        except NotFound:
            if not create:
                return None
            config = {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "chunk_size": DEFAULT_CHUNK_SIZE,
                "hash": HASH_NAME,
            }
            backend.create_exclusive(CONFIG_KEY, json.dumps(config, indent=1).encode())
            try:
                raw = backend.read(CONFIG_KEY)
            except NotFound:  # there, but not an object (a directory, a FIFO)
                raise ConfigError(
                    f"{backend.display}/{CONFIG_KEY} is not a file: point --remote at an "
                    "empty location or a ckpt repository"
                ) from None
        try:
            config = json.loads(raw)
            if not isinstance(config, dict):
                raise ValueError("not an object")
        except (ValueError, RecursionError) as exc:
            raise ConfigError(
                f"{backend.display}/{CONFIG_KEY} is not a ckpt repository config ({exc}); "
                "point --remote at an empty location or a ckpt repository"
            ) from None
        if config.get("format") != FORMAT_NAME or config.get("version") != FORMAT_VERSION:
            raise ConfigError(
                f"repository {backend.display} has format {config.get('format')!r} version "
                f"{config.get('version')!r}; this ckpt reads version {FORMAT_VERSION} "
                "(upgrade ckpt, or use another --remote)"
            )
        hash_name = config.get("hash")
        if hash_name not in HASHES:
            raise ConfigError(
                f"repository {backend.display} uses hash {hash_name!r}; this ckpt knows "
                f"{', '.join(HASHES)} (upgrade ckpt, or use another --remote)"
            )
        chunk_size = config.get("chunk_size")
        # bool is an int to Python: `true` would make 1-byte chunks, and manifests
        # (which refuse such a chunk_size) that no restore could read. Memory
        # is (--concurrency + 2) chunks: a size beyond MAX_CHUNK_SIZE is no
        # repository ckpt made.
        if (
            not isinstance(chunk_size, int)
            or isinstance(chunk_size, bool)
            or not 0 < chunk_size <= MAX_CHUNK_SIZE
        ):
            raise ConfigError(
                f"repository {backend.display} has a bad chunk_size {str(chunk_size)[:40]} "
                f"(1 to {MAX_CHUNK_SIZE} bytes); use another --remote"
            )
        return cls(backend, chunk_size, hash_name, stream=stream)

    # -- snapshots (names: `snapshots`)

    def snapshots(self, stream: str | None = None) -> list[SnapshotRef]:
        """Every snapshot name of this stream (or `stream`), newest (highest
        generation) first."""
        return self.names.snapshots(self.stream if stream is None else stream)

    def rank_snapshots(self) -> dict[int, list[SnapshotRef]]:
        """Every rank's stream under ranks/ (one listing), newest first each."""
        return self.names.rank_snapshots()

    def find(self, wanted: str) -> SnapshotRef | None:
        """A snapshot by id, id prefix (unique), or generation number, in this
        stream; else by id or unique id prefix in any rank's stream."""
        return self.names.find(wanted, self.stream)

    def all_snapshots(self) -> list[SnapshotRef]:
        """This stream's snapshots, then every other rank's (`ckpt verify`)."""
        return self.names.all_snapshots(self.stream)

    def load(self, ref: SnapshotRef) -> Manifest:
        try:
            data = self.backend.read(ref.key)
        except NotFound:
            raise ManifestError("has disappeared (pruned by another process?)") from None
        return self.parse_manifest(data, ref.key)

    def load_cached(self, ref: SnapshotRef) -> Manifest:
        """load(), each manifest read once per process (see `loaded`)."""
        m = self.loaded.get(ref.key)
        if m is None:
            try:
                m = self.load(ref)
            except ManifestError as exc:
                m = exc
            self.loaded[ref.key] = m
        if isinstance(m, ManifestError):
            raise m
        return m

    def forget_manifests(self, keys: Iterable[str]) -> None:
        """Deleted (or no longer listed) manifests: drop what is cached of them."""
        keys = list(keys)
        for key in keys:
            self.loaded.pop(key, None)
        self.verdicts.forget(keys)

    def parse_manifest(self, data: bytes, key: str) -> Manifest:
        """Manifest.from_bytes, and the manifest must name chunks by this
        repository's hash (its chunks could never verify otherwise)."""
        manifest = Manifest.from_bytes(data, STREAM_RE.sub("", key, count=1))
        if manifest.hash != self.hash_name:
            raise ManifestError(
                f"names its chunks by {manifest.hash}, the repository by {self.hash_name}"
            )
        if manifest.chunk_size != self.chunk_size:
            # Its chunks could not be cut from files this way, and a restore
            # must not hold buffers of a size a manifest chose.
            raise ManifestError(
                f"has chunk_size {manifest.chunk_size}, the repository {self.chunk_size}"
            )
        return manifest

    def next_generation(self) -> int:
        refs = self.snapshots()
        return refs[0].generation + 1 if refs else 1

    def write_manifest(self, manifest: Manifest) -> None:
        """The commit point of a snapshot: written once, after all its chunks."""
        self.backend.write(self.stream + manifest.key, manifest.to_bytes())

    @staticmethod
    def new_id() -> str:
        return secrets.token_hex(4)

    # -- chunks (`chunks`)

    def _known_chunks(self) -> set[str]:
        return self.chunks.known()

    def has_chunk(self, digest: str) -> bool:
        return self.chunks.has(digest)

    def has_chunks(self, digests: Iterable[str]) -> bool:
        """Every one of digests is listed (one set test for a whole file)."""
        return self.chunks.known().issuperset(digests)

    def put_chunk(self, digest: str, data: bytes | memoryview) -> bool:
        """Store a chunk unless it is known to exist; True if bytes were sent.
        Concurrent puts of the same digest send it once: the others wait."""
        return self.chunks.put(digest, data)

    def get_chunk(self, digest: str, expected_size: int | None = None) -> bytes:
        """Read and verify a chunk; ChunkError if missing, short or corrupt."""
        return self.chunks.get(digest, expected_size)

    def read_chunk_into(self, digest: str, view: memoryview) -> None:
        """Fill view (the chunk's expected size) with the chunk and verify it;
        ChunkError if missing, of another size or corrupt."""
        self.chunks.read_into(digest, view)

    def forget_chunk(self, digest: str) -> None:
        """A chunk found damaged (or deleted): upload it again next time it is
        seen, even if a later listing still shows the damaged object."""
        self.chunks.forget(digest)

    def trust_chunk(self, digest: str) -> None:
        """A chunk just read back and verified: it exists and is whole."""
        self.chunks.trust(digest)

    def present_chunks(self) -> set[str]:
        """Every readable chunk: chunks/, and trash/ (get_chunk reads both)."""
        return self.chunks.present()

    def list_chunks(self) -> set[str]:
        """Every chunk in the store, by one listing of chunks/ (never cached)."""
        return self.chunks.listed()

    def trash_chunks(self) -> set[str]:
        """Every chunk a multi-node GC round moved to trash/, by one listing."""
        return self.chunks.trash()

    # -- suspect marks, the crash-loop guard's (`suspect`)

    def suspect_keys(self, *, cached: bool = False) -> set[str]:
        """The keys of every snapshot marked suspect (any stream); cached:
        the last listing if there was one."""
        return self.marks.keys(cached=cached)

    def read_suspect(self, snapshot_key: str) -> Suspect | None:
        """The mark of a snapshot, None if it has none."""
        return self.marks.read(snapshot_key)

    def mark_suspect(self, ref: SnapshotRef, why: str, **details: object) -> None:
        """Mark a snapshot suspect; it counts as suspect in this process even
        if the write fails (RemoteError is raised then)."""
        self.marks.mark(ref, why, **details)

    def clear_suspect(self, ref: SnapshotRef) -> bool:
        """Remove a snapshot's mark; False if it had none."""
        return self.marks.clear(ref)

    def drop_marks(self, dropped: Iterable[SnapshotRef], suspect: Collection[str]) -> None:
        """Retention dropped these snapshots: their marks go too."""
        self.marks.drop(dropped, suspect)

    # -- retention (`retention`)

    def judge(
        self,
        loaded: Iterable[tuple[SnapshotRef, Manifest | ManifestError]],
        present: set[str] | None = None,
    ) -> dict[str, bool]:
        """Whether each snapshot can be restored (key -> bool): Verdicts.judge."""
        return self.verdicts.judge(loaded, present)

    def gc(
        self, keep: int, *, sweep: bool = True, audit: retention.Audit | None = None
    ) -> GcReport:
        """Retention of the single-node stream (`retention.gc`)."""
        return retention.gc(self, keep, sweep=sweep, audit=audit)

    def rank_chunks(self) -> set[str]:
        """Every chunk a rank stream's manifest names (`retention.rank_chunks`)."""
        return retention.rank_chunks(self)

    # -- lease

    def lease(self, owner: str, ttl: float) -> Lease:
        return Lease(self.backend, owner, ttl, key=self.stream + LEASE_KEY)


def iter_manifests(repo: Repository) -> Iterator[tuple[SnapshotRef, Manifest | ManifestError]]:
    """Every snapshot newest first, loaded, with the error instead when it is damaged."""
    for ref in repo.snapshots():
        try:
            yield ref, repo.load(ref)
        except ManifestError as exc:
            yield ref, exc


def newest_manifest(repo: Repository) -> Manifest | None:
    """The newest snapshot whose manifest loads (its chunks are not checked)."""
    for _ref, m in iter_manifests(repo):
        if isinstance(m, Manifest):
            return m
    return None
