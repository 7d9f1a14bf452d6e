"""The storage format: versioned config, content-addressed chunks, write-once
manifests, a single-writer lease, retention and garbage collection.

    ckpt.json                      {"format": "ckpt", "version": 1, "chunk_size", "hash"}
    chunks/<h[:2]>/<h>             file contents in fixed-size chunks, named by sha256
    snapshots/<gen:010d>-<id>.json manifest, written in one put after its chunks
    lease.json                     the writer's lease, refreshed by a heartbeat

Ordering: chunks before the manifest that names them; "latest" is derived by
listing snapshots/; GC deletes old manifests first, then chunks no kept
manifest names. Imports: standard library and `remote` (never fsspec itself).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import posixpath
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from ckpt_cli.errors import ConfigError, LeaseHeldError, RemoteError
from ckpt_cli.remote import Backend, NotFound

FORMAT_NAME = "ckpt"
FORMAT_VERSION = 1
DEFAULT_CHUNK_SIZE = 8 * 1024 * 1024
HASH_NAME = "sha256"
CONFIG_KEY = "ckpt.json"
LEASE_KEY = "lease.json"
SNAPSHOTS = "snapshots/"
CHUNKS = "chunks/"
#: The largest file a manifest may describe (1 PiB): anything larger is corrupt.
MAX_FILE_SIZE = 1 << 50

_SNAPSHOT_RE = re.compile(r"^snapshots/(\d{10})-([0-9a-f]{8})\.json$")
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(Exception):
    """A manifest that cannot be trusted: unreadable, malformed or unsafe."""


class ChunkError(Exception):
    """A chunk that is missing or whose bytes do not match its name."""

    def __init__(self, digest: str, problem: str) -> None:
        super().__init__(f"chunk {digest[:12]} {problem}")
        self.digest = digest


class LeaseLostError(RemoteError):
    """Another writer took the lease over: this one must stop writing."""


def chunk_key(digest: str) -> str:
    return f"{CHUNKS}{digest[:2]}/{digest}"


def hash_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def host_name() -> str:
    return socket.gethostname()


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


# ---------------------------------------------------------------- manifests


@dataclasses.dataclass(frozen=True)
class Entry:
    """One path in a snapshot: a regular file, a directory or a symlink."""

    path: str
    type: str  # "file" | "dir" | "symlink"
    mode: int = 0o644
    size: int = 0
    mtime_ns: int = 0
    chunks: tuple[str, ...] = ()
    target: str = ""
    ino: int = 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "type": self.type, "mode": self.mode}
        if self.type == "file":
            out.update(
                size=self.size, mtime_ns=self.mtime_ns, ino=self.ino, chunks=list(self.chunks)
            )
        elif self.type == "symlink":
            out["target"] = self.target
        else:
            out["mtime_ns"] = self.mtime_ns
        return out

    def same_content(self, other: Entry) -> bool:
        """Equal as far as a restore is concerned (ignores the local inode)."""
        return dataclasses.replace(self, ino=0) == dataclasses.replace(other, ino=0)


@dataclasses.dataclass(frozen=True)
class Manifest:
    id: str
    generation: int
    entries: tuple[Entry, ...]
    chunk_size: int
    created: float
    parent: str | None = None
    host: str = ""
    source: str = ""  # absolute local dir the snapshot was taken from
    run: str = ""
    attempt: int = 0
    reason: str = ""
    new_bytes: int = 0
    new_chunks: int = 0

    @property
    def key(self) -> str:
        return f"{SNAPSHOTS}{self.generation:010d}-{self.id}.json"

    @property
    def files(self) -> list[Entry]:
        return [e for e in self.entries if e.type == "file"]

    @property
    def total_size(self) -> int:
        return sum(e.size for e in self.entries if e.type == "file")

    def chunk_digests(self) -> set[str]:
        return {c for e in self.entries for c in e.chunks}

    def to_bytes(self) -> bytes:
        doc = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "id": self.id,
            "generation": self.generation,
            "parent": self.parent,
            "created": self.created,
            "host": self.host,
            "source": self.source,
            "run": self.run,
            "attempt": self.attempt,
            "reason": self.reason,
            "chunk_size": self.chunk_size,
            "hash": HASH_NAME,
            "new_bytes": self.new_bytes,
            "new_chunks": self.new_chunks,
            "files": len(self.files),
            "size": self.total_size,
            "entries": [e.to_json() for e in self.entries],
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes, key: str) -> Manifest:
        """Parse and validate; ManifestError names what is wrong."""
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise ManifestError(f"is not valid JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise ManifestError("is not a JSON object")
        if doc.get("format") != FORMAT_NAME or doc.get("version") != FORMAT_VERSION:
            raise ManifestError(
                f"has format {doc.get('format')!r} version {doc.get('version')!r}; "
                f"this ckpt reads {FORMAT_NAME!r} version {FORMAT_VERSION}"
            )
        match = _SNAPSHOT_RE.match(key)
        try:
            generation = _int(doc, "generation", 0, 10**10 - 1)
            snap_id = doc["id"]
            if match and (int(match.group(1)) != generation or match.group(2) != snap_id):
                raise ManifestError("does not match its own name")
            chunk_size = _int(doc, "chunk_size", 1, 1 << 34)
            if doc.get("hash", HASH_NAME) != HASH_NAME:
                raise ManifestError(f"uses hash {doc.get('hash')!r}; this ckpt knows {HASH_NAME}")
            raw_entries = doc["entries"]
            if not isinstance(raw_entries, list):
                raise ManifestError("entries is not a list")
            entries = tuple(_parse_entry(e, chunk_size) for e in raw_entries)
            _check_tree(entries)
            return cls(
                id=str(snap_id),
                generation=generation,
                entries=entries,
                chunk_size=chunk_size,
                created=float(doc["created"]),
                parent=doc.get("parent"),
                host=str(doc.get("host", "")),
                source=str(doc.get("source", "")),
                run=str(doc.get("run", "")),
                attempt=int(doc.get("attempt", 0)),
                reason=str(doc.get("reason", "")),
                new_bytes=int(doc.get("new_bytes", 0)),
                new_chunks=int(doc.get("new_chunks", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"is malformed ({type(exc).__name__}: {exc})") from None


def _int(doc: dict[str, Any], name: str, low: int, high: int) -> int:
    value = doc[name]
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ManifestError(f"has an impossible {name}: {value!r}")
    return value


def safe_relpath(path: object) -> str:
    """A normalised relative path that stays inside its root, or ManifestError."""
    if not isinstance(path, str) or not path:
        raise ManifestError(f"has an empty or non-text path {path!r}")
    if "\0" in path or path.startswith("/"):
        raise ManifestError(f"has an unsafe path {path!r}")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts) or posixpath.normpath(path) != path:
        raise ManifestError(f"has a path that escapes or is not normalised: {path!r}")
    return path


def _parse_entry(raw: Any, chunk_size: int) -> Entry:
    if not isinstance(raw, dict):
        raise ManifestError("has an entry that is not an object")
    path = safe_relpath(raw.get("path"))
    kind = raw.get("type")
    mode = _int(raw, "mode", 0, 0o7777)
    if kind == "file":
        size = _int(raw, "size", 0, MAX_FILE_SIZE)
        chunks = raw["chunks"]
        if not isinstance(chunks, list) or not all(
            isinstance(c, str) and _HASH_RE.match(c) for c in chunks
        ):
            raise ManifestError(f"has bad chunk names for {path!r}")
        if len(chunks) != -(-size // chunk_size):
            raise ManifestError(f"lists {len(chunks)} chunks for {path!r} of {size} bytes")
        return Entry(
            path,
            "file",
            mode,
            size,
            int(raw.get("mtime_ns", 0)),
            tuple(chunks),
            ino=int(raw.get("ino", 0)),
        )
    if kind == "dir":
        return Entry(path, "dir", mode, mtime_ns=int(raw.get("mtime_ns", 0)))
    if kind == "symlink":
        target = raw.get("target")
        if not isinstance(target, str) or not target or "\0" in target:
            raise ManifestError(f"has a bad symlink target for {path!r}")
        return Entry(path, "symlink", mode, target=target)
    raise ManifestError(f"has an entry of unknown type {kind!r} at {path!r}")


def _check_tree(entries: tuple[Entry, ...]) -> None:
    """No duplicates, and nothing below a path that is not a directory."""
    kinds: dict[str, str] = {}
    for e in entries:
        if e.path in kinds:
            raise ManifestError(f"lists {e.path!r} twice")
        kinds[e.path] = e.type
    for e in entries:
        parent = posixpath.dirname(e.path)
        while parent:
            if kinds.get(parent, "dir") != "dir":
                raise ManifestError(f"puts {e.path!r} below a {kinds[parent]} {parent!r}")
            parent = posixpath.dirname(parent)


@dataclasses.dataclass(frozen=True)
class SnapshotRef:
    """A snapshot known by its name only (listing is cheap; loading is not)."""

    generation: int
    id: str
    key: str


@dataclasses.dataclass
class GcReport:
    deleted_snapshots: list[str]
    deleted_chunks: int
    kept: list[str]


# ---------------------------------------------------------------- repository


class Repository:
    """One remote in the ckpt format. Thread-safe for concurrent chunk puts."""

    def __init__(self, backend: Backend, chunk_size: int) -> None:
        self.backend = backend
        self.chunk_size = chunk_size
        self._known: set[str] | None = None
        self._inflight: dict[str, threading.Event] = {}
        self._distrusted: set[str] = set()
        self._lock = threading.Lock()

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
        if config.get("hash") != HASH_NAME:
            raise ConfigError(f"repository {backend.display} uses hash {config.get('hash')!r}")
        chunk_size = config.get("chunk_size")
        if not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ConfigError(f"repository {backend.display} has a bad chunk_size")
        return cls(backend, chunk_size)

    # -- snapshots

    def snapshots(self) -> list[SnapshotRef]:
        """Every snapshot name, newest (highest generation) first."""
        refs = []
        for key in self.backend.list(SNAPSHOTS):
            m = _SNAPSHOT_RE.match(key)
            if m:
                refs.append(SnapshotRef(int(m.group(1)), m.group(2), key))
        refs.sort(key=lambda r: (r.generation, r.id), reverse=True)
        return refs

    def find(self, wanted: str) -> SnapshotRef | None:
        """A snapshot by id, id prefix (unique), or generation number."""
        refs = self.snapshots()
        exact = [r for r in refs if r.id == wanted]
        if exact:
            return exact[0]
        if wanted.isdigit():
            by_gen = [r for r in refs if r.generation == int(wanted)]
            if by_gen:
                return by_gen[0]
        prefixed = [r for r in refs if r.id.startswith(wanted)] if len(wanted) >= 4 else []
        return prefixed[0] if len(prefixed) == 1 else None

    def load(self, ref: SnapshotRef) -> Manifest:
        try:
            data = self.backend.read(ref.key)
        except NotFound:
            raise ManifestError("has disappeared (pruned by another process?)") from None
        return Manifest.from_bytes(data, ref.key)

    def next_generation(self) -> int:
        refs = self.snapshots()
        return refs[0].generation + 1 if refs else 1

    def write_manifest(self, manifest: Manifest) -> None:
        """The commit point of a snapshot: written once, after all its chunks."""
        self.backend.write(manifest.key, manifest.to_bytes())

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
            self.backend.write(chunk_key(digest), bytes(data))
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
            raise ChunkError(digest, "is missing") from None
        if expected_size is not None and len(data) != expected_size:
            raise ChunkError(digest, f"has {len(data)} bytes, expected {expected_size}")
        if hash_bytes(data) != digest:
            raise ChunkError(digest, "is corrupt (hash mismatch)")
        return data

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
        refs = self.snapshots()
        kept, dropped = refs[:keep], refs[keep:]
        if not dropped:
            return GcReport([], 0, [r.key for r in kept])
        referenced: set[str] = set()
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
            candidates = {d for d in names if _HASH_RE.match(d)}
        deleted = 0
        for digest in sorted(candidates - referenced):
            self.backend.delete(chunk_key(digest))
            self.forget_chunk(digest)
            deleted += 1
        return GcReport([r.key for r in dropped], deleted, [r.key for r in kept])

    # -- lease

    def lease(self, owner: str, ttl: float) -> Lease:
        return Lease(self, owner, ttl)


class Lease:
    """The single-writer lease: lease.json with owner, host, pid, boot id and a
    heartbeat. Stale when the heartbeat is older than its ttl, or at once when
    it names a dead pid on this same host and boot."""

    def __init__(self, repo: Repository, owner: str, ttl: float) -> None:
        self.repo = repo
        self.owner = owner
        self.ttl = ttl
        self.held = False

    def _doc(self) -> bytes:
        now = time.time()
        return json.dumps(
            {
                "owner": self.owner,
                "host": host_name(),
                "pid": os.getpid(),
                "boot": boot_id(),
                "heartbeat": now,
                "ttl": self.ttl,
            }
        ).encode()

    def _read(self) -> dict[str, Any] | None:
        try:
            doc = json.loads(self.repo.backend.read(LEASE_KEY))
        except NotFound:
            return None
        except ValueError:
            return {}  # garbage: treated as stale
        return doc if isinstance(doc, dict) else {}

    def describe_stale(self, doc: dict[str, Any]) -> str | None:
        """Why the lease in doc may be taken over, or None if it is live."""
        if not doc or "owner" not in doc:
            return "it is unreadable"
        try:
            age = time.time() - float(doc.get("heartbeat", 0))
            ttl = float(doc.get("ttl", self.ttl))
        except (TypeError, ValueError):
            return "it is unreadable"
        if age > ttl:
            return f"its last heartbeat is {age:.0f}s old (timeout {ttl:.0f}s)"
        if doc.get("host") == host_name() and doc.get("boot", "") == boot_id():
            pid = doc.get("pid")
            if isinstance(pid, int) and not _pid_alive(pid):
                return f"its process {pid} on this host is gone"
        if doc.get("host") == host_name() and doc.get("boot") and doc.get("boot") != boot_id():
            return "this host rebooted since"
        return None

    def acquire(self) -> str | None:
        """Take the lease or raise LeaseHeldError; returns why an old one was taken over."""
        backend = self.repo.backend
        if backend.create_exclusive(LEASE_KEY, self._doc()):
            took_over = None
        else:
            doc = self._read()
            if doc is not None and doc.get("owner") == self.owner:
                took_over = None
            else:
                why = self.describe_stale(doc or {}) if doc is not None else "it was released"
                if why is None:
                    assert doc is not None
                    age = time.time() - float(doc.get("heartbeat", 0))
                    raise LeaseHeldError(
                        f"remote {backend.display} is in use by ckpt on host "
                        f"{doc.get('host')} (pid {doc.get('pid')}, heartbeat {age:.0f}s ago); "
                        f"stop that run, or wait: a lease without heartbeat for "
                        f"{float(doc.get('ttl', self.ttl)):.0f}s is taken over (--lease-timeout)"
                    )
                backend.write(LEASE_KEY, self._doc())
                took_over = why
        # A store without conditional writes: confirm nobody raced us.
        time.sleep(0.05)
        doc = self._read()
        if not doc or doc.get("owner") != self.owner:
            raise LeaseHeldError(
                f"remote {backend.display} was claimed by another ckpt at the same moment; "
                "only one writer may use a remote"
            )
        self.held = True
        return took_over

    def heartbeat(self) -> None:
        """Refresh; LeaseLostError if another writer owns the lease now."""
        doc = self._read()
        if doc is not None and doc.get("owner") not in (None, self.owner):
            self.held = False
            raise LeaseLostError(
                f"lease on {self.repo.display} was taken over by host {doc.get('host')} "
                f"pid {doc.get('pid')}; this run stops writing snapshots"
            )
        self.repo.backend.write(LEASE_KEY, self._doc())

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        with contextlib.suppress(RemoteError):
            doc = self._read()
            if doc is not None and doc.get("owner") == self.owner:
                self.repo.backend.delete(LEASE_KEY)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def iter_manifests(repo: Repository) -> Iterator[tuple[SnapshotRef, Manifest | ManifestError]]:
    """Every snapshot newest first, loaded, with the error instead when it is damaged."""
    for ref in repo.snapshots():
        try:
            yield ref, repo.load(ref)
        except ManifestError as exc:
            yield ref, exc
