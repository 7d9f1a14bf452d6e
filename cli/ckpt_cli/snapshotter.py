"""Scan the checkpoint directory, hash what changed, upload new chunks, write the manifest.

One snapshot = scan (stat only) -> read changed files in fixed-size chunks on a
small thread pool (the hash releases the GIL, so hashing uses every core) ->
put chunks the repository does not have -> write the manifest last -> prune.
Memory is bounded by the number of chunks in flight, whatever the file sizes.
A file that changes while it is read keeps its previous version (or is left
out if it has none) and the caller is told to snapshot again; a strict
snapshot (`ckpt push`: the whole directory, whole, or nothing) writes
nothing then (ChangedWhileReadError) and may be tried again. A file ckpt
cannot open or read (its mode, an I/O error) is never taken for one that
changed or vanished: it is named with the reason (`SnapshotResult.unreadable`),
and a commit or a strict snapshot that needs it fails (UnreadableError)
instead of leaving it out.

With format checks in force (`checks`, the run's registry), what changed is
judged before it is read (`progress`): an automatic snapshot (`auto`) with a
file in progress is held back (`SnapshotResult.waiting`, nothing read or
written) unless it is taken anyway, then recorded `verified=False` with the
files and why; a strict snapshot is judged the same way (without the job's
open files: it has none) and is held back by any file that is not whole,
one the last snapshot listed included; a commit fails (NotWholeError) at its
pin on a file failing its check. Each entry records the check it passed
(`Entry.check`).
Reading the changed files is `reader`'s; the scan is `dirscan`'s. What
the stream keeps and what a manifest records of its world are injected
policies (`retention_policy`): one node, or a rank of several.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import stat
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

from ckpt_cli.dirscan import TEMP_PATTERNS, LocalEntry, is_ignored, scan
from ckpt_cli.formats import Registry
from ckpt_cli.manifest import Entry, Manifest, host_name
from ckpt_cli.progress import Auto, Judge, Judgement, NotWholeError, Stat
from ckpt_cli.reader import (
    MAX_OPEN_FILES,
    OPEN_FLAGS,
    OWN_FAILURE,
    ChunkReader,
    open_error,
    reason,
)
from ckpt_cli.repository import Repository
from ckpt_cli.retention_policy import PreSnapshot, Retention, Stamp, for_world

__all__ = [  # re-exported: the worker and control catch the first two; restore scans
    "MAX_OPEN_FILES",
    "TEMP_PATTERNS",
    "Auto",
    "LocalEntry",
    "NotWholeError",
    "is_ignored",
    "scan",
]

#: A file modified this close to the scan may change again within the same
#: mtime tick: it is not trusted from the stat cache next time (racy-git rule).
RACY_NS = 1_000_000_000


class Cached(NamedTuple):
    """What the stat cache vouches for: a file with this size, mtime and
    inode holds these chunks. (A NamedTuple: one per unchanged file per
    snapshot, 10,000 of them in bench/ case 4.)"""

    size: int
    mtime_ns: int
    ino: int
    chunks: tuple[str, ...]
    check: str = ""  # the format check its content passed
    #: The entry last recorded for it, reused while its mode is the same
    #: (a chmod changes no mtime): no new Entry per unchanged file.
    entry: Entry | None = None


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


@dataclasses.dataclass(frozen=True)
class Listing:
    """One scan of the directory (`Snapshotter.list_root`), for a caller that
    adopts a parent and snapshots at once (`ckpt push`): the directory is
    walked once, not once for each."""

    entries: list[LocalEntry]
    skipped_links: list[str]
    #: time.time_ns() before the walk: a file modified less than RACY_NS
    #: before it is read again next time.
    began_ns: int


class TornCommitError(RuntimeError):
    """A pinned file was changed in place before it could be read."""


class ChangedWhileReadError(RuntimeError):
    """Files of a strict snapshot changed while they were read (or vanished
    since the scan): nothing is written. What was read whole is in the stat
    cache, so a snapshot tried again reads only what changed."""

    def __init__(self, paths: list[str]) -> None:
        super().__init__(f"changed while being read: {', '.join(paths[:5])}")
        self.paths = paths


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


def room_for(files: int) -> None:
    """Let this process hold `files` more descriptors at once (a commit pins
    every file of --dir): raise its soft open-file limit toward the hard one
    where it is short. Most systems start processes at a soft limit of 1024
    with a far higher hard one, so without this a --dir of a thousand files
    could not be committed. The child keeps the limit it was started with;
    one relaunched later inherits the raised one, which only lets it open
    more. OSError (EMFILE) naming the limit where even the hard one is short."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 256
    need = in_use + files + 64
    if soft == resource.RLIM_INFINITY or need <= soft:
        return
    new = need if hard == resource.RLIM_INFINITY else min(hard, need)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    if new < need:
        raise OSError(
            errno.EMFILE,
            f"a commit holds every file of --dir open at once ({files} files), more than the "
            f"open-file limit allows ({hard}, the hard limit of `ulimit -n`): raise it "
            "(ulimit -Hn, systemd LimitNOFILE=, docker --ulimit nofile=)",
        )


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
        checks: Registry | None = None,
        retention: Retention | None = None,
        before_snapshot: PreSnapshot | None = None,
        rank: int = 0,
        world_size: int = 1,
        lease_ttl: float = 60.0,
    ) -> None:
        """retention: what the stream keeps (`prune`); before_snapshot: the
        hook run before each snapshot, whose Stamp the manifest records.
        Without them, those of rank `rank` of a world of `world_size`
        (`retention.for_world`; 0 of 1: a single node)."""
        self.repo = repo
        #: The format checks in force (the run's or the push's built-in and
        #: --check ones); None: no checks at all.
        self.checks = checks
        #: Judges changed files before they are read (None: no checks at all).
        self.judge = (
            Judge(checks, root, hash=repo.hash, chunk_size=repo.chunk_size)
            if checks is not None
            else None
        )
        default_retention, default_hook = for_world(rank, world_size, lease_ttl)
        self.retention = retention or default_retention
        self.before_snapshot = before_snapshot or default_hook
        #: What the last snapshot recorded of its world (before_snapshot's).
        self.stamp = Stamp()
        self.root = root
        self.run = run
        self.patterns = tuple(patterns)
        self.concurrency = max(1, concurrency)
        self.may_write = may_write  # raises if this writer lost its lease
        self.parent: Manifest | None = None
        self.cache: dict[str, Cached] = {}
        self._reader = ChunkReader(repo, root, self.concurrency)
        #: The snapshot being read now: (its result so far, files and bytes it
        #: has to read, monotonic start), for `ckpt status`; None between them.
        self.live: tuple[SnapshotResult, int, int, float] | None = None
        self._swept = False

    def close(self) -> None:
        self._reader.close()

    @property
    def gc_seen(self) -> int:
        """The newest multi-rank GC round this writer has read (world.see_rounds)."""
        return self.stamp.gc_seen

    def adopt(
        self, manifest: Manifest | None, *, trust_local: bool, listing: Listing | None = None
    ) -> None:
        """Make `manifest` the parent. With trust_local (the directory was just
        restored from it, or holds it), seed the stat cache from the files on
        disk so unchanged files are not read again. listing: a scan just
        made (else the directory is scanned here)."""
        self.parent = manifest
        self.cache.clear()
        if manifest is None:
            return
        by_path = {e.path: e for e in manifest.files}
        same_place = manifest.host == host_name() and manifest.source == str(self.root)
        racy_after = time.time_ns() - RACY_NS  # modified since: not trusted
        try:
            found = listing.entries if listing is not None else self.scan_root()
        except UnreadableError:
            return  # nothing trusted: the next snapshot reads (and names) it
        has_chunks = self.repo.has_chunks
        for local in found:
            e = by_path.get(local.path)
            if e is None or local.type != "file" or local.size != e.size:
                continue
            if local.mtime_ns != e.mtime_ns or local.mtime_ns > racy_after:
                continue
            same_inode = local.ino == e.ino
            if not (trust_local or (same_place and same_inode)):
                continue
            # A chunk gone from the remote (deleted or pruned behind our back)
            # must be read and uploaded again, not named by the next snapshot.
            if has_chunks(e.chunks):
                self.cache[local.path] = Cached(
                    local.size,
                    local.mtime_ns,
                    local.ino,
                    e.chunks,
                    e.check,
                    e if same_inode else None,
                )

    def list_root(self) -> Listing:
        """A Listing of the directory now (UnreadableError as scan_root)."""
        began = time.time_ns()
        skipped: list[str] = []
        return Listing(self.scan_root(skipped), skipped, began)

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
                f"{rel}/" if rel != "." else str(self.root), reason(exc)
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
        room_for(sum(1 for le in entries if le.type == "file"))
        fds: dict[str, tuple[int, os.stat_result]] = {}
        kept: list[LocalEntry] = []
        try:
            for le in entries:
                if le.type == "file":
                    try:
                        fd = os.open(self.root / le.path, OPEN_FLAGS)
                    except OSError as exc:
                        why = open_error(exc)
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
        listing: Listing | None = None,
    ) -> SnapshotResult:
        """Snapshot the directory as it is now (as `listing` found it, when
        given: a scan made just before), or as it was when `pinned` was
        taken: then a file changed in place since raises TornCommitError
        (nothing is written) instead of keeping its previous version. A file
        that cannot be read keeps its previous version (result.unreadable),
        but raises UnreadableError (nothing is written) when pinned or strict.

        strict (`ckpt push`): the whole directory, whole, or nothing. With
        checks in force, a file (or directory) that is not whole holds it
        back (result.waiting, nothing read or written); a file that changed
        while read raises ChangedWhileReadError (nothing written).

        The pin is closed once the snapshot is written or can never be
        (TornCommitError, UnreadableError); after any other failure (the
        remote) it stays open, so the same moment can be snapshotted again,
        and the caller closes it when it gives up.

        auto (an automatic snapshot, with checks in force): files in progress
        hold it back (result.waiting; nothing is read or written) unless
        auto.take_anyway, which writes it unverified."""
        try:
            result = self._snapshot(reason, attempt, keep, pinned, strict, auto, listing)
        except (TornCommitError, UnreadableError, ChangedWhileReadError):
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
        listing: Listing | None,
    ) -> SnapshotResult:
        t0 = time.monotonic()
        scan_ns = time.time_ns()
        parent = self.parent
        step = pinned.step if pinned is not None else None
        self.stamp = self.before_snapshot(self.repo)  # before any chunk is looked up
        result = SnapshotResult(None, parent)
        if pinned is not None:
            local = pinned.entries
            result.skipped_links.extend(pinned.skipped_links)
        elif listing is not None:
            local = listing.entries
            result.skipped_links.extend(listing.skipped_links)
            scan_ns = listing.began_ns
        elif not self.root.is_dir():
            return result  # a missing directory is not an empty state: nothing to record
        else:
            local = self.scan_root(result.skipped_links)
        entries, to_read = _from_cache(self.cache, local)

        judged: Judgement | None = None
        checks: dict[str, str] = {}
        if pinned is not None and pinned.checks is not None:
            checks = pinned.checks
        elif (auto is not None or strict) and self.judge is not None:
            auto = auto or Auto()  # a strict snapshot: no open-file scan
            judged = self.judge.judge(local, to_read, parent, auto)
            result.appenders = dict(judged.appenders)
            result.in_progress = dict(judged.in_progress)
            if auto.probe:
                return result
            # Strict: a file listed unverified by the last snapshot and still
            # not whole holds it back too (as a commit refuses it).
            held = judged.unverified if strict else judged.in_progress
            if held and not auto.take_anyway:
                result.waiting = dict(held)
                result.seconds = time.monotonic() - t0
                return result  # held back: nothing read, nothing written
            checks = judged.checks
        for path, check in checks.items():
            e = entries.get(path)
            if e is not None and e.type == "dir":
                entries[path] = dataclasses.replace(e, check=check)

        expect = judged.expect if judged is not None else None
        new_cache = self._read(to_read, entries, result, pinned, strict, checks, expect, scan_ns)
        if strict and result.unstable:
            self.cache.update(new_cache)  # read whole: not read again
            raise ChangedWhileReadError(sorted(result.unstable))
        _drop_orphans(entries)

        ordered = tuple(entries[p] for p in sorted(entries))
        verified, unverified = _verified(self.judge, judged, pinned)
        unchanged = _unchanged(parent, ordered, verified, unverified, step)
        for path, le_cached in new_cache.items():
            self.cache[path] = le_cached
        for path in list(self.cache):
            if path not in entries:
                del self.cache[path]
        if unchanged or (parent is None and not ordered and step is None):
            result.seconds = time.monotonic() - t0
            return result

        self.may_write()
        manifest = self._new_manifest(ordered, attempt, reason, result, step, verified, unverified)
        self.repo.write_manifest(manifest)
        self.parent = manifest
        result.manifest = manifest
        if keep is not None:
            self.prune(keep)
        result.seconds = time.monotonic() - t0
        return result

    def _new_manifest(
        self,
        ordered: tuple[Entry, ...],
        attempt: int,
        reason: str,
        result: SnapshotResult,
        step: int | None,
        verified: bool | None,
        unverified: tuple[tuple[str, str], ...],
    ) -> Manifest:
        """The next snapshot of this stream, a child of the parent."""
        parent = self.parent
        return Manifest(
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
            rank=self.stamp.rank,
            world_size=self.stamp.world_size,
            gc_seen=self.stamp.gc_seen,
            verified=verified,
            unverified=unverified,
        )

    def _read(
        self,
        to_read: list[LocalEntry],
        entries: dict[str, Entry],
        result: SnapshotResult,
        pinned: Pinned | None,
        strict: bool,
        checks: dict[str, str],
        expect: dict[str, Stat] | None,
        scan_ns: int,
    ) -> dict[str, Cached]:
        """Read the changed files into entries (one that changed while read,
        or cannot be read, keeps its parent's version); the stat cache of
        what was read."""
        parent = self.parent
        parent_entries = {e.path: e for e in parent.entries} if parent else {}
        new_cache: dict[str, Cached] = {}
        fds = pinned.fds if pinned is not None else None
        self.live = (result, len(to_read), sum(le.size for le in to_read), time.monotonic())
        with contextlib.closing(
            self._reader.read_files(to_read, result, fds, expect, result.appenders)
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
                        new_cache[le.path] = Cached(
                            le.size, le.mtime_ns, le.ino, outcome, check, entries[le.path]
                        )
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
        return new_cache

    def prune(self, keep: int) -> None:
        """Retention: keep the newest `keep` snapshots, delete what only older
        ones name. The first prune of a process sweeps the whole chunk store
        (orphans of a crashed upload); later ones only look at what they drop."""
        self.may_write()
        self.retention.prune(self.repo, keep, sweep=not self._swept)
        self._swept = True


def _from_cache(
    cache: dict[str, Cached], local: list[LocalEntry]
) -> tuple[dict[str, Entry], list[LocalEntry]]:
    """The entries known without reading (directories, links, files the
    stat cache vouches for) and the files to read."""
    entries: dict[str, Entry] = {}
    to_read: list[LocalEntry] = []
    for le in local:
        if le.type == "file":
            c = cache.get(le.path)
            if c and (c.size, c.mtime_ns, c.ino) == (le.size, le.mtime_ns, le.ino):
                e = c.entry
                if e is None or e.mode != le.mode:
                    e = Entry(
                        le.path,
                        "file",
                        le.mode,
                        le.size,
                        le.mtime_ns,
                        c.chunks,
                        ino=le.ino,
                        check=c.check,
                    )
                    cache[le.path] = c._replace(entry=e)
                entries[le.path] = e
            else:
                to_read.append(le)
        elif le.type == "dir":
            entries[le.path] = Entry(le.path, "dir", le.mode, mtime_ns=le.mtime_ns)
        else:
            entries[le.path] = Entry(le.path, "symlink", le.mode, target=le.target)
    return entries, to_read


def _verified(
    judge: Judge | None, judged: Judgement | None, pinned: Pinned | None
) -> tuple[bool | None, tuple[tuple[str, str], ...]]:
    """The manifest's verified and unverified (of what is in it)."""
    if judged is not None:
        listed = judged.unverified
        return judged.verified(), tuple((p, listed[p]) for p in sorted(listed))
    if pinned is not None and pinned.checks is not None and judge is not None:
        return (True if judge.checked else None), ()
    return None, ()


def _unchanged(
    parent: Manifest | None,
    ordered: tuple[Entry, ...],
    verified: bool | None,
    unverified: tuple[tuple[str, str], ...],
    step: int | None,
) -> bool:
    """Nothing to write: the entries are the parent's, and so is what a
    restore prefers (verified or not) and the commit's step."""
    if parent is None or len(ordered) != len(parent.entries):
        return False
    if not all(a is b or a.same_content(b) for a, b in zip(ordered, parent.entries, strict=True)):
        return False
    # The same files as an unverified snapshot are written again once they
    # are whole (what a restore prefers changed), or once other files are in
    # progress; the same as a verified one never are.
    if parent.verified is False and not (
        verified is False and {p for p, _ in parent.unverified} == {p for p, _ in unverified}
    ):
        return False
    # A commit with a new step is written even when nothing changed: the
    # step is what makes the rank's part of a global generation.
    return step is None or parent.step == step


def _drop_orphans(entries: dict[str, Entry]) -> None:
    """Remove entries whose parent directory is no longer in the snapshot."""
    for path in sorted(entries, key=lambda p: p.count("/")):
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if parent and (parent not in entries or entries[parent].type != "dir"):
            del entries[path]
