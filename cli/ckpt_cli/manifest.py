"""The snapshot manifest: what one snapshot holds, its JSON form, and the checks
that make an untrusted manifest safe to restore (relative, normalised paths that
stay inside the target and that this system can name; no duplicates; nothing
below a file or link; no symlink that leads out; sizes that match their chunk
lists; every number bounded), and the chunk hashes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import posixpath
import re
import socket
from collections.abc import Callable, Mapping
from typing import Any

from blake3 import blake3

FORMAT_NAME = "ckpt"
FORMAT_VERSION = 1
#: The hash new repositories name their chunks by. BLAKE3 is cryptographic like
#: SHA-256 and 4-6x faster per core here (0.2 vs 0.87 s/GiB, bench/): on two
#: cores SHA-256 alone took longer than `cp -r` of the same bytes. Repositories
#: made with "sha256" (ckpt.json says which) are read and written as they are.
HASH_NAME = "blake3"
HASHES = ("blake3", "sha256")
SNAPSHOTS = "snapshots/"
#: The largest file a manifest may describe (1 PiB): anything larger is corrupt.
MAX_FILE_SIZE = 1 << 50
#: The largest chunk size a repository (ckpt.json) or a manifest may have: a
#: restore and a snapshot hold (--concurrency + 2) chunks in memory.
MAX_CHUNK_SIZE = 256 << 20
#: A path component and a whole relative path (bytes, as the filesystem sees
#: them): NAME_MAX and PATH_MAX - 1 of Linux; ckpt cannot have scanned more.
MAX_NAME = 255
MAX_PATH = 4095
#: `created` of a manifest: a time that time.localtime can show (0 to 9999-12-31).
MAX_TIME = 253402300799.0

SNAPSHOT_RE = re.compile(r"^snapshots/(\d{10})-([0-9a-f]{8})\.json$")
HASH_RE = re.compile(r"\A[0-9a-f]{64}\Z")  # \Z: no newline after


class ManifestError(Exception):
    """A manifest that cannot be trusted: unreadable, malformed or unsafe."""


def _sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _blake3(data: bytes | memoryview) -> str:
    # The blake3 package releases the GIL for inputs over a few KiB, like hashlib.
    return blake3(data).hexdigest()


def hasher(name: str) -> Callable[[bytes | memoryview], str]:
    """The hex digest function of a repository's hash name (one of HASHES)."""
    return {"blake3": _blake3, "sha256": _sha256}[name]


def hash_bytes(data: bytes | memoryview, name: str = HASH_NAME) -> str:
    return hasher(name)(data)


def host_name() -> str:
    return socket.gethostname()


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
    #: The structural check (`formats`) this file or directory passed when it
    #: was snapshotted, e.g. "zip", "safetensors", "hf-trainer"; "" when no
    #: check applies (an unrecognised format) or the manifest predates checks.
    check: str = ""

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
        if self.check:
            out["check"] = self.check
        return out

    def same_content(self, other: Entry) -> bool:
        """Equal as far as a restore is concerned: ignores the local inode, and
        the check name, which the content decides (same chunks, same verdict)."""
        return (
            self.path == other.path
            and self.type == other.type
            and self.mode == other.mode
            and self.size == other.size
            and self.mtime_ns == other.mtime_ns
            and self.chunks == other.chunks
            and self.target == other.target
        )


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
    hash: str = HASH_NAME  # what its chunks are named by: its repository's hash
    #: The training step a commit was tagged with (`commit(step=)`): the
    #: global generation it belongs to across ranks. None for other snapshots.
    step: int | None = None
    #: This stream's rank and the world it was written by (0 of 1: one node).
    rank: int = 0
    world_size: int = 1
    #: The newest GC round (gc/) this snapshot had seen when it started: a
    #: round's trash is deleted only once every live rank has seen it.
    gc_seen: int = 0
    #: Whether every file was whole when the snapshot was taken: no file of
    #: the directory was in progress (held open for writing by the job, or
    #: failing its format check). False: taken anyway once the settle timeout
    #: ran out, with `unverified` naming each file and why. None: a manifest
    #: written before ckpt checked (read as it always was: restorable).
    verified: bool | None = None
    #: (path, reason) of every file that was in progress when verified is False.
    unverified: tuple[tuple[str, str], ...] = ()

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
            "hash": self.hash,
            "new_bytes": self.new_bytes,
            "new_chunks": self.new_chunks,
            "step": self.step,
            "rank": self.rank,
            "world_size": self.world_size,
            "gc_seen": self.gc_seen,
            **({} if self.verified is None else {"verified": self.verified}),
            **(
                {"unverified": [{"path": p, "reason": r} for p, r in self.unverified]}
                if self.unverified
                else {}
            ),
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
        except RecursionError:  # [[[[... nested deeper than the parser's stack
            raise ManifestError("is not valid JSON (nested too deeply)") from None
        if not isinstance(doc, dict):
            raise ManifestError("is not a JSON object")
        if doc.get("format") != FORMAT_NAME or doc.get("version") != FORMAT_VERSION:
            raise ManifestError(
                f"has format {doc.get('format')!r} version {doc.get('version')!r}; "
                f"this ckpt reads {FORMAT_NAME!r} version {FORMAT_VERSION}"
            )
        match = SNAPSHOT_RE.match(key)
        try:
            generation = _int(doc, "generation", 0, 10**10 - 1)
            snap_id = doc["id"]
            if match and (int(match.group(1)) != generation or match.group(2) != snap_id):
                raise ManifestError("does not match its own name")
            chunk_size = _int(doc, "chunk_size", 1, MAX_CHUNK_SIZE)
            # Manifests of ckpt before blake3 always said "sha256".
            hash_name = doc.get("hash", "sha256")
            if hash_name not in HASHES:
                raise ManifestError(f"uses hash {hash_name!r}; this ckpt knows {', '.join(HASHES)}")
            raw_entries = doc["entries"]
            if not isinstance(raw_entries, list):
                raise ManifestError("entries is not a list")
            entries = tuple(_parse_entry(e, chunk_size) for e in raw_entries)
            _check_tree(entries)
            _check_links(entries)
            world_size = _int(doc, "world_size", 1, 1 << 20) if "world_size" in doc else 1
            rank = _int(doc, "rank", 0, world_size - 1) if "rank" in doc else 0
            parent = doc.get("parent")
            if parent is not None and not isinstance(parent, str):
                raise ManifestError(f"has a parent that is not text: {parent!r}")
            return cls(
                id=str(snap_id),
                generation=generation,
                entries=entries,
                chunk_size=chunk_size,
                created=_time(doc["created"]),
                parent=parent,
                host=str(doc.get("host", "")),
                source=str(doc.get("source", "")),
                run=str(doc.get("run", "")),
                attempt=int(doc.get("attempt", 0)),
                reason=str(doc.get("reason", "")),
                new_bytes=int(doc.get("new_bytes", 0)),
                new_chunks=int(doc.get("new_chunks", 0)),
                hash=hash_name,
                step=None if doc.get("step") is None else _int(doc, "step", 0, 1 << 62),
                rank=rank,
                world_size=world_size,
                gc_seen=_int(doc, "gc_seen", 0, 1 << 62) if "gc_seen" in doc else 0,
                verified=_verified(doc),
                unverified=_unverified(doc),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            # OverflowError: int() of an Infinity (JSON as Python reads it)
            raise ManifestError(f"is malformed ({type(exc).__name__}: {exc})") from None


def _verified(doc: dict[str, Any]) -> bool | None:
    value = doc.get("verified")
    if value is not None and not isinstance(value, bool):
        raise ManifestError(f"has a verified that is not true or false: {value!r}")
    return value


def _unverified(doc: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    raw = doc.get("unverified", [])
    if not isinstance(raw, list):
        raise ManifestError("has an unverified that is not a list")
    out = []
    for item in raw:
        if not isinstance(item, dict) or not all(
            isinstance(item.get(k), str) for k in ("path", "reason")
        ):
            raise ManifestError("has an unverified item that is not {path, reason}")
        out.append((item["path"], item["reason"]))
    return tuple(out)


def _check_name(raw: dict[str, Any], path: str) -> str:
    value = raw.get("check", "")
    if not isinstance(value, str) or len(value) > 64:
        raise ManifestError(f"has a bad check name for {path!r}")
    return value


def _int(doc: dict[str, Any], name: str, low: int, high: int) -> int:
    value = doc[name]
    if type(value) is not int or not low <= value <= high:  # bool is not int here
        raise ManifestError(f"has an impossible {name}: {value!r}")
    return value


def _time(value: object) -> float:
    """A manifest's creation time: finite, and one a date can be shown for."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ManifestError(f"has an impossible created: {value!r}")
    if not (math.isfinite(value) and 0 <= value <= MAX_TIME):
        raise ManifestError(f"has an impossible created: {value!r}")
    return float(value)


def _mtime_ns(raw: dict[str, Any]) -> int:
    """An entry's mtime: nanoseconds that os.utime can set (a signed 64-bit
    count, years 1678 to 2262); anything else is corrupt."""
    value = int(raw.get("mtime_ns", 0))
    if not -(1 << 63) <= value < (1 << 63):
        raise ManifestError(f"has an impossible mtime_ns: {value!r}")
    return value


def safe_relpath(path: object) -> str:
    """A normalised relative path that stays inside its root and that this
    system can name (see _os_name), or ManifestError. (No empty, "." or ".."
    component and no leading "/" is exactly what posixpath.normpath leaves
    unchanged.)"""
    if type(path) is not str or not path:
        raise ManifestError(f"has an empty or non-text path {path!r}")
    if "\0" in path or path[0] == "/":
        raise ManifestError(f"has an unsafe path {path!r}")
    parts = path.split("/")
    if "" in parts or "." in parts or ".." in parts:
        raise ManifestError(f"has a path that escapes or is not normalised: {path!r}")
    # An ASCII path is its own bytes: only other paths are encoded to measure.
    length = len(path)
    names: list[str] | list[bytes] = parts
    if not path.isascii():
        raw = _os_name(path, "path")
        length, names = len(raw), raw.split(b"/")
    if length > MAX_PATH or max(map(len, names)) > MAX_NAME:
        raise ManifestError(
            f"has a path longer than this system allows ({MAX_NAME} bytes a name, "
            f"{MAX_PATH} in all): {path[:80]!r}..."
        )
    return path


def _os_name(text: str, what: str) -> bytes:
    """text as the filesystem gets it. Names that are not UTF-8 on disk come
    back from a scan as lone surrogates U+DC80..U+DCFF (surrogateescape) and
    encode to their bytes; any other lone surrogate names nothing."""
    try:
        return os.fsencode(text)
    except UnicodeEncodeError:
        raise ManifestError(f"has a {what} that no file can have: {text[:80]!r}") from None


def _parse_entry(raw: Any, chunk_size: int) -> Entry:
    if not isinstance(raw, dict):
        raise ManifestError("has an entry that is not an object")
    path = safe_relpath(raw.get("path"))
    kind = raw.get("type")
    mode = _int(raw, "mode", 0, 0o7777)
    if kind == "file":
        size = _int(raw, "size", 0, MAX_FILE_SIZE)
        chunks = raw["chunks"]
        if type(chunks) is not list:
            raise ManifestError(f"has bad chunk names for {path!r}")
        for c in chunks:
            if type(c) is not str or not HASH_RE.match(c):
                raise ManifestError(f"has bad chunk names for {path!r}")
        if len(chunks) != -(-size // chunk_size):
            raise ManifestError(f"lists {len(chunks)} chunks for {path!r} of {size} bytes")
        return Entry(
            path,
            "file",
            mode,
            size,
            _mtime_ns(raw),
            tuple(chunks),
            ino=int(raw.get("ino", 0)),
            check=_check_name(raw, path),
        )
    if kind == "dir":
        return Entry(path, "dir", mode, mtime_ns=_mtime_ns(raw), check=_check_name(raw, path))
    if kind == "symlink":
        target = raw.get("target")
        if not isinstance(target, str) or not target or "\0" in target:
            raise ManifestError(f"has a bad symlink target for {path!r}")
        if len(_os_name(target, "symlink target")) > MAX_PATH:
            raise ManifestError(f"has a symlink target longer than {MAX_PATH} bytes at {path!r}")
        return Entry(path, "symlink", mode, target=target)
    raise ManifestError(f"has an entry of unknown type {kind!r} at {path!r}")


def _check_tree(entries: tuple[Entry, ...]) -> None:
    """No duplicates, and nothing below a path that is not a directory. A
    parent that is an entry itself ends the walk up (its own parents are
    checked as its entry): linear in the manifest, however deep the tree."""
    kinds: dict[str, str] = {}
    for e in entries:
        if e.path in kinds:
            raise ManifestError(f"lists {e.path!r} twice")
        kinds[e.path] = e.type
    for e in entries:
        parent = posixpath.dirname(e.path)
        while parent:
            kind = kinds.get(parent)
            if kind is not None and kind != "dir":
                raise ManifestError(f"puts {e.path!r} below a {kind} {parent!r}")
            if kind is not None:
                break
            parent = posixpath.dirname(parent)


def _check_links(entries: tuple[Entry, ...]) -> None:
    """A restore refuses symlinks that lead out of the directory; such a
    manifest is not restorable, so it is not a valid one either."""
    links = {e.path: e.target for e in entries if e.type == "symlink"}
    for path, target in links.items():
        if link_escapes(path, target, links):
            raise ManifestError(f"has a symlink {path!r} that leads out of the directory")


def link_escapes(path: str, target: str, links: Mapping[str, str] | None = None) -> bool:
    """True for a symlink at `path` (relative to the root) whose target is
    absolute or leads out of the root, also through other links of the tree
    (`links`: path -> target), e.g. "here" -> "." and "up" -> "here/..".
    Such links are not checkpoint data: never recorded, never restored."""
    return _resolve(path, target, links or {}, 0) is None


def _resolve(path: str, target: str, links: Mapping[str, str], depth: int) -> str | None:
    """Where the link at path points, relative to the root; None if outside."""
    if not target or target.startswith("/") or depth > 40:
        return None
    parent = posixpath.dirname(path)
    stack = parent.split("/") if parent else []
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not stack:
                return None
            stack.pop()
            continue
        stack.append(part)
        here = "/".join(stack)
        if here in links and here != path:
            inner = _resolve(here, links[here], links, depth + 1)
            if inner is None:
                return None
            stack = inner.split("/") if inner else []
        elif here == path:
            return None  # a link through itself: a loop
    return "/".join(stack)
