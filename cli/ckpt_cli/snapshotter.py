"""Scan the checkpoint directory, hash what changed, upload new chunks, write the manifest.

One snapshot = scan (stat only) -> read changed files in fixed-size chunks on a
small thread pool (the hash releases the GIL, so hashing uses every core) ->
put chunks the repository does not have -> write the manifest last -> prune.
Memory is bounded by the number of chunks in flight, whatever the file sizes.
A file that changes while it is read keeps its previous version (or is left
out if it has none) and the caller is told to snapshot again. A file ckpt
cannot open or read (its mode, an I/O error) is never taken for one that
changed or vanished: it is named with the reason (`SnapshotResult.unreadable`),
and a commit or a strict snapshot (`ckpt push`) that needs it fails
(UnreadableError) instead of leaving it out.

With format checks in force (`checks`, the run's registry), what changed is
judged before it is read (`progress`): an automatic snapshot (`auto`) with a
file in progress is held back (`SnapshotResult.waiting`, nothing read or
written) unless it is taken anyway, then recorded `verified=False` with the
files and why; a commit fails (NotWholeError) at its pin on a file failing
its check. Each entry records the check it passed (`Entry.check`).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import dataclasses
import errno
import fnmatch
import functools
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Generator, Iterable
from pathlib import Path

from ckpt import _contract as contract
from ckpt_cli import world
from ckpt_cli.formats import Registry
from ckpt_cli.manifest import Entry, Manifest, host_name, link_escapes
from ckpt_cli.progress import Auto, Judge, Judgement, NotWholeError, Stat
from ckpt_cli.repository import Buffers, Repository

__all__ = ["Auto", "NotWholeError"]  # re-exported: the worker and control catch them

#: Names that are never snapshotted: one definition, shared with the shim.
TEMP_PATTERNS = contract.TEMP_PATTERNS
#: A file modified this close to the scan may change again within the same
#: mtime tick: it is not trusted from the stat cache next time (racy-git rule).
RACY_NS = 1_000_000_000
#: Files being read at once (open descriptors) at the most.
MAX_OPEN_FILES = 64
#: How files are opened for reading: never through a symlink, and without
#: blocking (a FIFO put in a file's place since the scan must not hang a snapshot).
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
#: Errors opening a file scanned a moment ago that mean it is no longer there
#: as a file (deleted, replaced by a link, a parent replaced), or busy (a lease
#: of another process): it changed, and the next snapshot looks again. Running
#: out of descriptors or memory is ckpt's own failure and raised as it is;
#: every other error means ckpt cannot read the file.
VANISHED = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EAGAIN})
OWN_FAILURE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})
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
    check: str = ""  # the format check its content passed


@dataclasses.dataclass
class SnapshotResult:
    manifest: Manifest | None  # None: nothing changed since `parent`
    parent: Manifest | None
    files_read: int = 0
    bytes_read: int = 0
    new_bytes: int = 0
    new_chunks: int = 0
    unstable: list[str] = dataclasses.field(default_factory=list)
    #: Files ckpt could not read -> why ("Permission denied"): each keeps its
    #: previous version, or is left out if it has none.
    unreadable: dict[str, str] = dataclasses.field(default_factory=dict)
    skipped_links: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    #: Held back: files (and directories) in progress -> why; nothing was
    #: read or written (an automatic snapshot only).
    waiting: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Files in progress when it was judged, held back or taken anyway.
    in_progress: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Files judged appenders -> the size taken (their growth is no activity).
    appenders: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def newest(self) -> Manifest | None:
        """The snapshot that now holds the directory's committed state."""
        return self.manifest or self.parent


#: A file's chunk digests; None: it changed while read; a str: why it could
#: not be read.
_Outcome = tuple["LocalEntry", tuple[str, ...] | str | None]


@dataclasses.dataclass
class _Big:
    """A file of several chunks being read: its chunks are separate tasks."""

    entry: LocalEntry
    fd: int
    st: os.stat_result
    futures: list[cf.Future[str]]


class _Changed(Exception):
    """The file changed while it was being read."""


class _Unreadable(Exception):
    """Reading the file failed (not the remote): the reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _open_error(exc: OSError) -> str | None:
    """An error opening a scanned file: None if the file vanished or changed,
    else why it cannot be read; ckpt's own failures are raised."""
    if exc.errno in VANISHED:
        return None
    if exc.errno in OWN_FAILURE:
        raise exc
    return _reason(exc)


class TornCommitError(RuntimeError):
    """A pinned file was changed in place before it could be read."""


class UnreadableError(OSError):
    """A file a commit or a strict snapshot needs cannot be read: nothing is
    written. An OSError, as a failure to pin the directory is."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(
            f"{path} cannot be read by ckpt ({reason}): no snapshot taken (make it "
            "readable, or leave it out with --exclude)"
        )
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return str(self.args[0])


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
    #: The check each checked file or directory passed; None: not checked.
    checks: dict[str, str] | None = None

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
        checks: Registry | None = None,
    ) -> None:
        self.repo = repo
        #: The format checks in force (the run's built-in and --check ones);
        #: None: no checks at all, as `ckpt push` snapshots.
        self.checks = checks
        #: Judges changed files before they are read (None: no checks at all,
        #: as `ckpt push` snapshots).
        self.judge = (
            Judge(checks, root, hash=repo.hash, chunk_size=repo.chunk_size)
            if checks is not None
            else None
        )
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
        try:
            found = self.scan_root()
        except UnreadableError:
            return  # nothing trusted: the next snapshot reads (and names) it
        for local in found:
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
                self.cache[local.path] = Cached(
                    local.size, local.mtime_ns, local.ino, e.chunks, e.check
                )

    def scan_root(self, skipped: list[str] | None = None) -> list[LocalEntry]:
        """scan(), with a directory that cannot be listed (its mode, an I/O
        error) raised as UnreadableError naming it: the snapshot fails
        rather than leave its files out."""
        try:
            return scan(self.root, self.patterns, skipped)
        except OSError as exc:
            if exc.errno in OWN_FAILURE:
                raise
            where = os.fsdecode(exc.filename) if exc.filename else str(self.root)
            rel = os.path.relpath(where, self.root) if where.startswith(str(self.root)) else where
            raise UnreadableError(
                f"{rel}/" if rel != "." else str(self.root), _reason(exc)
            ) from None

    def changed_since_cache(self, entries: Iterable[LocalEntry]) -> list[str]:
        """Files whose stat differs from the stat cache: what changed since the
        last snapshot (safe from another thread: lookups only)."""
        out = []
        for le in entries:
            if le.type != "file":
                continue
            c = self.cache.get(le.path)
            if not c or (c.size, c.mtime_ns, c.ino) != (le.size, le.mtime_ns, le.ino):
                out.append(le.path)
        return out

    def pin(self, *, check: bool = False) -> Pinned:
        """Scan now and hold every regular file open (see Pinned). Safe to call
        from another thread while a snapshot runs: it only reads. A file that
        cannot be opened (but for having vanished) raises UnreadableError: a
        commit without it would not be the directory's state. With check (a
        commit) and checks in force, the files that changed since the last
        snapshot and the directories are checked on the pin: NotWholeError
        names the first that fails, and nothing is pinned."""
        skipped: list[str] = []
        entries = self.scan_root(skipped) if self.root.is_dir() else []
        fds: dict[str, tuple[int, os.stat_result]] = {}
        kept: list[LocalEntry] = []
        try:
            for le in entries:
                if le.type == "file":
                    try:
                        fd = os.open(self.root / le.path, OPEN_FLAGS)
                    except OSError as exc:
                        why = _open_error(exc)
                        if why is None:
                            continue  # deleted since the scan: not part of this moment
                        raise UnreadableError(le.path, why) from None
                    st = os.fstat(fd)
                    if not stat.S_ISREG(st.st_mode):  # replaced by a FIFO or a device
                        os.close(fd)
                        continue
                    fds[le.path] = (fd, st)
                    le = dataclasses.replace(  # noqa: PLW2901 - the pinned inode's own stat
                        le, size=st.st_size, mtime_ns=st.st_mtime_ns, ino=st.st_ino
                    )
                kept.append(le)
        except BaseException:
            Pinned(kept, fds, skipped).close()
            raise
        pinned = Pinned(kept, fds, skipped)
        if check and self.judge is not None:
            try:
                pinned.checks = self.judge.check_pinned(
                    kept, fds, self.changed_since_cache(kept), self.parent
                )
            except BaseException:
                pinned.close()
                raise
        return pinned

    def snapshot(
        self,
        *,
        reason: str,
        attempt: int = 0,
        keep: int | None = None,
        pinned: Pinned | None = None,
        strict: bool = False,
        auto: Auto | None = None,
    ) -> SnapshotResult:
        """Snapshot the directory as it is now, or as it was when `pinned` was
        taken: then a file changed in place since raises TornCommitError
        (nothing is written) instead of keeping its previous version. A file
        that cannot be read keeps its previous version (result.unreadable),
        but raises UnreadableError (nothing is written) when pinned or strict.

        The pin is closed once the snapshot is written or can never be
        (TornCommitError, UnreadableError); after any other failure (the
        remote) it stays open, so the same moment can be snapshotted again,
        and the caller closes it when it gives up.

        auto (an automatic snapshot, with checks in force): files in progress
        hold it back (result.waiting; nothing is read or written) unless
        auto.take_anyway, which writes it unverified."""
        try:
            result = self._snapshot(reason, attempt, keep, pinned, strict, auto)
        except (TornCommitError, UnreadableError):
            if pinned is not None:
                pinned.close()
            raise
        finally:
            self.live = None
        if pinned is not None:
            pinned.close()
        return result

    def _snapshot(
        self,
        reason: str,
        attempt: int,
        keep: int | None,
        pinned: Pinned | None,
        strict: bool,
        auto: Auto | None,
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
            local = self.scan_root(result.skipped_links)
        parent_entries = {e.path: e for e in parent.entries} if parent else {}
        entries: dict[str, Entry] = {}
        to_read: list[LocalEntry] = []
        for le in local:
            if le.type == "file":
                c = self.cache.get(le.path)
                if c and (c.size, c.mtime_ns, c.ino) == (le.size, le.mtime_ns, le.ino):
                    entries[le.path] = Entry(
                        le.path,
                        "file",
                        le.mode,
                        le.size,
                        le.mtime_ns,
                        c.chunks,
                        ino=le.ino,
                        check=c.check,
                    )
                else:
                    to_read.append(le)
            elif le.type == "dir":
                entries[le.path] = Entry(le.path, "dir", le.mode, mtime_ns=le.mtime_ns)
            else:
                entries[le.path] = Entry(le.path, "symlink", le.mode, target=le.target)

        judged: Judgement | None = None
        checks: dict[str, str] = {}
        if pinned is not None and pinned.checks is not None:
            checks = pinned.checks
        elif auto is not None and self.judge is not None:
            judged = self.judge.judge(local, to_read, parent, auto)
            result.appenders = dict(judged.appenders)
            result.in_progress = dict(judged.in_progress)
            if auto.probe:
                return result
            if judged.in_progress and not auto.take_anyway:
                result.waiting = dict(judged.in_progress)
                result.seconds = time.monotonic() - t0
                return result  # held back: nothing read, nothing written
            checks = judged.checks
        for path, check in checks.items():
            e = entries.get(path)
            if e is not None and e.type == "dir":
                entries[path] = dataclasses.replace(e, check=check)

        new_cache: dict[str, Cached] = {}
        fds = pinned.fds if pinned is not None else None
        expect = judged.expect if judged is not None else None
        self.live = (result, len(to_read), sum(le.size for le in to_read), time.monotonic())
        with contextlib.closing(
            self._read_files(to_read, result, fds, expect, result.appenders)
        ) as outcomes:
            for le, outcome in outcomes:
                if isinstance(outcome, tuple):
                    check = checks.get(le.path, "")
                    entries[le.path] = Entry(
                        le.path,
                        "file",
                        le.mode,
                        le.size,
                        le.mtime_ns,
                        outcome,
                        ino=le.ino,
                        check=check,
                    )
                    if scan_ns - le.mtime_ns >= RACY_NS:
                        new_cache[le.path] = Cached(le.size, le.mtime_ns, le.ino, outcome, check)
                    continue
                if isinstance(outcome, str):
                    if pinned is not None or strict:
                        raise UnreadableError(le.path, outcome)
                    result.unreadable[le.path] = outcome
                elif pinned is not None:
                    raise TornCommitError(
                        f"{le.path} was changed in place after the commit and before it "
                        "was read: this commit is not taken (write it to a temp name and "
                        "rename it, or commit once the write is finished)"
                    )
                else:
                    result.unstable.append(le.path)
                old = parent_entries.get(le.path)
                if old is not None and old.type == "file":
                    entries[le.path] = old
        _drop_orphans(entries)

        ordered = tuple(entries[p] for p in sorted(entries))
        verified, unverified = self._verified(judged, pinned)
        unchanged = (
            parent is not None
            and len(ordered) == len(parent.entries)
            and all(a.same_content(b) for a, b in zip(ordered, parent.entries, strict=True))
            # The same files as an unverified snapshot are written again once
            # they are whole (what a restore prefers changed), or once other
            # files are in progress; the same as a verified one never are.
            and (
                parent.verified is not False
                or (
                    verified is False
                    and {p for p, _ in parent.unverified} == {p for p, _ in unverified}
                )
            )
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
            verified=verified,
            unverified=unverified,
        )
        self.repo.write_manifest(manifest)
        self.parent = manifest
        result.manifest = manifest
        if keep is not None:
            self.prune(keep)
        result.seconds = time.monotonic() - t0
        return result

    def _verified(
        self, judged: Judgement | None, pinned: Pinned | None
    ) -> tuple[bool | None, tuple[tuple[str, str], ...]]:
        """The manifest's verified and unverified (of what is in it)."""
        if judged is not None:
            listed = judged.unverified
            return judged.verified(), tuple((p, listed[p]) for p in sorted(listed))
        if pinned is not None and pinned.checks is not None and self.judge is not None:
            return (True if self.judge.checked else None), ()
        return None, ()

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
        expect: dict[str, Stat] | None = None,
        growing: dict[str, int] | None = None,
    ) -> Generator[_Outcome, None, None]:
        """Yield (file, chunk digests), (file, None) if it changed while read,
        or (file, why) if it could not be read, in no particular order.
        Chunks of many files are in flight at once; descriptors stay bounded.
        Files of one chunk or less go to the pool in batches, each read whole
        by one task (see SMALL_BATCH_FILES).

        expect: the stat each file had when it was judged; one that differs
        at the read changed since (None). growing: appenders -> the size
        judged: that prefix is read, and the file may grow meanwhile."""
        rules = _Rules(expect or {}, growing or {})
        pending: collections.deque[_Big | cf.Future[list[_Outcome]]] = collections.deque()
        open_big = 0
        chunk = self.repo.chunk_size
        batch: list[LocalEntry] = []
        batch_bytes = 0

        def submit_batch() -> None:
            nonlocal batch, batch_bytes
            self._slots.acquire()
            pending.append(self._pool.submit(self._small_task, batch, pinned, result, rules))
            batch, batch_bytes = [], 0

        def pop_head() -> Iterable[_Outcome]:
            nonlocal open_big
            head = pending.popleft()
            if isinstance(head, _Big):
                open_big -= 1
                return [self._finish(head, result, rules)]
            return head.result()

        def head_done() -> bool:
            head = pending[0]
            if isinstance(head, _Big):
                return all(f.done() for f in head.futures)
            return head.done()

        try:
            for le in files:
                if rules.size(le) <= chunk:
                    batch.append(le)
                    batch_bytes += le.size
                    if len(batch) >= SMALL_BATCH_FILES or batch_bytes >= chunk:
                        submit_batch()
                else:
                    big = self._submit_big(le, result, pinned, rules)
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
        longer a regular file; _Unreadable if it cannot be opened. A pinned
        file is read through a duplicate of its pin (closed after), so the pin
        survives a failed upload; its stat is the one taken at pin time, so a
        change in place since shows."""
        if pinned is not None and le.path in pinned:
            pinned_fd, st = pinned[le.path]
            fd = os.dup(pinned_fd)
        else:
            try:
                fd = os.open(self.root / le.path, OPEN_FLAGS)
            except OSError as exc:
                why = _open_error(exc)
                if why is None:
                    return None  # vanished or replaced by a link since the scan
                raise _Unreadable(why) from None
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
        rules: _Rules,
    ) -> _Big | _Outcome:
        try:
            opened = self._open(le, pinned)
        except _Unreadable as exc:
            return le, exc.reason
        if opened is None:
            return le, None
        fd, st = opened
        taken = rules.take(le.path, st)
        if taken is None:
            os.close(fd)
            return le, None
        size, mtime_ns = taken
        big = _Big(dataclasses.replace(le, size=size, mtime_ns=mtime_ns, ino=st.st_ino), fd, st, [])
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
                try:
                    got = os.preadv(fd, [view], offset)
                except OSError as exc:
                    raise _Unreadable(_reason(exc)) from None
                if got != length:
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

    def _finish(self, big: _Big, result: SnapshotResult, rules: _Rules) -> _Outcome:
        le, fd, before = big.entry, big.fd, big.st
        try:
            cf.wait(big.futures)  # none may read fd once it is closed
            digests = tuple(f.result() for f in big.futures)
            after = os.fstat(fd)
            if le.path in rules.growing:  # an appender: its prefix is taken
                os.close(fd)
                fd = -1
                with self._stats_lock:
                    result.files_read += 1
                return le, (digests if after.st_size >= le.size else None)
            grew = os.pread(fd, 1, before.st_size) != b""
        except _Changed:
            return le, None
        except _Unreadable as exc:
            return le, exc.reason
        except OSError as exc:  # the fstat or pread above: the local file
            return le, _reason(exc)
        finally:
            if fd >= 0:
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
        rules: _Rules,
    ) -> list[_Outcome]:
        """Read, hash and put whole files of at most one chunk, one after the
        other, through one buffer."""
        try:
            with self._buffers.view(self.repo.chunk_size) as buf:
                return [self._read_small(le, buf, pinned, result, rules) for le in batch]
        finally:
            self._slots.release()

    def _read_small(
        self,
        le: LocalEntry,
        buf: memoryview,
        pinned: dict[str, tuple[int, os.stat_result]] | None,
        result: SnapshotResult,
        rules: _Rules,
    ) -> _Outcome:
        try:
            opened = self._open(le, pinned)
        except _Unreadable as exc:
            return le, exc.reason
        if opened is None:
            return le, None
        fd, before = opened
        appender = le.path in rules.growing
        try:
            taken = rules.take(le.path, before)
            if taken is None:
                return le, None  # changed since it was judged
            size, mtime_ns = taken
            if size > len(buf):
                return le, None  # grew past a chunk since the scan: read it next time
            # One byte more than the size, where the buffer has room: a file
            # that grew meanwhile shows as a longer read (an appender's
            # prefix alone is read: it may grow).
            try:
                got = os.preadv(fd, [buf[: size + (0 if appender else 1)]], 0)
                longer = not appender and size == len(buf) and os.pread(fd, 1, size) != b""
            except OSError as exc:
                return le, _reason(exc)
            if got != size or longer:
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
        if appender:
            if after.st_size < size:
                return le, None
        elif (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            return le, None
        return (
            dataclasses.replace(le, size=size, mtime_ns=mtime_ns, ino=before.st_ino),
            digests,
        )


@dataclasses.dataclass(frozen=True)
class _Rules:
    """What a read must find (see _read_files)."""

    expect: dict[str, Stat]
    growing: dict[str, int]

    def size(self, le: LocalEntry) -> int:
        judged = self.expect.get(le.path)
        return judged[0] if judged is not None else le.size

    def take(self, path: str, st: os.stat_result) -> tuple[int, int] | None:
        """(size, mtime_ns) to read and record of the file whose descriptor
        has stat st; None if it changed since it was judged."""
        judged = self.expect.get(path)
        if judged is None:
            return st.st_size, st.st_mtime_ns
        size, mtime_ns, ino = judged
        if path in self.growing:  # an appender: the prefix judged, if it is still there
            ok = st.st_ino == ino and st.st_size >= size
        else:
            ok = (st.st_size, st.st_mtime_ns, st.st_ino) == judged
        return (size, mtime_ns) if ok else None


def _drop_orphans(entries: dict[str, Entry]) -> None:
    """Remove entries whose parent directory is no longer in the snapshot."""
    for path in sorted(entries, key=lambda p: p.count("/")):
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if parent and (parent not in entries or entries[parent].type != "dir"):
            del entries[path]
