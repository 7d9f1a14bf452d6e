"""Scan the checkpoint directory, hash what changed, upload new chunks, write the manifest.

One snapshot = scan (stat only) -> read changed files in fixed-size chunks on a
small thread pool (the hash releases the GIL, so hashing uses every core) ->
put chunks the repository does not have -> write the manifest last -> prune.
Memory is bounded by the number of chunks in flight, whatever the file sizes.
A file that changes while it is read keeps its previous version (or is left
out if it has none) and the caller is told to snapshot again.
Imports: standard library, `repository`.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import dataclasses
import fnmatch
import functools
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from ckpt import _contract as contract
from ckpt_cli import world
from ckpt_cli.manifest import Entry, Manifest, host_name, link_escapes
from ckpt_cli.repository import Buffers, Repository

#: Names that are never snapshotted: one definition, shared with the shim.
TEMP_PATTERNS = contract.TEMP_PATTERNS
#: A file modified this close to the scan may change again within the same
#: mtime tick: it is not trusted from the stat cache next time (racy-git rule).
RACY_NS = 1_000_000_000
#: Files being read at once (open descriptors) at the most.
MAX_OPEN_FILES = 64
#: Files of one chunk or less go to the pool this many (or a chunk's worth of
#: bytes) to a task: a future and a semaphore round per small file cost more
#: than reading it (bench/ case 4: 10,000 files of 1-64 KiB).
SMALL_BATCH_FILES = 64


def is_ignored(name: str, patterns: Iterable[str]) -> bool:
    return _matcher(tuple(patterns))(name) is not None


@functools.lru_cache(maxsize=16)
def _matcher(patterns: tuple[str, ...]) -> Callable[[str], re.Match[str] | None]:
    """All patterns as one compiled regex: a scan tests every name against
    every pattern, and one match call per name is 20x faster than fnmatch per
    pattern (bench/ case 4: 10,000 files, 13 temp patterns)."""
    if not patterns:
        return lambda _name: None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns)).match


@dataclasses.dataclass(frozen=True)
class LocalEntry:
    path: str
    type: str
    mode: int
    size: int
    mtime_ns: int
    ino: int
    target: str = ""


def scan(
    root: Path, patterns: Iterable[str] = TEMP_PATTERNS, skipped: list[str] | None = None
) -> list[LocalEntry]:
    """Every file, directory and symlink below root (not following links), sorted.

    An absolute symlink into root is recorded as the equivalent relative one;
    links that lead outside root are left out (and their paths appended to
    `skipped`): restore would refuse them."""
    ignored = _matcher(tuple(patterns))
    root_str = str(root)
    out: list[LocalEntry] = []

    # Directories still to read: a stack, not recursion (a tree any number
    # of levels deep is scanned; Python's stack ends at 1000 frames).
    todo = [(root_str, "")]
    while todo:
        directory, rel = todo.pop()
        try:
            it = os.scandir(directory)
        except FileNotFoundError:
            continue
        with it:
            for d in it:
                if ignored(d.name):
                    continue
                path = f"{rel}{d.name}"
                try:
                    st = d.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                mode = stat.S_IMODE(st.st_mode)
                if stat.S_ISDIR(st.st_mode):
                    out.append(LocalEntry(path, "dir", mode, 0, st.st_mtime_ns, st.st_ino))
                    todo.append((d.path, path + "/"))
                elif stat.S_ISREG(st.st_mode):
                    out.append(
                        LocalEntry(path, "file", mode, st.st_size, st.st_mtime_ns, st.st_ino)
                    )
                elif stat.S_ISLNK(st.st_mode):
                    try:
                        target = os.readlink(d.path)
                    except OSError:
                        continue
                    norm = os.path.normpath(target)
                    if norm == root_str or norm.startswith(root_str + "/"):
                        target = os.path.relpath(norm, os.path.dirname(d.path))
                    out.append(LocalEntry(path, "symlink", mode, 0, 0, st.st_ino, target))
                # sockets, fifos and devices are not checkpoint data

    links = {e.path: e.target for e in out if e.type == "symlink"}
    escaping = {p for p, t in links.items() if link_escapes(p, t, links)}
    if escaping:  # restore refuses links that lead outside: never record one
        out = [e for e in out if e.path not in escaping]
        if skipped is not None:
            skipped.extend(sorted(escaping))
    out.sort(key=lambda e: e.path)
    return out


@dataclasses.dataclass(frozen=True)
class Cached:
    size: int
    mtime_ns: int
    ino: int
    chunks: tuple[str, ...]


@dataclasses.dataclass
class SnapshotResult:
    manifest: Manifest | None  # None: nothing changed since `parent`
    parent: Manifest | None
    files_read: int = 0
    bytes_read: int = 0
    new_bytes: int = 0
    new_chunks: int = 0
    unstable: list[str] = dataclasses.field(default_factory=list)
    skipped_links: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def newest(self) -> Manifest | None:
        """The snapshot that now holds the directory's committed state."""
        return self.manifest or self.parent


_Outcome = tuple["LocalEntry", tuple[str, ...] | None]


@dataclasses.dataclass
class _Big:
    """A file of several chunks being read: its chunks are separate tasks."""

    entry: LocalEntry
    fd: int
    st: os.stat_result
    futures: list[cf.Future[str]]


class _Changed(Exception):
    """The file changed while it was being read."""


class TornCommitError(RuntimeError):
    """A pinned file was changed in place before it could be read."""


@dataclasses.dataclass
class Pinned:
    """The directory at one moment: its entries, and an open descriptor on every
    regular file. A descriptor keeps a renamed-over file's old content alive,
    so the snapshot taken from it is the state at pin time."""

    entries: list[LocalEntry]
    fds: dict[str, tuple[int, os.stat_result]]
    skipped_links: list[str]
    #: The training step the commit was tagged with (`commit(step=)`).
    step: int | None = None

    def close(self) -> None:
        for fd, _st in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


class Snapshotter:
    """Turns the directory into manifests. One snapshot at a time (not re-entrant)."""

    def __init__(
        self,
        repo: Repository,
        root: Path,
        *,
        run: str = "",
        patterns: Iterable[str] = TEMP_PATTERNS,
        concurrency: int = 4,
        may_write: Callable[[], None] = lambda: None,
        rank: int = 0,
        world_size: int = 1,
        lease_ttl: float = 60.0,
    ) -> None:
        self.repo = repo
        #: This stream's rank of world_size (0 of 1: a single node); see `world`.
        self.rank = rank
        self.world_size = world_size
        self.lease_ttl = lease_ttl  # other ranks' leases are live within it
        #: The newest multi-rank GC round this writer has read (world.see_rounds).
        self.gc_seen = 0
        self.root = root
        self.run = run
        self.patterns = tuple(patterns)
        self.concurrency = max(1, concurrency)
        self.may_write = may_write  # raises if this writer lost its lease
        self.parent: Manifest | None = None
        self.cache: dict[str, Cached] = {}
        self._pool = cf.ThreadPoolExecutor(self.concurrency, thread_name_prefix="ckpt-chunk")
        self._slots = threading.BoundedSemaphore(self.concurrency + 2)
        self._buffers = Buffers(repo.chunk_size)
        self._stats_lock = threading.Lock()
        #: The snapshot being read now: (its result so far, files and bytes it
        #: has to read, monotonic start), for `ckpt status`; None between them.
        self.live: tuple[SnapshotResult, int, int, float] | None = None
        self._swept = False

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def adopt(self, manifest: Manifest | None, *, trust_local: bool) -> None:
        """Make `manifest` the parent. With trust_local (the directory was just
        restored from it, or holds it), seed the stat cache from the files on
        disk so unchanged files are not read again."""
        self.parent = manifest
        self.cache.clear()
        if manifest is None:
            return
        by_path = {e.path: e for e in manifest.files}
        same_place = manifest.host == host_name() and manifest.source == str(self.root)
        now = time.time_ns()
        for local in scan(self.root, self.patterns):
            e = by_path.get(local.path)
            if e is None or local.type != "file" or local.size != e.size:
                continue
            if local.mtime_ns != e.mtime_ns or now - local.mtime_ns < RACY_NS:
                continue
            if not (trust_local or (same_place and local.ino == e.ino)):
                continue
            # A chunk gone from the remote (deleted or pruned behind our back)
            # must be read and uploaded again, not named by the next snapshot.
            if all(self.repo.has_chunk(c) for c in e.chunks):
                self.cache[local.path] = Cached(local.size, local.mtime_ns, local.ino, e.chunks)

    def pin(self) -> Pinned:
        """Scan now and hold every regular file open (see Pinned). Safe to call
        from another thread while a snapshot runs: it only reads."""
        skipped: list[str] = []
        entries = scan(self.root, self.patterns, skipped) if self.root.is_dir() else []
        fds: dict[str, tuple[int, os.stat_result]] = {}
        kept: list[LocalEntry] = []
        try:
            for le in entries:
                if le.type == "file":
                    try:
                        fd = os.open(
                            self.root / le.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                        )
                    except OSError:
                        continue  # deleted since the scan: not part of this moment
                    st = os.fstat(fd)
                    fds[le.path] = (fd, st)
                    le = dataclasses.replace(  # noqa: PLW2901 - the pinned inode's own stat
                        le, size=st.st_size, mtime_ns=st.st_mtime_ns, ino=st.st_ino
                    )
                kept.append(le)
        except BaseException:
            Pinned(kept, fds, skipped).close()
            raise
        return Pinned(kept, fds, skipped)

    def snapshot(
        self,
        *,
        reason: str,
        attempt: int = 0,
        keep: int | None = None,
        pinned: Pinned | None = None,
    ) -> SnapshotResult:
        """Snapshot the directory as it is now, or as it was when `pinned` was
        taken: then a file changed in place since raises TornCommitError
        (nothing is written) instead of keeping its previous version.

        The pin is closed once the snapshot is written or can never be
        (TornCommitError); after any other failure (the remote) it stays
        open, so the same moment can be snapshotted again, and the caller
        closes it when it gives up."""
        try:
            result = self._snapshot(reason, attempt, keep, pinned)
        except TornCommitError:
            if pinned is not None:
                pinned.close()
            raise
        finally:
            self.live = None
        if pinned is not None:
            pinned.close()
        return result

    def _snapshot(
        self, reason: str, attempt: int, keep: int | None, pinned: Pinned | None
    ) -> SnapshotResult:
        t0 = time.monotonic()
        scan_ns = time.time_ns()
        parent = self.parent
        step = pinned.step if pinned is not None else None
        if self.world_size > 1:  # before any chunk is looked up in the cache
            self.gc_seen = world.see_rounds(self.repo, self.gc_seen)
        result = SnapshotResult(None, parent)
        if pinned is not None:
            local = pinned.entries
            result.skipped_links.extend(pinned.skipped_links)
        elif not self.root.is_dir():
            return result  # a missing directory is not an empty state: nothing to record
        else:
            local = scan(self.root, self.patterns, result.skipped_links)
        parent_entries = {e.path: e for e in parent.entries} if parent else {}
        entries: dict[str, Entry] = {}
        to_read: list[LocalEntry] = []
        for le in local:
            if le.type == "file":
                c = self.cache.get(le.path)
                if c and (c.size, c.mtime_ns, c.ino) == (le.size, le.mtime_ns, le.ino):
                    entries[le.path] = Entry(
                        le.path, "file", le.mode, le.size, le.mtime_ns, c.chunks, ino=le.ino
                    )
                else:
                    to_read.append(le)
            elif le.type == "dir":
                entries[le.path] = Entry(le.path, "dir", le.mode, mtime_ns=le.mtime_ns)
            else:
                entries[le.path] = Entry(le.path, "symlink", le.mode, target=le.target)

        new_cache: dict[str, Cached] = {}
        fds = pinned.fds if pinned is not None else None
        self.live = (result, len(to_read), sum(le.size for le in to_read), time.monotonic())
        for le, outcome in self._read_files(to_read, result, fds):
            if isinstance(outcome, tuple):
                entries[le.path] = Entry(
                    le.path, "file", le.mode, le.size, le.mtime_ns, outcome, ino=le.ino
                )
                if scan_ns - le.mtime_ns >= RACY_NS:
                    new_cache[le.path] = Cached(le.size, le.mtime_ns, le.ino, outcome)
            else:
                if pinned is not None:
                    raise TornCommitError(
                        f"{le.path} was changed in place after the commit and before it "
                        "was read: this commit is not taken (write it to a temp name and "
                        "rename it, or commit once the write is finished)"
                    )
                result.unstable.append(le.path)
                old = parent_entries.get(le.path)
                if old is not None and old.type == "file":
                    entries[le.path] = old
        _drop_orphans(entries)

        ordered = tuple(entries[p] for p in sorted(entries))
        unchanged = (
            parent is not None
            and len(ordered) == len(parent.entries)
            and all(a.same_content(b) for a, b in zip(ordered, parent.entries, strict=True))
        )
        for path, le_cached in new_cache.items():
            self.cache[path] = le_cached
        for path in list(self.cache):
            if path not in entries:
                del self.cache[path]
        # A commit with a new step is written even when nothing changed: the
        # step is what makes the rank's part of a global generation.
        if unchanged and step is not None and (parent is None or parent.step != step):
            unchanged = False
        if unchanged or (parent is None and not ordered and step is None):
            result.seconds = time.monotonic() - t0
            return result

        self.may_write()
        manifest = Manifest(
            id=self.repo.new_id(),
            generation=self.repo.next_generation(),
            entries=ordered,
            chunk_size=self.repo.chunk_size,
            hash=self.repo.hash_name,
            created=time.time(),
            parent=parent.id if parent else None,
            host=host_name(),
            source=str(self.root),
            run=self.run,
            attempt=attempt,
            reason=reason,
            new_bytes=result.new_bytes,
            new_chunks=result.new_chunks,
            step=step,
            rank=self.rank,
            world_size=self.world_size,
            gc_seen=self.gc_seen,
        )
        self.repo.write_manifest(manifest)
        self.parent = manifest
        result.manifest = manifest
        if keep is not None:
            self.prune(keep)
        result.seconds = time.monotonic() - t0
        return result

    def prune(self, keep: int) -> None:
        """Retention: keep the newest `keep` snapshots, delete what only older
        ones name. The first prune of a process sweeps the whole chunk store
        (orphans of a crashed upload); later ones only look at what they drop."""
        self.may_write()
        if self.world_size == 1:
            self.repo.gc(keep, sweep=not self._swept)
        elif self.rank == 0:  # only rank 0 prunes a multi-rank repository
            world.prune(self.repo, keep, me=self.rank, ttl=self.lease_ttl, sweep=not self._swept)
        self._swept = True

    # -- reading

    def _read_files(
        self,
        files: list[LocalEntry],
        result: SnapshotResult,
        pinned: dict[str, tuple[int, os.stat_result]] | None = None,
    ) -> Iterable[tuple[LocalEntry, tuple[str, ...] | None]]:
        """Yield (file, chunk digests) or (file, None) if it changed while read,
        in no particular order. Chunks of many files are in flight at once;
        descriptors stay bounded. Files of one chunk or less go to the pool
        in batches, each read whole by one task (see SMALL_BATCH_FILES)."""
        pending: collections.deque[_Big | cf.Future[list[_Outcome]]] = collections.deque()
        open_big = 0
        chunk = self.repo.chunk_size
        batch: list[LocalEntry] = []
        batch_bytes = 0

        def submit_batch() -> None:
            nonlocal batch, batch_bytes
            self._slots.acquire()
            pending.append(self._pool.submit(self._small_task, batch, pinned, result))
            batch, batch_bytes = [], 0

        def pop_head() -> Iterable[_Outcome]:
            nonlocal open_big
            head = pending.popleft()
            if isinstance(head, _Big):
                open_big -= 1
                return [self._finish(head, result)]
            return head.result()

        def head_done() -> bool:
            head = pending[0]
            if isinstance(head, _Big):
                return all(f.done() for f in head.futures)
            return head.done()

        try:
            for le in files:
                if le.size <= chunk:
                    batch.append(le)
                    batch_bytes += le.size
                    if len(batch) >= SMALL_BATCH_FILES or batch_bytes >= chunk:
                        submit_batch()
                else:
                    big = self._submit_big(le, result, pinned)
                    if isinstance(big, _Big):
                        pending.append(big)
                        open_big += 1
                    else:
                        yield big
                while pending and (open_big > MAX_OPEN_FILES or head_done()):
                    yield from pop_head()
            if batch:
                submit_batch()
            while pending:
                yield from pop_head()
        finally:
            for item in pending:
                if isinstance(item, _Big):
                    cf.wait(item.futures)
                    os.close(item.fd)
                else:
                    cf.wait([item])

    def _open(
        self, le: LocalEntry, pinned: dict[str, tuple[int, os.stat_result]] | None
    ) -> tuple[int, os.stat_result] | None:
        """A descriptor on the file and its stat; None if it is gone or no
        longer a regular file. A pinned file is read through a duplicate of
        its pin (closed after), so the pin survives a failed upload; its stat
        is the one taken at pin time, so a change in place since shows."""
        if pinned is not None and le.path in pinned:
            pinned_fd, st = pinned[le.path]
            fd = os.dup(pinned_fd)
        else:
            try:
                fd = os.open(self.root / le.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                return None  # vanished or replaced by a link since the scan
            st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return None
        return fd, st

    def _submit_big(
        self,
        le: LocalEntry,
        result: SnapshotResult,
        pinned: dict[str, tuple[int, os.stat_result]] | None,
    ) -> _Big | _Outcome:
        opened = self._open(le, pinned)
        if opened is None:
            return le, None
        fd, st = opened
        size = st.st_size
        big = _Big(
            dataclasses.replace(le, size=size, mtime_ns=st.st_mtime_ns, ino=st.st_ino), fd, st, []
        )
        chunk = self.repo.chunk_size
        for offset in range(0, size, chunk):
            self._slots.acquire()
            big.futures.append(
                self._pool.submit(self._chunk_task, fd, offset, min(chunk, size - offset), result)
            )
        return big

    def _chunk_task(self, fd: int, offset: int, length: int, result: SnapshotResult) -> str:
        try:
            with self._buffers.view(length) as view:
                if os.preadv(fd, [view], offset) != length:
                    raise _Changed
                digest = self.repo.hash(view)
                if self.repo.borrows_buffers:
                    sent = self.repo.put_chunk(digest, view)
                else:  # the buffer goes back to the pool while the copy uploads
                    payload = bytes(view)
            if not self.repo.borrows_buffers:
                sent = self.repo.put_chunk(digest, payload)
            with self._stats_lock:
                result.bytes_read += length
                if sent:
                    result.new_bytes += length
                    result.new_chunks += 1
            return digest
        finally:
            self._slots.release()

    def _finish(self, big: _Big, result: SnapshotResult) -> _Outcome:
        le, fd, before = big.entry, big.fd, big.st
        try:
            digests = tuple(f.result() for f in big.futures)
            after = os.fstat(fd)
            grew = os.pread(fd, 1, before.st_size) != b""
        except _Changed:
            return le, None
        finally:
            os.close(fd)
        with self._stats_lock:
            result.files_read += 1
        if grew or (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            return le, None
        return le, digests

    def _small_task(
        self,
        batch: list[LocalEntry],
        pinned: dict[str, tuple[int, os.stat_result]] | None,
        result: SnapshotResult,
    ) -> list[_Outcome]:
        """Read, hash and put whole files of at most one chunk, one after the
        other, through one buffer."""
        try:
            with self._buffers.view(self.repo.chunk_size) as buf:
                return [self._read_small(le, buf, pinned, result) for le in batch]
        finally:
            self._slots.release()

    def _read_small(
        self,
        le: LocalEntry,
        buf: memoryview,
        pinned: dict[str, tuple[int, os.stat_result]] | None,
        result: SnapshotResult,
    ) -> _Outcome:
        opened = self._open(le, pinned)
        if opened is None:
            return le, None
        fd, before = opened
        try:
            size = before.st_size
            if size > len(buf):
                return le, None  # grew past a chunk since the scan: read it next time
            # One byte more than the size, where the buffer has room: a file
            # that grew meanwhile shows as a longer read.
            got = os.preadv(fd, [buf[: size + 1]], 0)
            if got != size or (size == len(buf) and os.pread(fd, 1, size) != b""):
                return le, None
            view = buf[:size]
            digests: tuple[str, ...] = ()
            sent = False
            if size:
                digest = self.repo.hash(view)
                sent = self.repo.put_chunk(digest, view)
                digests = (digest,)
            view.release()
            after = os.fstat(fd)
        finally:
            os.close(fd)
        with self._stats_lock:
            result.files_read += 1
            result.bytes_read += size
            if sent:
                result.new_bytes += size
                result.new_chunks += 1
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            return le, None
        return (
            dataclasses.replace(le, size=size, mtime_ns=before.st_mtime_ns, ino=before.st_ino),
            digests,
        )


def _drop_orphans(entries: dict[str, Entry]) -> None:
    """Remove entries whose parent directory is no longer in the snapshot."""
    for path in sorted(entries, key=lambda p: p.count("/")):
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if parent and (parent not in entries or entries[parent].type != "dir"):
            del entries[path]
