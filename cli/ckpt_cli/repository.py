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

Ordering: chunks before the manifest that names them; "latest" is derived by
listing snapshots/; GC deletes old manifests first, then chunks no kept
manifest names. The manifest format is in `manifest`, the lease in `lease`.
Imports: standard library, `remote` (never fsspec itself), `manifest`, `lease`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import secrets
import threading
from collections.abc import Iterator

from ckpt_cli.errors import ConfigError
from ckpt_cli.lease import LEASE_KEY, Lease
from ckpt_cli.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    HASH_NAME,
    HASH_RE,
    HASHES,
    SNAPSHOT_RE,
    SNAPSHOTS,
    Manifest,
    ManifestError,
    hasher,
)
from ckpt_cli.remote import Backend, LocalBackend, NotFound

DEFAULT_CHUNK_SIZE = 8 * 1024 * 1024
CONFIG_KEY = "ckpt.json"
CHUNKS = "chunks/"
#: Chunks a multi-rank GC round took out of chunks/ (see `world`).
TRASH = "trash/"
RANKS = "ranks/"
_STREAM_RE = re.compile(r"^ranks/(\d+)/")


def rank_stream(rank: int, world_size: int) -> str:
    """Where a rank's snapshots and lease live: the root for one node (the
    layout of single-node runs never changes), ranks/<r>/ in a world of several."""
    return "" if world_size == 1 else f"{RANKS}{rank}/"


def stream_rank(stream: str) -> int:
    m = _STREAM_RE.match(stream)
    return int(m.group(1)) if m else 0


class ChunkError(Exception):
    """A chunk that is missing or whose bytes do not match its name."""

    def __init__(self, digest: str, problem: str) -> None:
        super().__init__(f"chunk {digest[:12]} {problem}")
        self.digest = digest


class Buffers:
    """Chunk-sized buffers reused by chunk tasks on many threads: reading into
    a fresh bytes object per chunk pays a page fault and zeroing for every
    byte (reads half as fast, bench/ case 1). Memory: one buffer per task
    running at once."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def view(self, length: int) -> Iterator[memoryview]:
        """A writable view of `length` bytes, returned to the pool after."""
        with self._lock:
            buf = self._free.pop() if self._free else bytearray(self.size)
        view = memoryview(buf)[:length]
        try:
            yield view
        finally:
            view.release()
            with self._lock:
                self._free.append(buf)


def chunk_key(digest: str) -> str:
    return f"{CHUNKS}{digest[:2]}/{digest}"


def trash_key(digest: str) -> str:
    return f"{TRASH}{digest[:2]}/{digest}"


@dataclasses.dataclass(frozen=True)
class SnapshotRef:
    """A snapshot known by its name only (listing is cheap; loading is not)."""

    generation: int
    id: str
    key: str
    #: "" (the root stream) or "ranks/<r>/".
    stream: str = ""


@dataclasses.dataclass
class GcReport:
    deleted_snapshots: list[str]
    deleted_chunks: int
    kept: list[str]


@dataclasses.dataclass
class GcPlan:
    """What `gc(keep)` (with sweep) would delete, worked out without deleting."""

    kept: list[SnapshotRef]
    dropped: list[SnapshotRef]
    #: Chunks no kept manifest names -> their size where a manifest (a dropped
    #: one) says it; None for chunks no manifest names at all (a killed upload's).
    chunks: dict[str, int | None]
    #: Half-written objects of killed writers under chunks/ and snapshots/.
    temps: list[str]

    @property
    def known_bytes(self) -> int:
        return sum(n for n in self.chunks.values() if n is not None)

    @property
    def unsized(self) -> int:
        return sum(1 for n in self.chunks.values() if n is None)


def chunk_sizes(manifest: Manifest) -> dict[str, int]:
    """Every chunk a manifest names -> its length in bytes (the last chunk of a
    file is short)."""
    sizes: dict[str, int] = {}
    step = manifest.chunk_size
    for e in manifest.files:
        for i, digest in enumerate(e.chunks):
            sizes[digest] = min(step, e.size - i * step)
    return sizes


# ---------------------------------------------------------------- repository


class Repository:
    """One remote in the ckpt format. Thread-safe for concurrent chunk puts."""

    def __init__(
        self, backend: Backend, chunk_size: int, hash_name: str = HASH_NAME, stream: str = ""
    ) -> None:
        self.backend = backend
        #: The snapshot stream this process reads and writes (rank_stream()).
        self.stream = stream
        #: Every rank's manifests as `world.World` loaded them, by key: they are
        #: written once and never changed, so each is read once per process.
        self.world_manifests: dict[str, Manifest] = {}
        self.chunk_size = chunk_size
        self.hash_name = hash_name
        #: The hex digest of a chunk, by the repository's own hash (ckpt.json).
        self.hash = hasher(hash_name)
        self._known: set[str] | None = None
        self._inflight: dict[str, threading.Event] = {}
        self._distrusted: set[str] = set()
        self._lock = threading.Lock()

    @property
    def borrows_buffers(self) -> bool:
        """put_chunk may be given a view of a buffer the caller reuses: a
        local directory writes it out before returning. Other backends (and
        test doubles) may keep what they are given: put_chunk hands them a
        copy, and a caller with bytes of its own passes those (no copy)."""
        return isinstance(self.backend, LocalBackend)

    @property
    def display(self) -> str:
        return self.backend.display

    @classmethod
    def open(cls, backend: Backend, *, create: bool) -> Repository | None:
        """Open the repository; None if there is none and create is False."""
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
            raw = backend.read(CONFIG_KEY)
        try:
            config = json.loads(raw)
            if not isinstance(config, dict):
                raise ValueError("not an object")
        except ValueError as exc:
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
        # (which refuse such a chunk_size) that no restore could read.
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
            raise ConfigError(f"repository {backend.display} has a bad chunk_size")
        return cls(backend, chunk_size, hash_name)

    # -- snapshots

    def snapshots(self, stream: str | None = None) -> list[SnapshotRef]:
        """Every snapshot name of this stream (or `stream`), newest (highest
        generation) first."""
        stream = self.stream if stream is None else stream
        refs = []
        for key in self.backend.list(stream + SNAPSHOTS):
            m = SNAPSHOT_RE.match(key[len(stream) :])
            if m and key.startswith(stream):
                refs.append(SnapshotRef(int(m.group(1)), m.group(2), key, stream))
        refs.sort(key=lambda r: (r.generation, r.id), reverse=True)
        return refs

    def rank_snapshots(self) -> dict[int, list[SnapshotRef]]:
        """Every rank's stream under ranks/ (one listing), newest first each."""
        out: dict[int, list[SnapshotRef]] = {}
        for key in self.backend.list(RANKS):
            m = _STREAM_RE.match(key)
            if not m:
                continue
            stream = m.group(0)
            sm = SNAPSHOT_RE.match(key[len(stream) :])
            if sm:
                ref = SnapshotRef(int(sm.group(1)), sm.group(2), key, stream)
                out.setdefault(int(m.group(1)), []).append(ref)
        for refs in out.values():
            refs.sort(key=lambda r: (r.generation, r.id), reverse=True)
        return out

    def find(self, wanted: str) -> SnapshotRef | None:
        """A snapshot by id, id prefix (unique), or generation number, in this
        stream; else by id or unique id prefix in any rank's stream."""
        refs = self.snapshots()
        exact = [r for r in refs if r.id == wanted]
        if exact:
            return exact[0]
        if wanted.isdigit():
            by_gen = [r for r in refs if r.generation == int(wanted)]
            if by_gen:
                return by_gen[0]
        prefixed = [r for r in refs if r.id.startswith(wanted)] if len(wanted) >= 4 else []
        if len(prefixed) == 1:
            return prefixed[0]
        if prefixed or len(wanted) < 4:
            return None
        others = [r for rs in self.rank_snapshots().values() for r in rs if r.stream != self.stream]
        exact = [r for r in others if r.id == wanted]
        prefixed = exact or [r for r in others if r.id.startswith(wanted)]
        return prefixed[0] if len(prefixed) == 1 else None

    def all_snapshots(self) -> list[SnapshotRef]:
        """This stream's snapshots, then every other rank's (`ckpt verify`)."""
        refs = self.snapshots()
        for rank_refs in self.rank_snapshots().values():
            refs += [r for r in rank_refs if r.stream != self.stream]
        return refs

    def load(self, ref: SnapshotRef) -> Manifest:
        try:
            data = self.backend.read(ref.key)
        except NotFound:
            raise ManifestError("has disappeared (pruned by another process?)") from None
        return self.parse_manifest(data, ref.key)

    def parse_manifest(self, data: bytes, key: str) -> Manifest:
        """Manifest.from_bytes, and the manifest must name chunks by this
        repository's hash (its chunks could never verify otherwise)."""
        manifest = Manifest.from_bytes(data, _STREAM_RE.sub("", key, count=1))
        if manifest.hash != self.hash_name:
            raise ManifestError(
                f"names its chunks by {manifest.hash}, the repository by {self.hash_name}"
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

    # -- chunks

    def _known_chunks(self) -> set[str]:
        with self._lock:
            if self._known is None:
                names = self.backend.list(CHUNKS)
                self._known = {n.rsplit("/", 1)[-1] for n in names} - self._distrusted
            return self._known

    def has_chunk(self, digest: str) -> bool:
        return digest in self._known_chunks()

    def put_chunk(self, digest: str, data: bytes | memoryview) -> bool:
        """Store a chunk unless it is known to exist; True if bytes were sent.
        Concurrent puts of the same digest send it once: the others wait."""
        known = self._known_chunks()
        while True:
            with self._lock:
                if digest in known:
                    return False
                busy = self._inflight.get(digest)
                if busy is None:
                    self._inflight[digest] = threading.Event()
                    break
            busy.wait()  # the other put either stored it or failed; look again
        try:
            payload = data if self.borrows_buffers else bytes(data)
            self.backend.write(chunk_key(digest), payload)  # type: ignore[arg-type]
            with self._lock:
                known.add(digest)
        finally:
            with self._lock:
                self._inflight.pop(digest).set()
        return True

    def get_chunk(self, digest: str, expected_size: int | None = None) -> bytes:
        """Read and verify a chunk; ChunkError if missing, short or corrupt."""
        try:
            data = self.backend.read(chunk_key(digest))
        except NotFound:
            try:  # taken out by a multi-rank GC round that a late manifest names
                data = self.backend.read(trash_key(digest))
            except NotFound:
                raise ChunkError(digest, "is missing") from None
        if expected_size is not None and len(data) != expected_size:
            raise ChunkError(digest, f"has {len(data)} bytes, expected {expected_size}")
        if self.hash(data) != digest:
            raise ChunkError(digest, "is corrupt (hash mismatch)")
        return data

    def read_chunk_into(self, digest: str, view: memoryview) -> None:
        """Fill view (the chunk's expected size) with the chunk and verify it;
        ChunkError if missing, of another size or corrupt. A local directory
        reads straight into view (no allocation per chunk)."""
        if not isinstance(self.backend, LocalBackend):
            view[:] = self.get_chunk(digest, len(view))
            return
        try:
            size = self.backend.read_into(chunk_key(digest), view)
        except NotFound:
            try:
                size = self.backend.read_into(trash_key(digest), view)
            except NotFound:
                raise ChunkError(digest, "is missing") from None
        if size != len(view):
            raise ChunkError(digest, f"has {size} bytes, expected {len(view)}")
        if self.hash(view) != digest:
            raise ChunkError(digest, "is corrupt (hash mismatch)")

    def forget_chunk(self, digest: str) -> None:
        """A chunk found damaged (or deleted): upload it again next time it is
        seen, even if a later listing still shows the damaged object."""
        with self._lock:
            self._distrusted.add(digest)
            if self._known is not None:
                self._known.discard(digest)

    def trust_chunk(self, digest: str) -> None:
        """A chunk just read back and verified: it exists and is whole."""
        with self._lock:
            self._distrusted.discard(digest)
            if self._known is not None:
                self._known.add(digest)

    # -- retention

    def gc(self, keep: int, *, sweep: bool = True) -> GcReport:
        """Keep the newest `keep` snapshots; delete older manifests, then chunks
        no kept manifest names. Only the lease holder may call this; it runs
        between snapshots, so no upload of this writer is in flight.

        sweep=True lists every chunk and deletes all unreferenced ones (also
        orphans of uploads that crashed before their manifest); sweep=False
        only considers the chunks the dropped manifests named (no listing)."""
        if self.stream:
            raise ValueError("gc() prunes the single-node stream; ranks prune with world.prune")
        refs = self.snapshots()
        kept, dropped = refs[:keep], refs[keep:]
        if not dropped and not sweep:
            return GcReport([], 0, [r.key for r in kept])
        referenced = self.rank_chunks()
        for ref in kept:
            try:
                referenced |= self.load(ref).chunk_digests()
            except ManifestError:
                continue  # a damaged manifest needs nothing; it is kept for inspection
        candidates: set[str] = set()
        for ref in dropped:
            if not sweep:
                # A damaged dropped manifest's chunks wait for the next sweep.
                with contextlib.suppress(ManifestError):
                    candidates |= self.load(ref).chunk_digests()
            self.backend.delete(ref.key)
        if sweep:
            names = (n.rsplit("/", 1)[-1] for n in self.backend.list(CHUNKS))
            candidates = {d for d in names if HASH_RE.match(d)}
            # Half-written chunks of a writer killed mid-upload (local disks and
            # SFTP write to a temp name first). Only the lease holder sweeps, on
            # its snapshot thread between snapshots: none of them is its own.
            for key in self.backend.list(CHUNKS, temp=True):
                self.backend.delete(key)
        deleted = 0
        for digest in sorted(candidates - referenced):
            self.backend.delete(chunk_key(digest))
            self.forget_chunk(digest)
            deleted += 1
        return GcReport([r.key for r in dropped], deleted, [r.key for r in kept])

    def rank_chunks(self) -> set[str]:
        """Every chunk a rank stream's manifest names: the single-node stream's
        retention never deletes them (a repository a multi-node run wrote too)."""
        out: set[str] = set()
        for refs in self.rank_snapshots().values():
            for ref in refs:
                with contextlib.suppress(ManifestError):
                    out |= self.load(ref).chunk_digests()
        return out

    def present_chunks(self) -> set[str]:
        """Every readable chunk: chunks/, and trash/, where a multi-node GC
        round keeps them until every rank has seen it (get_chunk reads both)."""
        names = (n.rsplit("/", 1)[-1] for p in (CHUNKS, TRASH) for n in self.backend.list(p))
        return {d for d in names if HASH_RE.match(d)}

    def list_chunks(self) -> set[str]:
        """Every chunk in the store, by one listing of chunks/ (never cached:
        `ckpt verify` and `ckpt ls` want the store as it is now)."""
        names = (n.rsplit("/", 1)[-1] for n in self.backend.list(CHUNKS))
        return {d for d in names if HASH_RE.match(d)}

    def plan_gc(self, keep: int) -> GcPlan:
        """What gc(keep) would delete now, and the bytes it would free; reads
        every manifest, lists chunks/ once, deletes nothing (no lease needed)."""
        refs = self.snapshots()
        kept, dropped = refs[:keep], refs[keep:]
        referenced = self.rank_chunks()
        for ref in kept:
            with contextlib.suppress(ManifestError):
                referenced |= self.load(ref).chunk_digests()
        sizes: dict[str, int] = {}
        for ref in dropped:
            with contextlib.suppress(ManifestError):
                sizes.update(chunk_sizes(self.load(ref)))
        unreferenced = self.list_chunks() - referenced
        temps = self.backend.list(CHUNKS, temp=True) + self.backend.list(SNAPSHOTS, temp=True)
        return GcPlan(kept, dropped, {d: sizes.get(d) for d in sorted(unreferenced)}, temps)

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
