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
listing snapshots/; GC deletes old manifests first, then chunks no kept
manifest names. Retention counts restorable snapshots only (`retained`): a
damaged or suspect one never displaces a whole one, nor an unverified one
a verified one. Which snapshot a restore uses: `restore_tier` (verified or
older than checks first, then unverified, then suspect; newest first in
each). The manifest format is in `manifest`, the lease in `lease`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import secrets
import threading
import time
from collections.abc import Collection, Iterable, Iterator, Sequence

from ckpt_cli.errors import ConfigError
from ckpt_cli.lease import LEASE_KEY, Lease
from ckpt_cli.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    HASH_NAME,
    HASH_RE,
    HASHES,
    MAX_CHUNK_SIZE,
    SNAPSHOT_RE,
    SNAPSHOTS,
    Manifest,
    ManifestError,
    hasher,
    host_name,
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


def snapshot_ref(key: str) -> SnapshotRef | None:
    """The snapshot a key names (in the root stream or a rank's), else None."""
    m = _STREAM_RE.match(key)
    stream = m.group(0) if m else ""
    sm = SNAPSHOT_RE.match(key[len(stream) :])
    return SnapshotRef(int(sm.group(1)), sm.group(2), key, stream) if sm else None


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
    """What a collection (`world.collect`) deleted, or would delete in a dry run."""

    kept: list[SnapshotRef]
    dropped: list[SnapshotRef]
    #: Chunks deleted -> their size where a manifest says it; None for chunks
    #: no manifest names at all (a killed upload's).
    chunks: dict[str, int | None]
    #: Half-written objects of killed writers.
    temps: list[str]

    @property
    def known_bytes(self) -> int:
        return sum(n for n in self.chunks.values() if n is not None)

    @property
    def unsized(self) -> int:
        return sum(1 for n in self.chunks.values() if n is None)


#: How retention counts a snapshot (`snapshot_kind`): a verified (or
#: older than checks) restorable one counts; an unverified one is restorable
#: but counts only as a last resort; a damaged or suspect one is not restorable.
WHOLE, UNVERIFIED, NOT_RESTORABLE = "whole", "unverified", "not restorable"


def snapshot_kind(m: Manifest | ManifestError, restorable: bool, suspect: bool) -> str:
    """How retention counts one snapshot (see `retained`)."""
    if isinstance(m, ManifestError) or not restorable or suspect:
        return NOT_RESTORABLE
    return UNVERIFIED if m.verified is False else WHOLE


def retained(
    snapshots: Sequence[tuple[SnapshotRef, bool | str]], keep: int
) -> tuple[list[SnapshotRef], list[SnapshotRef]]:
    """Retention's rule over one stream, newest first, each with how it
    counts (`snapshot_kind`; True is WHOLE, False NOT_RESTORABLE): (kept,
    dropped). A snapshot is kept while fewer than `keep` whole ones are newer
    than it: the `keep` newest whole ones, every damaged or suspect one newer
    than the oldest of those (kept for inspection, never counted), and of the
    unverified ones among them the `keep` newest. So neither a damaged nor an
    unverified snapshot displaces a verified one (the one a restore picks),
    unverified ones never pile up, and no snapshot is dropped that "the
    `keep` newest" would have kept."""
    kept: list[SnapshotRef] = []
    dropped: list[SnapshotRef] = []
    whole = unverified = 0
    for ref, how in snapshots:
        kind = how if isinstance(how, str) else WHOLE if how else NOT_RESTORABLE
        keep_it = whole < keep and (kind != UNVERIFIED or unverified < keep)
        (kept if keep_it else dropped).append(ref)
        whole += kind == WHOLE
        unverified += kind == UNVERIFIED
    return kept, dropped


#: Which snapshots a restore tries first (`restore_tier`): verified ones and
#: those written before ckpt checked, then unverified ones (taken while a
#: file was in progress), then suspect ones (marked by the crash-loop guard);
#: newest first within each.
PREFERRED, UNVERIFIED_TIER, SUSPECT_TIER = 0, 1, 2


def restore_tier(m: Manifest, suspect: bool) -> int:
    if suspect:
        return SUSPECT_TIER
    return UNVERIFIED_TIER if m.verified is False else PREFERRED


def pick(
    loaded: Iterable[tuple[SnapshotRef, Manifest | ManifestError]], suspect: Collection[str]
) -> tuple[SnapshotRef, Manifest] | None:
    """The snapshot a restore uses, of `loaded` (newest first; damaged ones
    are passed over): the first preferred one, else the best of the others
    by tier. Reads `loaded` only as far as that first preferred one."""
    best: tuple[int, SnapshotRef, Manifest] | None = None
    for ref, m in loaded:
        if isinstance(m, ManifestError):
            continue
        tier = restore_tier(m, ref.key in suspect)
        if tier == PREFERRED:
            return ref, m
        if best is None or tier < best[0]:
            best = (tier, ref, m)
    return None if best is None else (best[1], best[2])


def unverified_note(m: Manifest, shown: int = 3) -> str:
    """The files an unverified snapshot took while in progress, and why."""
    items = [f"{p} ({why})" for p, why in m.unverified[:shown]]
    more = f" and {len(m.unverified) - shown} more" if len(m.unverified) > shown else ""
    return ", ".join(items) + more if items else "no file named"


# ---------------------------------------------------------------- suspect marks

SUSPECT = "suspect/"
SUSPECT_FORMAT = "ckpt-suspect"
#: Bytes a mark may have before it is taken for garbage.
MAX_MARK = 64 * 1024


def suspect_key(snapshot_key: str) -> str:
    """Where the mark of the snapshot at `snapshot_key` lives."""
    return f"{SUSPECT}{snapshot_key}"


@dataclasses.dataclass(frozen=True)
class Suspect:
    """A crash-loop mark: why, when and where it was set."""

    key: str  # the snapshot's key
    why: str
    time: float | None = None
    host: str = ""
    run: str = ""

    def to_json(self) -> dict[str, object]:
        return {"why": self.why, "time": self.time, "host": self.host, "run": self.run}


def parse_suspect(snapshot_key: str, raw: bytes) -> Suspect:
    """A mark as written by mark_suspect; one that does not parse still
    marks its snapshot (its object's name says which)."""
    unreadable = Suspect(snapshot_key, "marked suspect (its mark does not parse)")
    if len(raw) > MAX_MARK:
        return unreadable
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return unreadable
    if not isinstance(doc, dict) or doc.get("format") != SUSPECT_FORMAT:
        return unreadable
    when = doc.get("time")
    if isinstance(when, bool) or not isinstance(when, int | float) or not 0 <= when <= 1e11:
        when = None
    return Suspect(
        snapshot_key,
        str(doc.get("why", ""))[:500] or "marked suspect",
        None if when is None else float(when),
        str(doc.get("host", ""))[:255],
        str(doc.get("run", ""))[:100],
    )


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
        #: Manifests by key as load_cached read them (or the error): they are
        #: written once and never changed, so retention, run after every
        #: snapshot, reads each one once per process.
        self.loaded: dict[str, Manifest | ManifestError] = {}
        #: Whether each snapshot (by key) is restorable, as judged (see judge).
        self._verdicts: dict[str, bool] = {}
        self.chunk_size = chunk_size
        self.hash_name = hash_name
        #: The hex digest of a chunk, by the repository's own hash (ckpt.json).
        self.hash = hasher(hash_name)
        self._known: set[str] | None = None
        self._inflight: dict[str, threading.Event] = {}
        self._distrusted: set[str] = set()
        self._lock = threading.Lock()
        #: Snapshot keys marked suspect, as last listed (None: not yet), and
        #: those this process marked (counted even if writing the mark failed).
        self._suspect: set[str] | None = None
        self._marked: set[str] = set()

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
        for key in keys:
            self.loaded.pop(key, None)
            self._verdicts.pop(key, None)

    def parse_manifest(self, data: bytes, key: str) -> Manifest:
        """Manifest.from_bytes, and the manifest must name chunks by this
        repository's hash (its chunks could never verify otherwise)."""
        manifest = Manifest.from_bytes(data, _STREAM_RE.sub("", key, count=1))
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
        if expected_size is not None and isinstance(self.backend, LocalBackend):
            # Never more than the expected size in memory (a planted object
            # may be of any size); other backends read the object whole.
            buf = bytearray(expected_size)
            self.read_chunk_into(digest, memoryview(buf))
            return bytes(buf)
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

    # -- suspect marks (the crash-loop guard)

    def suspect_keys(self, *, cached: bool = False) -> set[str]:
        """The keys of every snapshot marked suspect (any stream), by one
        listing of suspect/; cached: the last listing if there was one (the
        snapshot thread's retention: marks are only ever set by the writer)."""
        with self._lock:
            if cached and self._suspect is not None:
                return self._suspect | self._marked
        found = set()
        for key in self.backend.list(SUSPECT):
            snapshot_key = key[len(SUSPECT) :]
            if snapshot_ref(snapshot_key) is not None:
                found.add(snapshot_key)
        with self._lock:
            self._suspect = found
            return found | self._marked

    def read_suspect(self, snapshot_key: str) -> Suspect | None:
        """The mark of a snapshot, None if it has none."""
        try:
            raw = self.backend.read(suspect_key(snapshot_key))
        except NotFound:
            with self._lock:
                marked = snapshot_key in self._marked
            return Suspect(snapshot_key, "marked suspect by this run") if marked else None
        return parse_suspect(snapshot_key, raw)

    def mark_suspect(self, ref: SnapshotRef, why: str, **details: object) -> None:
        """Mark a snapshot suspect (a small object; the snapshot is untouched).
        It counts as suspect in this process even if the write fails
        (RemoteError is raised then)."""
        with self._lock:
            self._marked.add(ref.key)
        doc = {
            "format": SUSPECT_FORMAT,
            "version": 1,
            "snapshot": ref.id,
            "generation": ref.generation,
            "stream": ref.stream,
            "why": why,
            "time": time.time(),
            "host": host_name(),
            **details,
        }
        self.backend.write(suspect_key(ref.key), json.dumps(doc, indent=1).encode())

    def clear_suspect(self, ref: SnapshotRef) -> bool:
        """Remove a snapshot's mark; False if it had none."""
        key = suspect_key(ref.key)
        try:
            self.backend.read(key)
        except NotFound:
            return False
        self.backend.delete(key)
        with self._lock:
            self._marked.discard(ref.key)
            if self._suspect is not None:
                self._suspect.discard(ref.key)
        return True

    def drop_marks(self, dropped: Iterable[SnapshotRef], suspect: Collection[str]) -> None:
        """Retention dropped these snapshots: their marks go too."""
        for ref in dropped:
            if ref.key in suspect:
                self.backend.delete(suspect_key(ref.key))
                with self._lock:
                    self._marked.discard(ref.key)
                    if self._suspect is not None:
                        self._suspect.discard(ref.key)

    # -- retention

    def judge(
        self,
        loaded: Iterable[tuple[SnapshotRef, Manifest | ManifestError]],
        present: set[str] | None = None,
    ) -> dict[str, bool]:
        """Whether each snapshot can be restored (key -> bool): its manifest
        parses and every chunk it names is in the store.

        With `present` (one listing of chunks/ and trash/), every snapshot is
        judged by it. Without, a snapshot judged before keeps its verdict and
        one first seen now is whole if it parses: a writer writes a manifest
        after every chunk it names, and retention never deletes a chunk a
        kept manifest names, so only a chunk deleted behind ckpt's back since
        could be missing (the next listing finds that). This is what keeps
        retention on the snapshot thread free of a listing per snapshot."""
        out: dict[str, bool] = {}
        for ref, m in loaded:
            if isinstance(m, ManifestError):
                verdict = False
            elif present is not None:
                verdict = m.chunk_digests() <= present
            else:
                verdict = self._verdicts.get(ref.key, True)
            out[ref.key] = self._verdicts[ref.key] = verdict
        return out

    def _loaded(
        self, refs: list[SnapshotRef]
    ) -> list[tuple[SnapshotRef, Manifest | ManifestError]]:
        out: list[tuple[SnapshotRef, Manifest | ManifestError]] = []
        for ref in refs:
            try:
                out.append((ref, self.load_cached(ref)))
            except ManifestError as exc:
                out.append((ref, exc))
        return out

    def gc(self, keep: int, *, sweep: bool = True) -> GcReport:
        """Retention of the single-node stream: keep the newest `keep`
        restorable (verified, not suspect) snapshots and every damaged,
        suspect or unverified one newer than them (`retained`); delete older
        manifests and their suspect marks, then chunks no remaining manifest
        names. Only
        the lease holder may call this; it runs between snapshots, so no
        upload of this writer is in flight.

        sweep=True lists every chunk (chunks/ and trash/), judges every
        snapshot by that listing, and deletes all unreferenced chunks (also
        orphans of uploads that crashed before their manifest); sweep=False
        lists nothing (see judge) and only considers the chunks the dropped
        manifests named."""
        if self.stream:
            raise ValueError("gc() prunes the single-node stream; ranks prune with world.prune")
        refs = self.snapshots()
        listed = self.list_chunks() if sweep else None
        present = listed | self.trash_chunks() if listed is not None else None
        loaded = self._loaded(refs)
        whole = self.judge(loaded, present)
        suspect = self.suspect_keys(cached=not sweep)
        kinds = [(r, snapshot_kind(m, whole[r.key], r.key in suspect)) for r, m in loaded]
        kept, dropped = retained(kinds, keep)
        if not dropped and not sweep:
            return GcReport([], 0, [r.key for r in kept])
        referenced = self.rank_chunks()
        candidates: set[str] = set()
        dropped_keys = {r.key for r in dropped}
        for ref, m in loaded:
            if isinstance(m, ManifestError):
                continue  # a damaged manifest names nothing we could read
            if ref.key in dropped_keys:
                if listed is None:
                    candidates |= m.chunk_digests()
            else:
                referenced |= m.chunk_digests()
        for ref in dropped:
            self.backend.delete(ref.key)
        self.forget_manifests(r.key for r in dropped)
        self.drop_marks(dropped, suspect)
        if listed is not None:
            candidates = listed
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
                    out |= self.load_cached(ref).chunk_digests()
        return out

    def present_chunks(self) -> set[str]:
        """Every readable chunk: chunks/, and trash/, where a multi-node GC
        round keeps them until every rank has seen it (get_chunk reads both)."""
        return self.list_chunks() | self.trash_chunks()

    def list_chunks(self) -> set[str]:
        """Every chunk in the store, by one listing of chunks/ (never cached:
        `ckpt verify` and `ckpt ls` want the store as it is now)."""
        return _digests(self.backend.list(CHUNKS))

    def trash_chunks(self) -> set[str]:
        """Every chunk a multi-node GC round moved to trash/, by one listing."""
        return _digests(self.backend.list(TRASH))

    # -- lease

    def lease(self, owner: str, ttl: float) -> Lease:
        return Lease(self.backend, owner, ttl, key=self.stream + LEASE_KEY)


class Recorder:
    """A backend for one collection (`ckpt gc`): reads pass through; every
    delete of an object that exists is recorded (`deleted`), as is every key
    a listing of temp names returned (`temps`). With dry_run it deletes,
    renames and writes nothing, and shows the code after them the store as
    if it had (an overlay): a dry run goes through the very code of the real
    one and records what that would delete."""

    def __init__(self, backend: Backend, *, dry_run: bool) -> None:
        self.inner = backend
        self.display = backend.display
        self.dry_run = dry_run
        self.deleted: list[str] = []
        self.temps: set[str] = set()
        #: Keys gone (deleted or moved away), and keys that appeared: the
        #: bytes written, or the key whose object was moved here.
        self._gone: set[str] = set()
        self._new: dict[str, bytes | str] = {}
        #: One listing per top-level prefix, for whether an object exists.
        self._listed: dict[str, set[str]] = {}

    def _exists(self, key: str) -> bool:
        if key in self._new:
            return True
        if key in self._gone:
            return False
        if key in self.temps:  # hidden from a plain listing
            return True
        top = key.split("/", 1)[0] + "/" if "/" in key else ""
        if top not in self._listed:
            self._listed[top] = set(self.inner.list(top))
        return key in self._listed[top]

    def read(self, key: str) -> bytes:
        new = self._new.get(key)
        if new is not None:
            return new if isinstance(new, bytes) else self.inner.read(new)
        if key in self._gone:
            raise NotFound(key)
        return self.inner.read(key)

    def write(self, key: str, data: bytes) -> None:
        if not self.dry_run:
            self.inner.write(key, data)
        self._new[key] = bytes(data)
        self._gone.discard(key)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        if not self.dry_run:
            return self.inner.create_exclusive(key, data)
        if self._exists(key):
            return False
        self.write(key, data)
        return True

    def delete(self, key: str) -> None:
        if self._exists(key):
            self.deleted.append(key)
        if not self.dry_run:
            self.inner.delete(key)
        self._new.pop(key, None)
        self._gone.add(key)

    def rename(self, src: str, dst: str) -> None:
        if not self.dry_run:
            self.inner.rename(src, dst)
            self._new.pop(src, None)
            self._new[dst] = dst  # there now: read it there
        elif not self._exists(src):
            raise NotFound(src)
        else:
            self._new[dst] = self._new.pop(src, src)
        self._gone.add(src)
        self._gone.discard(dst)

    def list(self, prefix: str, *, temp: bool = False) -> list[str]:
        keys = self.inner.list(prefix, temp=temp)
        if self.dry_run:
            keys = [k for k in keys if k not in self._gone]
            if not temp:
                seen = set(keys)
                keys += [k for k in self._new if k.startswith(prefix) and k not in seen]
        if temp:
            self.temps.update(keys)
        return keys


def _digests(keys: Iterable[str]) -> set[str]:
    names = (k.rsplit("/", 1)[-1] for k in keys)
    return {d for d in names if HASH_RE.match(d)}


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
