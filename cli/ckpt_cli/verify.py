"""Checking snapshots without changing them (`ckpt verify`, `ckpt ls`):
which are complete (every chunk there), full verification by re-hashing,
and each file checked again by its format, read through its chunks
(`ChunkSource`, which repair reads a stored file through too). Nothing here
prints or deletes.

"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
from collections.abc import Callable
from typing import Any

from ckpt_cli.backends import NotFound
from ckpt_cli.manifest import Entry, Manifest, ManifestError
from ckpt_cli.repository import ChunkError, Repository, SnapshotRef, chunk_sizes

#: Chunks re-hashed at once by `verify --full` (memory: this many chunks).
VERIFY_WORKERS = 4
#: Chunk names shown in one line before "and N more".
SHOWN = 3


# ---------------------------------------------------------------- stored files


class ChunkSource:
    """A file of a stored snapshot as a `formats` Source: read() fetches only
    the chunks that cover the range asked for, each verified by its hash
    (ChunkError if one is missing or corrupt), and keeps the last few."""

    def __init__(self, repo: Repository, entry: Entry, chunk_size: int, keep: int = 3) -> None:
        self.repo = repo
        self.entry = entry
        self.chunk_size = chunk_size
        self._keep = max(1, keep)
        self._cache: dict[int, bytes] = {}
        #: Indexes of the chunks read (what a check needed).
        self.read_chunks: list[int] = []

    @property
    def size(self) -> int:
        return self.entry.size

    def _chunk(self, i: int) -> bytes:
        data = self._cache.get(i)
        if data is None:
            length = min(self.chunk_size, self.entry.size - i * self.chunk_size)
            data = self.repo.get_chunk(self.entry.chunks[i], length)
            self.read_chunks.append(i)
            if len(self._cache) >= self._keep:
                self._cache.pop(next(iter(self._cache)))
            self._cache[i] = data
        return data

    def read(self, offset: int, length: int) -> bytes:
        end = min(self.entry.size, offset + max(0, length))
        if offset >= end:
            return b""
        step = self.chunk_size
        parts = []
        for i in range(offset // step, (end - 1) // step + 1):
            data = self._chunk(i)
            lo = max(offset, i * step) - i * step
            hi = min(end, (i + 1) * step) - i * step
            parts.append(data[lo:hi])
        return b"".join(parts)


# ---------------------------------------------------------------- checking


@dataclasses.dataclass
class Problem:
    kind: str  # "manifest" | "missing_chunk" | "corrupt_chunk" | "format"
    detail: str
    chunk: str | None = None
    path: str | None = None  # "format": the file or directory that fails its check

    def to_json(self) -> dict[str, Any]:
        out = {"kind": self.kind, "chunk": self.chunk, "detail": self.detail}
        if self.path is not None:
            out["path"] = self.path
        return out


@dataclasses.dataclass
class Checked:
    """One snapshot as checked: its manifest (None if unusable) and what is wrong."""

    ref: SnapshotRef
    manifest: Manifest | None
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """What is wrong, in one short phrase ('' if nothing)."""
        parts = []
        for kind, word in (("missing_chunk", "missing"), ("corrupt_chunk", "corrupt")):
            bad = [p for p in self.problems if p.kind == kind]
            if bad:
                names = ", ".join((p.chunk or "")[:12] for p in bad[:SHOWN])
                more = f" and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
                count = f"{len(bad)} chunk{'s' if len(bad) != 1 else ''}"
                parts.append(f"{count} {word} ({names}{more})")
        parts += [f"manifest {p.detail}" for p in self.problems if p.kind == "manifest"]
        torn = [p for p in self.problems if p.kind == "format"]
        if torn:
            more = f" and {len(torn) - SHOWN} more" if len(torn) > SHOWN else ""
            shown = "; ".join(p.detail for p in torn[:SHOWN])
            parts.append(f"fails its format check: {shown}{more}")
        return "; ".join(parts)


@dataclasses.dataclass
class Checks:
    snapshots: list[Checked]
    chunks_listed: int
    chunks_referenced: int
    chunks_hashed: int = 0
    bytes_hashed: int = 0
    #: Format checks (`ckpt verify`): file versions checked, chunks read for it.
    files_checked: int = 0
    chunks_read: int = 0

    @property
    def damaged(self) -> list[Checked]:
        return [c for c in self.snapshots if not c.ok]


def check(
    repo: Repository,
    refs: list[SnapshotRef],
    *,
    full: bool = False,
    formats: bool = False,
    workers: int = VERIFY_WORKERS,
    on_start: Callable[[int, int], None] | None = None,
) -> Checks:
    """Check that every manifest in refs parses and that every chunk it names
    exists (one listing of chunks/, made after the manifests were read: chunks
    are written before their manifest). With full, every such chunk is also
    read and re-hashed, `workers` at a time (memory: one chunk per worker).
    With formats, every file and checkpoint directory of a snapshot whose
    chunks are all there is checked again by its format (`format_checks`),
    reading only the chunks the check needs, each verified by its hash; a
    file version shared by several snapshots is checked once. A snapshot
    pruned meanwhile by a writer's retention is left out."""
    checked: list[Checked] = []
    for ref in refs:
        try:
            data = repo.backend.read(ref.key)
        except NotFound:
            continue  # pruned since the listing
        try:
            manifest = repo.parse_manifest(data, ref.key)
            checked.append(Checked(ref, manifest, []))
        except ManifestError as exc:
            checked.append(Checked(ref, None, [Problem("manifest", str(exc))]))
    # A chunk a multi-node GC round moved to trash/ is read from there.
    listed = repo.present_chunks() if checked else set()
    referenced: set[str] = set()
    for c in checked:
        if c.manifest is None:
            continue
        digests = c.manifest.chunk_digests()
        referenced |= digests
        c.problems += [
            Problem("missing_chunk", f"chunk {d} is missing", d) for d in sorted(digests - listed)
        ]
    result = Checks(checked, len(listed), len(referenced))
    if full:
        sizes: dict[str, int] = {}
        for c in checked:
            if c.manifest is not None:
                sizes.update(chunk_sizes(c.manifest))
        todo = sorted(referenced & listed)
        if on_start is not None:
            on_start(len(todo), sum(sizes[d] for d in todo))
        verdicts = _rehash(repo, todo, sizes, workers)
        for c in checked:
            if c.manifest is None:
                continue
            for d in sorted(c.manifest.chunk_digests()):
                bad = verdicts.get(d)
                if bad is not None:
                    c.problems.append(bad)
        result.chunks_hashed = len(todo)
        result.bytes_hashed = sum(sizes[d] for d in todo)
    if formats:
        _check_formats(repo, checked, result)
    # A manifest that a writer's retention deleted while we looked may have
    # lost its chunks too: that is pruning, not damage.
    for c in list(checked):
        if c.manifest is not None and not c.ok:
            try:
                repo.backend.read(c.ref.key)
            except NotFound:
                checked.remove(c)
    return result


def _check_formats(repo: Repository, checked: list[Checked], result: Checks) -> None:
    """The format checks of `check(formats=True)`, appended as problems."""
    from ckpt_cli.formats import DEFAULT

    # A file version (its name and chunks) -> what is wrong with it, if anything.
    found: dict[tuple[str, tuple[str, ...]], Problem | None] = {}
    for c in checked:
        m = c.manifest
        if m is None or not c.ok:
            continue  # damaged already: its chunks cannot all be read
        for e in m.files:
            key = (e.path.rsplit("/", 1)[-1], e.chunks)
            if key not in found:
                found[key] = _check_stored(repo, m, e, result)
            problem = found[key]
            if problem is not None and problem.kind == "format":  # its detail: the reason
                problem = Problem("format", f"{e.path}: {problem.detail}", path=e.path)
            if problem is not None:
                c.problems.append(problem)
        for rel, v in DEFAULT.check_tree(m.entries).items():
            if v.ok is False:
                c.problems.append(Problem("format", f"{rel}/: {v.reason}", path=rel))


def _check_stored(repo: Repository, m: Manifest, e: Entry, result: Checks) -> Problem | None:
    """One stored file's format check: what is wrong (a format problem's
    detail is the check's reason), or None."""
    from ckpt_cli.formats import DEFAULT

    source = ChunkSource(repo, e, m.chunk_size)
    try:
        v = DEFAULT.check_source(e.path, source)
    except ChunkError as exc:
        kind = "missing_chunk" if "missing" in str(exc) else "corrupt_chunk"
        return Problem(kind, str(exc).replace(exc.digest[:12], exc.digest, 1), exc.digest)
    finally:
        result.files_checked += 1
        result.chunks_read += len(source.read_chunks)
    return Problem("format", v.reason) if v.ok is False else None


def _rehash(
    repo: Repository, digests: list[str], sizes: dict[str, int], workers: int
) -> dict[str, Problem]:
    """Read and hash each chunk; the problem of each bad one."""

    def one(digest: str) -> Problem | None:
        try:
            repo.get_chunk(digest, sizes.get(digest))
        except ChunkError as exc:
            kind = "missing_chunk" if "missing" in str(exc) else "corrupt_chunk"
            detail = str(exc).replace(digest[:12], digest, 1)
            return Problem(kind, detail, digest)
        return None

    bad: dict[str, Problem] = {}
    with cf.ThreadPoolExecutor(max(1, workers), thread_name_prefix="ckpt-verify") as pool:
        for digest, problem in zip(digests, pool.map(one, digests), strict=True):
            if problem is not None:
                bad[digest] = problem
    return bad
