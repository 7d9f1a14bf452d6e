"""Looking into a repository without changing it, for the operating commands
(ls, show, diff, verify, gc): what a location without ckpt.json is (empty,
missing, or something that is not a repository), which snapshots are complete,
full verification by re-hashing, and the difference between two snapshots.
Nothing here prints or deletes.

"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from ckpt._contract import ExitCode
from ckpt_cli.errors import CkptError, ConfigError, RemoteError
from ckpt_cli.manifest import Entry, Manifest, ManifestError
from ckpt_cli.remote import (
    Backend,
    FsspecBackend,
    LocalBackend,
    NotFound,
    open_backend,
    parse_storage_options,
)
from ckpt_cli.repository import (
    CONFIG_KEY,
    ChunkError,
    Repository,
    SnapshotRef,
    chunk_sizes,
)

#: Names of half-written objects (a killed writer's), as `remote` writes them.
_TEMP_NAME = re.compile(r"^\.[^/]*\.tmp-[0-9a-f]+$")
#: Chunks re-hashed at once by `verify --full` (memory: this many chunks).
VERIFY_WORKERS = 4
#: Chunk names shown in one line before "and N more".
SHOWN = 3


class DamagedError(CkptError):
    """A snapshot or repository whose data is damaged (`ckpt verify` finds them)."""

    exit_code = ExitCode.DAMAGED


# ---------------------------------------------------------------- opening


def open_existing(remote: str, options: list[str] | Mapping[str, Any]) -> Repository | None:
    """The repository at remote, or None if the location is empty (no object
    at all: no snapshot yet). RemoteError (69) if it does not exist (its bucket
    or its parent directory is missing); ConfigError (78) if it holds objects
    but no ckpt.json. options: storage options, parsed (config.locate) or as
    -o KEY=VALUE strings."""
    parsed = dict(options) if isinstance(options, Mapping) else parse_storage_options(options)
    backend = open_backend(remote, parsed)
    if isinstance(backend, LocalBackend) and backend.root.is_file():
        raise ConfigError(f"remote {backend.root} is a file, not a directory (fix REMOTE)")
    repo = Repository.open(backend, create=False)
    if repo is None:
        _check_empty(backend)
    return repo


def _check_empty(backend: Backend) -> None:
    """Return if the location exists (or could: its container does) and holds
    nothing; raise with one line otherwise."""
    if isinstance(backend, LocalBackend):
        names = _local_names(backend)
    elif isinstance(backend, FsspecBackend):
        names = _fsspec_names(backend)
    else:  # another Backend (tests): trust a listing
        names = backend.list("")
    if not names:
        return
    hint = ""
    for name in sorted(names)[:20]:
        try:
            backend.read(f"{name}/{CONFIG_KEY}")
        except (NotFound, RemoteError):
            continue
        hint = f"; {backend.display.rstrip('/')}/{name} is one"
        break
    raise ConfigError(
        f"{backend.display} is not empty ({len(names)} entr{'y' if len(names) == 1 else 'ies'}) "
        f"but has no {CONFIG_KEY}: it is not a ckpt repository (REMOTE is the prefix that "
        f"holds {CONFIG_KEY}{hint})"
    )


def _local_names(backend: LocalBackend) -> list[str]:
    root = backend.root
    try:
        return [n for n in os.listdir(root) if not _TEMP_NAME.match(n)]
    except FileNotFoundError:
        parent = root.parent
        if parent.is_dir():
            return []  # an empty repository: the first writer creates the directory
        raise RemoteError(
            f"remote {root} does not exist, nor does its parent directory {parent} "
            "(create it, or fix REMOTE)"
        ) from None
    except NotADirectoryError:
        raise ConfigError(f"remote {root} is a file, not a directory (fix REMOTE)") from None
    except OSError as exc:
        raise RemoteError(f"listing {root} failed: {exc.strerror or exc}") from None


def _fsspec_names(backend: FsspecBackend) -> list[str]:
    """One level below the root; for a root that does not exist, whether its
    bucket (object stores) or parent directory (sftp, ...) does."""
    root = backend.root
    if backend.atomic_put:  # object stores: BUCKET/prefix (memory:// has no buckets)
        container = "" if root.startswith("/") else root.split("/", 1)[0]
    else:  # a filesystem: the parent directory
        container = root.rsplit("/", 1)[0] if "/" in root.strip("/") else ""

    def go(fs: Any, kw: dict[str, Any]) -> list[str] | None:
        try:
            found = fs.ls(root, detail=False, **kw)
        except (FileNotFoundError, NotADirectoryError):
            found = []
        names = [str(n).rstrip("/").rsplit("/", 1)[-1] for n in found]
        names = [n for n in names if n and not _TEMP_NAME.match(n)]
        if names or not container:
            return names
        return [] if fs.exists(container, **kw) else None

    names = backend._call("listing the remote", go)
    if names is None:
        what = "bucket or container" if backend.atomic_put else "parent directory"
        raise RemoteError(
            f"remote {backend.display} does not exist: the {what} {container!r} is missing "
            "(create it, or fix REMOTE)"
        )
    return names


def find(repo: Repository, wanted: str) -> SnapshotRef:
    """A snapshot by id, unique id prefix or generation; ConfigError naming `ckpt ls`."""
    ref = repo.find(wanted)
    if ref is None:
        raise ConfigError(
            f"no snapshot {wanted!r} in {repo.display} (an id, a unique id prefix of 4 or more "
            f"characters, or a generation number: see `ckpt ls {repo.display}`)"
        )
    return ref


def load(repo: Repository, ref: SnapshotRef) -> Manifest:
    """The manifest of ref; DamagedError (65) naming the snapshot if it is unusable."""
    try:
        return repo.load(ref)
    except ManifestError as exc:
        raise DamagedError(
            f"snapshot {ref.id} (generation {ref.generation}) in {repo.display} is damaged: "
            f"its manifest {exc} (see `ckpt verify {repo.display}`)"
        ) from None


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


# ---------------------------------------------------------------- diff


@dataclasses.dataclass
class Change:
    before: Entry
    after: Entry
    what: list[str]  # "type", "content", "size", "mode", "target"


@dataclasses.dataclass
class Diff:
    added: list[Entry]
    removed: list[Entry]
    changed: list[Change]

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)


def diff(a: Manifest, b: Manifest) -> Diff:
    """What differs from a to b, path by path: added, removed, and changed
    (type, content = chunk list, size, mode, symlink target; not mtimes)."""
    old = {e.path: e for e in a.entries}
    new = {e.path: e for e in b.entries}
    added = [new[p] for p in sorted(new.keys() - old.keys())]
    removed = [old[p] for p in sorted(old.keys() - new.keys())]
    changed = []
    for p in sorted(old.keys() & new.keys()):
        x, y = old[p], new[p]
        what = []
        if x.type != y.type:
            what.append("type")
        else:
            if x.chunks != y.chunks:
                what.append("content")
            if x.size != y.size:
                what.append("size")
            if x.mode != y.mode:
                what.append("mode")
            if x.target != y.target:
                what.append("target")
        if what:
            changed.append(Change(x, y, what))
    return Diff(added, removed, changed)


def entry_json(e: Entry) -> dict[str, Any]:
    """An entry as the operating commands show it in --json."""
    out: dict[str, Any] = {"path": e.path, "type": e.type, "mode": f"{e.mode:04o}"}
    if e.type == "file":
        out.update(size=e.size, chunks=len(e.chunks), mtime_ns=e.mtime_ns)
    elif e.type == "symlink":
        out["target"] = e.target
    if e.type != "symlink":
        out["check"] = e.check  # the format check it passed when taken; "" none applied
    return out
