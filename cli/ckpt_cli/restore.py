"""Materialise a snapshot into a temp dir beside the target, verify every chunk,
then swap it in atomically. The existing directory is never touched unless the
whole snapshot is in place.

A directory that cannot be swapped by a rename (a mount point, a read-only
parent) is restored in place: staged inside itself, then its entries are
moved, under a marker that the next start honours (a killed move is
finished, never left half done). What a restore replaces and no restorable
snapshot holds (files in no snapshot, excluded or newer ones) is moved aside
into a kept dir, never deleted; the restored --dir keeps its mode.

Candidates are tried newest first, verified ones (and those written before
ckpt checked files) before unverified ones, suspect ones last
(`repository.restore_tier`); those passed over are named with why. A
damaged one (bad manifest, missing or corrupt chunk, unsafe path) is
skipped with a warning naming it, and the previous one is used. A local
failure (disk full, permissions) stops the restore with the target
untouched. A --dir used as it is has its torn files put back first
(`repair`, imported when needed: it imports this module).

What the child starts from is decided by `start_plan` (a pure function of
--dir's scan, the snapshots and the options); `prepare_dir` and
`prepare_rank_dir` gather those values, print the plan's lines and carry
it out (`carry_out`): restore, repair, create, adopt the parent.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import dataclasses
import errno
import functools
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ckpt._fs import (
    MARKER,
    SPECIAL_BITS,
    cannot_swap,
    is_reserved,
    move_in,
    remove_tree,
    swap_in,
    write_all,
    write_marker,
)
from ckpt_cli import console, world
from ckpt_cli.errors import ConfigError, RemoteError, RestoreError
from ckpt_cli.kept import (
    RESTORE_PREFIX,
    keep,
    kept_name,
    recover_interrupted,
    remind_kept,
    restorable,
)
from ckpt_cli.manifest import Entry, Manifest, ManifestError
from ckpt_cli.reader import TINY
from ckpt_cli.repo_tools import DamagedError
from ckpt_cli.repository import (
    PREFERRED,
    Buffers,
    ChunkError,
    Repository,
    SnapshotRef,
    iter_manifests,
    newest_manifest,
    pick,
    restore_tier,
    unverified_note,
)
from ckpt_cli.snapshotter import MAX_OPEN_FILES, LocalEntry, Snapshotter, UnreadableError
from ckpt_cli.start_plan import Start, StartPlan, has_data, plan_rank_start, plan_start

if TYPE_CHECKING:
    from ckpt_cli.repair import Repaired


class PartDamaged(RestoreError):
    """A rank's part of a step (`ref`) cannot be restored: its manifest or
    one of its chunks is damaged, which no retry mends (`pass_over`)."""

    def __init__(self, reason: str, ref: SnapshotRef, target: Path) -> None:
        super().__init__(f"{reason}; {target} is untouched")
        self.reason = reason
        self.ref = ref


#: Damaged parts one start passes over before it gives up (each is marked,
#: so every pass chooses an older step; the bound only stops a runaway).
MAX_PASSED_OVER = 64


def pass_over(repo: Repository, exc: PartDamaged, rank: int, warn: Callable[[str], None]) -> None:
    """Mark a damaged part of a step suspect, so that this process and every
    rank that starts later go back to the step before it (world.choose skips
    a step with a suspect part), and say so. A mark that cannot be written
    still counts in this process."""
    ref = exc.ref
    why = f"damaged: {exc.reason} (found by rank {rank}'s restore)"
    try:
        repo.mark_suspect(ref, why, rank=rank)
        where = f"marked it suspect in {repo.display}"
    except RemoteError as err:
        where = f"could not mark it suspect in {repo.display} ({err}), this process passes it over"
    warn(
        f"{exc.reason}: {where}, so that every rank goes back to the step before it "
        f"(`ckpt unsuspect {repo.display} {ref.id}` clears the mark)"
    )


@dataclasses.dataclass
class Restored:
    manifest: Manifest
    seconds: float
    skipped: list[str]  # snapshots tried before it, with the reason


def _temp_name(target: Path, prefix: str) -> Path:
    return target.parent / f".{target.name}{prefix}{secrets.token_hex(4)}"


def _restore_one(
    repo: Repository,
    manifest: Manifest,
    target: Path,
    *,
    concurrency: int,
    progress: Callable[[int, int], None] | None,
    warn: Callable[[str], None],
) -> None:
    """Materialise manifest and put it in place of target: swapped in beside
    it, or, where target cannot be swapped, staged inside it and moved in.
    What target held goes to a kept dir, less what a restorable snapshot
    holds. Raises with target untouched."""
    why = cannot_swap(target) if target.exists() else None
    inside = why is not None
    staging = (
        target / f"{RESTORE_PREFIX}{secrets.token_hex(4)}"
        if inside
        else _temp_name(target, RESTORE_PREFIX)
    )
    try:
        materialise(repo, manifest, staging, concurrency=concurrency, progress=progress)
        if not inside:
            write_marker(staging, {"phase": "swap"})
            os.chmod(staging, _dir_mode(target))
    except BaseException:
        remove_tree(staging)
        raise
    durable = functools.partial(restorable, repo, manifest)
    if inside:
        holding = kept_name(target, inside=True)
        try:
            holding.mkdir(mode=0o700)
            move_in(staging, target, holding)
        except BaseException:
            remove_tree(staging)
            with contextlib.suppress(OSError):
                holding.rmdir()
            raise
        console.info(f"{target} {why}: restored in place (staged inside it, then moved in)")
        keep(holding, target, durable, warn)
        return
    try:
        old = swap_in(staging, target)
    except BaseException:
        remove_tree(staging)
        raise
    kept = None
    if old is not None:
        kept = kept_name(target, inside=False)
        try:
            os.rename(old, kept)
        except OSError:
            kept = old  # still ours, still kept: recovery names it at the next start
    with contextlib.suppress(OSError):  # left in a dir its owner made read-only: harmless
        os.unlink(target / MARKER)
    if kept is not None:
        keep(kept, target, durable, warn)


def _dir_mode(target: Path) -> int:
    """The mode a restored --dir gets: the existing one's, else 0700."""
    try:
        return stat.S_IMODE(target.stat().st_mode) & ~SPECIAL_BITS
    except FileNotFoundError:
        return 0o700


def restore(
    repo: Repository,
    target: Path,
    *,
    snapshot: str | None = None,
    warn: Callable[[str], None],
    concurrency: int = 4,
    progress: Callable[[int, int], None] | None = None,
    ref: SnapshotRef | None = None,
) -> Restored | None:
    """Restore the newest usable snapshot (or exactly `snapshot`) into target.

    Usable, in order (`repository.restore_tier`): a verified snapshot (or one
    written before ckpt checked), newest first; else an unverified one,
    with a warning naming its files; else a suspect one. The ones passed
    over are named (warn) with why. None when the remote has no snapshot.
    RestoreError when snapshots exist but none can be restored, or the local
    disk fails; target is untouched then.
    """
    t0 = time.monotonic()
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{target} is not a directory (--dir)")
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted(target)
    exact = ref is not None or snapshot is not None
    if ref is not None:  # exactly this one (a rank's part of a global generation)
        candidates = [ref]
    elif snapshot is not None:
        found = repo.find(snapshot)
        if found is None:
            # Bad input, not an outage: no retry finds it (exit 78, like show).
            raise ConfigError(
                f"no snapshot {snapshot!r} in {repo.display} (--snapshot: an id, a unique id "
                f"prefix of 4 or more characters, or a generation number; see "
                f"`ckpt ls {repo.display}`)"
            )
        candidates = [found]
    else:
        candidates = repo.snapshots()
    if not candidates:
        return None
    suspect = repo.suspect_keys()
    skipped: list[str] = []
    passed: list[tuple[int, SnapshotRef, Manifest]] = []  # not preferred: tried last
    for cand, loaded in _preferred_first(repo, candidates, suspect, exact, passed):
        manifest = loaded if isinstance(loaded, Manifest) else None
        try:
            if not isinstance(loaded, Manifest):
                raise loaded
            _check_reserved(loaded)
            _restore_one(
                repo, loaded, target, concurrency=concurrency, progress=progress, warn=warn
            )
        except (ManifestError, ChunkError) as exc:
            if isinstance(exc, ChunkError) and manifest is not None:
                # Only the first bad chunk is known: distrust every chunk of this
                # snapshot so the next upload of that content replaces them.
                for digest in manifest.chunk_digests():
                    repo.forget_chunk(digest)
            reason = f"snapshot {_name(cand)} {exc}"
            skipped.append(reason)
            if ref is not None:  # a rank's part of a step: no other will do
                if isinstance(exc, ChunkError) and not _still_corrupt(repo, manifest, exc):
                    # Whole on a second read: the transfer, not the store.
                    raise RestoreError(
                        f"{reason} once, whole when read again; {target} is untouched"
                    ) from None
                raise PartDamaged(reason, cand, target) from None
            if snapshot is not None:  # asked for by name: damaged, no retry mends it
                raise DamagedError(f"{reason}; {target} is untouched") from None
            if (
                isinstance(exc, ChunkError)
                and cand.key not in suspect
                and _still_corrupt(repo, manifest, exc)
            ):
                # Marked, so that retention never counts it (it would drop the
                # snapshot restored in its place) and the next restore does not
                # read it first; a mark that cannot be written counts here.
                try:
                    repo.mark_suspect(cand, f"damaged: {exc} (found by a restore)")
                    marked = (
                        f"marked it suspect in {repo.display} (`ckpt unsuspect "
                        f"{repo.display} {cand.id}` clears the mark)"
                    )
                except RemoteError as err:
                    marked = f"could not mark it suspect in {repo.display} ({err})"
                warn(f"{reason}: {marked}; trying the previous one")
                continue
            warn(f"{reason}; trying the previous one")
            continue
        except OSError as exc:
            message = (
                f"restoring snapshot {_name(cand)} into {target} failed: "
                f"{exc.strerror or exc} ({exc.filename or target}); {target} is untouched"
            )
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                # Not a passing failure: a --dir ckpt cannot write (fix the command line).
                raise ConfigError(f"{message} (--dir)") from None
            raise RestoreError(message) from None
        for digest in loaded.chunk_digests():
            repo.trust_chunk(digest)  # just verified byte for byte
        _say_passed(repo, cand, loaded, passed, suspect, exact, skipped, warn)
        return Restored(loaded, time.monotonic() - t0, skipped)
    raise RestoreError(
        f"none of the {len(candidates)} snapshots in {repo.display} could be restored "
        f"(newest problem: {skipped[0]}); {target} is untouched"
    )


def _preferred_first(
    repo: Repository,
    candidates: list[SnapshotRef],
    suspect: set[str],
    exact: bool,
    passed: list[tuple[int, SnapshotRef, Manifest]],
) -> Iterator[tuple[SnapshotRef, Manifest | ManifestError]]:
    """The candidates to try, loaded (or the error that makes one damaged),
    in restore order (`restore_tier`): the preferred ones as they come
    (newest first), then those passed over (collected in `passed`), best
    tier first. An exact candidate (asked for) is tried whatever its tier."""
    for cand in candidates:
        try:
            manifest = repo.load(cand)
        except ManifestError as exc:
            yield cand, exc
            continue
        tier = restore_tier(manifest, cand.key in suspect)
        if exact or tier == PREFERRED:
            yield cand, manifest
        else:
            passed.append((tier, cand, manifest))
    for _tier, cand, manifest in sorted(passed, key=lambda t: t[0]):  # stable: newest first
        yield cand, manifest


def _say_passed(
    repo: Repository,
    restored: SnapshotRef,
    manifest: Manifest,
    passed: list[tuple[int, SnapshotRef, Manifest]],
    suspect: set[str],
    exact: bool,
    skipped: list[str],
    warn: Callable[[str], None],
) -> None:
    """Name the newer snapshots a restore passed over (not tried: of a worse
    tier than the one restored), and why; warn when what it restored is
    itself unverified or suspect."""
    tier = restore_tier(manifest, restored.key in suspect)
    for other, cand, m in passed:
        if other > tier and cand.generation > restored.generation:
            reason = f"snapshot {_name(cand)} skipped: {_why_not(repo, cand, m, suspect)}"
            skipped.append(reason)
            warn(reason)
    if tier == PREFERRED:
        return
    how = "as asked" if exact else "as no verified one could be restored"
    warn(
        f"restoring snapshot {_name(restored)} {how}, although it is "
        f"{_why_not(repo, restored, manifest, suspect)}"
    )


def _why_not(repo: Repository, ref: SnapshotRef, m: Manifest, suspect: set[str]) -> str:
    """Why a restore does not prefer a snapshot, in a phrase."""
    if ref.key in suspect:
        mark = repo.read_suspect(ref.key)
        why = mark.why if mark is not None else "marked suspect"
        return f"marked suspect ({why}; `ckpt unsuspect {repo.display} {ref.id}` clears the mark)"
    return (
        f"unverified: taken while files were in progress, which may be torn: {unverified_note(m)}"
    )


def _still_corrupt(repo: Repository, manifest: Manifest | None, exc: ChunkError) -> bool:
    """Whether a chunk a restore found corrupt is so when read once more
    (missing or of another size: it is, no second read needed). A second
    read that cannot be made says nothing: False (the remote is failing)."""
    if not exc.corrupt or manifest is None:
        return True
    length = _chunk_length(manifest, exc.digest)
    if length is None:
        return True
    try:
        repo.chunks.get(exc.digest, length)
    except ChunkError:
        return True
    except RemoteError:
        return False
    return False


def _chunk_length(manifest: Manifest, digest: str) -> int | None:
    """The length a chunk has where a manifest names it (None: it does not)."""
    chunk = manifest.chunk_size
    for e in manifest.files:
        for i, d in enumerate(e.chunks):
            if d == digest:
                return min(chunk, e.size - i * chunk)
    return None


def _name(ref: SnapshotRef) -> str:
    return f"{ref.id} (generation {ref.generation})"


def _check_reserved(manifest: Manifest) -> None:
    """Top-level names ckpt reserves inside --dir: no snapshot takes them, so
    a manifest that has one is crafted (escaping symlinks are refused when the
    manifest is parsed)."""
    for e in manifest.entries:
        if is_reserved(e.path.split("/", 1)[0]):
            raise ManifestError(f"has a path {e.path!r} in the names ckpt reserves (.ckpt-*)")


def materialise(
    repo: Repository,
    manifest: Manifest,
    dest: Path,
    *,
    concurrency: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Write every entry of manifest under dest (a fresh directory), verifying
    each chunk's hash. Files are created exclusively and never through links.
    progress(bytes written, total) is called as chunks land, from any thread.
    A path the filesystem cannot hold under dest (ENAMETOOLONG) makes the
    snapshot unusable here: ManifestError, like any other it cannot restore."""
    dest.mkdir(mode=0o700)
    try:
        _materialise(repo, manifest, dest, concurrency, progress)
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
        raise ManifestError(
            f"has a path too long to restore under {dest.parent} ({exc.filename})"
        ) from None


def _materialise(
    repo: Repository,
    manifest: Manifest,
    dest: Path,
    concurrency: int,
    progress: Callable[[int, int], None] | None,
) -> None:
    makedirs = _Dirs(dest).make
    dirs = [e for e in manifest.entries if e.type == "dir"]
    for e in dirs:
        makedirs(e.path)
    slots = threading.BoundedSemaphore(max(1, concurrency) + 2)
    chunk = manifest.chunk_size

    total, written, lock = manifest.total_size, [0], threading.Lock()

    # Buffers no larger than the largest file: small files, small buffers.
    buffers = Buffers(min(chunk, max((e.size for e in manifest.files), default=0)))

    def advance(length: int) -> None:
        if progress is not None:
            with lock:
                written[0] += length
                done = written[0]
            progress(done, total)

    def fetch(fd: int, writing: threading.Lock, digest: str, offset: int, length: int) -> None:
        try:
            with buffers.view(length) as view:
                repo.read_chunk_into(digest, view)
                # One writer per file at a time: concurrent writes to one file
                # queue on its inode lock in the kernel, spinning (17% of a
                # restore's CPU, bench/ case 2); here they sleep, and the
                # reading and hashing of other chunks goes on meanwhile.
                with writing:
                    write_all(fd, view, offset)
        finally:
            slots.release()
        advance(length)

    # Chunks of consecutive files are in flight together (no drain at each
    # file's end); a file is finished (mode, close, mtime) once all its chunks
    # are written, and at most MAX_OPEN_FILES descriptors are open at once.
    pending: collections.deque[tuple[Entry, int, list[cf.Future[None]]]] = collections.deque()

    def finish(e: Entry, fd: int, futures: list[cf.Future[None]]) -> None:
        try:
            for f in futures:
                f.result()
            os.fchmod(fd, restored_mode(e.mode))
        finally:
            cf.wait(futures)
            os.close(fd)
        os.utime(dest / e.path, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)

    # Files of TINY bytes or less from a local repository are written here,
    # on this thread, one after the other (reader.TINY: handing the GIL to
    # a pool thread at each of their few system calls costs more than the
    # pool overlaps). From a remote they go to the pool: round trips overlap.
    tiny_buf = memoryview(bytearray(TINY)) if repo.local_io else None

    def write_tiny(e: Entry, fd: int, buf: memoryview) -> None:
        if e.chunks:
            try:
                view = buf[: e.size]
                repo.read_chunk_into(e.chunks[0], view)
                write_all(fd, view, 0)
            except BaseException:
                os.close(fd)
                raise
            advance(e.size)
        finish(e, fd, [])

    with cf.ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="ckpt-restore") as pool:
        try:
            files = manifest.files
            width = max(1, concurrency)
            for start in range(0, len(files), width):
                # A group of files at once, their chunks interleaved: each file
                # has one writer at a time, so writes to several files are
                # what runs in parallel.
                group = []
                for e in files[start : start + width]:
                    makedirs(e.path.rpartition("/")[0])
                    fd = os.open(dest / e.path, _CREATE, 0o600)
                    if tiny_buf is not None and e.size <= TINY and len(e.chunks) <= 1:
                        write_tiny(e, fd, tiny_buf)
                        continue
                    futures: list[cf.Future[None]] = []
                    pending.append((e, fd, futures))
                    group.append((e, fd, futures, threading.Lock()))
                for i in range(max((len(e.chunks) for e, *_ in group), default=0)):
                    for e, fd, futures, writing in group:
                        if i >= len(e.chunks):
                            continue
                        offset = i * chunk
                        slots.acquire()
                        futures.append(
                            pool.submit(
                                fetch, fd, writing, e.chunks[i], offset, min(chunk, e.size - offset)
                            )
                        )
                while pending and (
                    len(pending) > MAX_OPEN_FILES or all(f.done() for f in pending[0][2])
                ):
                    finish(*pending.popleft())
            while pending:
                finish(*pending.popleft())
        finally:
            _abandon(pending)  # an error: let the in-flight chunks land
    _links_and_dirs(manifest, dest, makedirs, dirs)


def _abandon(pending: Iterable[tuple[Entry, int, list[cf.Future[None]]]]) -> None:
    """Files left unfinished by an error: wait for their chunks, close them."""
    for _e, fd, futures in pending:
        cf.wait(futures)
        with contextlib.suppress(OSError):
            os.close(fd)


#: How a restored file is created: new, never through a link.
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class _Dirs:
    """The directories made under dest so far."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.made = {""}

    def make(self, rel: str) -> None:
        """mkdir -p dest/rel without recursion (Path.mkdir(parents=True)
        recurses once per missing level; a manifest may be 1,000 deep)."""
        missing = []
        while rel not in self.made:
            missing.append(rel)
            rel = rel.rpartition("/")[0]
        for d in reversed(missing):
            with contextlib.suppress(FileExistsError):
                os.mkdir(self.dest / d)
            self.made.add(d)


def _links_and_dirs(
    manifest: Manifest, dest: Path, makedirs: Callable[[str], None], dirs: list[Entry]
) -> None:
    """After the files: the symlinks, then each directory's mode and mtime,
    deepest first (its own entries no longer change it)."""
    for e in manifest.entries:
        if e.type == "symlink":
            makedirs(e.path.rpartition("/")[0])
            os.symlink(e.target, dest / e.path)
    for e in sorted(dirs, key=lambda d: d.path.count("/"), reverse=True):
        os.chmod(dest / e.path, restored_mode(e.mode) | 0o700)
        os.utime(dest / e.path, ns=(e.mtime_ns, e.mtime_ns))


def restored_mode(recorded: int) -> int:
    """The permission bits a restored file or directory gets: the recorded
    ones without setuid, setgid, sticky and world-write (a manifest is data,
    not a licence to make a program run as its owner or a file anyone may
    change)."""
    return recorded & 0o777 & ~stat.S_IWOTH


def _scan_at_start(snapshotter: Snapshotter) -> list[LocalEntry]:
    """--dir's scan for the start's decision; a part of --dir ckpt cannot
    read is one line naming it (78), not a crash: without it ckpt cannot
    tell what it would replace, so nothing is restored or replaced."""
    try:
        return snapshotter.scan_root()
    except UnreadableError as exc:
        raise ConfigError(
            f"cannot read {exc.path} in --dir {snapshotter.root} ({exc.reason}): nothing "
            "restored or replaced; make it readable by ckpt, or move it out of --dir"
        ) from None


def prepare_dir(
    repo: Repository,
    snapshotter: Snapshotter,
    *,
    restore_enabled: bool = True,
    snapshot: str | None = None,
    concurrency: int = 4,
    on_repair: Callable[[Repaired], None] | None = None,
) -> str:
    """Decide what the child starts from (`start_plan.plan_start`, the
    rule), say why, and carry it out; return the id --dir holds ('' if none).
    Reads only what the rule needs: --dir's scan and the snapshots when
    --dir has data, whether there is one when it has none."""
    directory = snapshotter.root
    recover_interrupted(directory)
    remind_kept(directory)
    local: list[LocalEntry] = []
    loaded: list[tuple[SnapshotRef, Manifest | ManifestError]] = []
    suspect: set[str] = set()
    any_snapshot = None
    if restore_enabled and snapshot is None:
        local = _scan_at_start(snapshotter) if directory.exists() else []
        if has_data(local):
            loaded = list(iter_manifests(repo))
            suspect = repo.suspect_keys()
        else:
            any_snapshot = bool(repo.snapshots())
    plan = plan_start(
        directory,
        local,
        loaded,
        suspect=suspect,
        stream=repo.stream,
        display=repo.display,
        restore_enabled=restore_enabled,
        snapshot=snapshot,
        any_snapshot=any_snapshot,
    )
    say(plan)
    held, _step = carry_out(plan, repo, snapshotter, concurrency=concurrency, on_repair=on_repair)
    return held


def say(plan: StartPlan) -> None:
    """Print a plan's notes, in order."""
    for note in plan.notes:
        (console.warn if note.warn else console.info)(note.text)


def carry_out(
    plan: StartPlan,
    repo: Repository,
    snapshotter: Snapshotter,
    *,
    concurrency: int = 4,
    on_repair: Callable[[Repaired], None] | None = None,
    newest: Callable[[Repository], Manifest | None] = newest_manifest,
) -> tuple[str, int | None]:
    """Act on a plan (its notes already said): restore, repair, create --dir,
    make the snapshotter's parent what --dir descends from (`newest`: the
    stream's newest snapshot, for a plan that adopts it). Returns (the
    snapshot id --dir holds, '' if none; its step, for a rank's restore)."""
    directory = snapshotter.root
    if plan.start is Start.RESTORE and plan.ref is not None:
        done = restore(repo, directory, warn=console.warn, concurrency=concurrency, ref=plan.ref)
        assert done is not None
        m = done.manifest
        console.info(
            f"restored snapshot {m.id} (step {m.step}, {console.plural(len(m.files), 'file')}, "
            f"{console.fmt_bytes(m.total_size)}) into {directory} in {done.seconds:.1f}s"
        )
        snapshotter.adopt(m, trust_local=True)
        return m.id, m.step
    if plan.start is Start.RESTORE:
        return restore_into(repo, snapshotter, plan.snapshot, concurrency), None
    if plan.start in (Start.USE, Start.KEEP):
        if plan.repair:
            _repair(repo, snapshotter, plan.parent, on_repair)
        snapshotter.adopt(plan.parent, trust_local=plan.start is Start.USE)
        if plan.start is Start.USE and plan.parent is not None:
            return plan.parent.id, plan.parent.step
        return "", None
    if plan.create:
        ensure_dir(directory)
    if plan.adopt_newest:
        snapshotter.adopt(newest(repo), trust_local=False)
    return "", None


def rollback_target(repo: Repository, base: SnapshotRef, marking: set[str]) -> Manifest | None:
    """The snapshot a crash-loop rollback from `base` restores: the one a
    restore picks among this stream's snapshots older than base, none of
    them suspect (counting `marking`, the keys about to be marked); None if
    there is none."""
    suspect = repo.suspect_keys() | marking
    older = ((ref, m) for ref, m in iter_manifests(repo) if ref.generation < base.generation)
    found = pick(older, suspect)
    if found is None or found[0].key in suspect:
        return None
    return found[1]


def _repair(
    repo: Repository,
    snapshotter: Snapshotter,
    parent: Manifest | None,
    on_repair: Callable[[Repaired], None] | None,
) -> None:
    """Put back the torn files of a --dir that is used as it is."""
    from ckpt_cli.formats import DEFAULT
    from ckpt_cli.repair import repair_dir

    done = repair_dir(
        repo,
        snapshotter.root,
        snapshotter.patterns,
        parent=parent,
        registry=snapshotter.checks or DEFAULT,  # the run's: its --check commands too
    )
    if not done.empty and on_repair is not None:
        on_repair(done)


def _with_step(snapshotter: Snapshotter, held: str) -> tuple[str, int | None]:
    """prepare_dir's answer with the step of what --dir holds (its parent)."""
    parent = snapshotter.parent
    return held, parent.step if parent is not None and held else None


def prepare_rank_dir(
    repo: Repository,
    snapshotter: Snapshotter,
    *,
    rank: int,
    world_size: int,
    allow_change: bool,
    restore_enabled: bool = True,
    snapshot: str | None = None,
    concurrency: int = 4,
    on_repair: Callable[[Repaired], None] | None = None,
) -> tuple[str, int | None]:
    """What the child starts from, on one node or as a rank of several:
    (the snapshot id --dir holds, its step). A single node in a repository
    no rank wrote is prepare_dir exactly.

    With step-tagged commits, --dir is made to hold exactly this rank's files
    of the newest step every rank committed (a consistent cut: a --dir that
    got further is replaced, the other ranks restore that step too). Without
    them, each rank is a single node of its own (prepare_dir), and the console
    says that this is not a consistent cut (`start_plan.plan_rank_start`). A
    world of another size is refused unless allow_change (world.choose)."""
    directory = snapshotter.root
    single = world_size == 1 and not repo.rank_snapshots()
    if single or not restore_enabled or snapshot is not None:
        held = prepare_dir(
            repo,
            snapshotter,
            restore_enabled=restore_enabled,
            snapshot=snapshot,
            concurrency=concurrency,
            on_repair=on_repair,
        )
        return _with_step(snapshotter, held)
    recover_interrupted(directory)
    remind_kept(directory)
    for _ in range(MAX_PASSED_OVER):
        choice = world.choose(repo, rank, world_size, allow_change=allow_change)
        wanted = choice is not None and choice.manifest is not None
        local = _scan_at_start(snapshotter) if wanted and directory.is_dir() else []
        plan = plan_rank_start(directory, choice, local, rank=rank, stream=repo.stream)
        say(plan)
        if plan.start is Start.SINGLE:
            held = prepare_dir(repo, snapshotter, concurrency=concurrency, on_repair=on_repair)
            return _with_step(snapshotter, held)
        try:
            return carry_out(
                plan,
                repo,
                snapshotter,
                concurrency=concurrency,
                on_repair=on_repair,
                newest=_stream_newest,
            )
        except PartDamaged as exc:
            pass_over(repo, exc, rank, console.warn)
    raise RestoreError(
        f"rank {rank}: {MAX_PASSED_OVER} damaged snapshots passed over, none restored; "
        f"{directory} is untouched (`ckpt verify {repo.display}` lists what is wrong)"
    )


def _stream_newest(repo: Repository) -> Manifest | None:
    """The newest snapshot of this rank's stream, as the world reads it."""
    return world.World(repo).newest(repo.stream)


def ensure_dir(directory: Path) -> None:
    """Create --dir where no restore does (0700: private until its owner
    says otherwise); one clear line if it cannot be."""
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        directory.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create --dir {directory}: {exc.strerror or exc} ({exc.filename or directory})"
        ) from None


def restore_into(
    repo: Repository, snapshotter: Snapshotter, wanted: str | None, concurrency: int
) -> str:
    """Restore (the newest usable, or `wanted`) into the snapshotter's directory,
    say so, and make it the snapshotter's parent; the id restored, '' if none."""
    directory = snapshotter.root
    done = restore(repo, directory, snapshot=wanted, warn=console.warn, concurrency=concurrency)
    if done is None:
        console.info(f"remote has no snapshot yet: starting fresh in {directory}")
        return ""
    m = done.manifest
    console.info(
        f"restored snapshot {m.id} (generation {m.generation}, "
        f"{console.plural(len(m.files), 'file')}, "
        f"{console.fmt_bytes(m.total_size)}) into {directory} in {done.seconds:.1f}s"
    )
    snapshotter.adopt(m, trust_local=True)
    return m.id
