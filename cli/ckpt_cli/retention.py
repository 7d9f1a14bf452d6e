"""Retention and judging: which snapshots are restorable, which a restore
tries first, which retention keeps (pure rules over names and manifests),
and the single-node stream's garbage collection that acts on them.

Ordering: GC deletes old manifests first, then chunks no kept manifest
names. Retention counts restorable snapshots only (`retained`): a damaged
or suspect one never displaces a whole one, nor an unverified one a
verified one. Which snapshot a restore uses: `restore_tier` (verified or
older than checks first, then unverified, then suspect; newest first in
each).

"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Collection, Iterable, Sequence
from typing import TYPE_CHECKING

from ckpt_cli.backends import NotFound
from ckpt_cli.chunks import CHUNKS, chunk_key
from ckpt_cli.errors import RemoteError
from ckpt_cli.manifest import Manifest, ManifestError
from ckpt_cli.snapshots import SnapshotRef

if TYPE_CHECKING:
    from ckpt_cli.repository import Repository


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
    #: Bytes read back (`Audit`) of the snapshots kept in place of others.
    audited: int = 0
    #: Snapshots that did not read back whole: counted as damaged, marked suspect.
    damaged: list[SnapshotRef] = dataclasses.field(default_factory=list)

    @property
    def known_bytes(self) -> int:
        return sum(n for n in self.chunks.values() if n is not None)

    @property
    def unsized(self) -> int:
        return sum(1 for n in self.chunks.values() if n is None)


#: How retention counts a snapshot (`snapshot_kind`): a verified (or
#: older than checks) restorable one counts; an unverified one is restorable
#: but counts only as a last resort; an empty one (directories at most) is
#: restorable but never counts, so it never displaces one that holds files;
#: a damaged or suspect one is not restorable.
WHOLE, UNVERIFIED, EMPTY, NOT_RESTORABLE = "whole", "unverified", "empty", "not restorable"


def snapshot_kind(m: Manifest | ManifestError, restorable: bool, suspect: bool) -> str:
    """How retention counts one snapshot (see `retained`)."""
    if isinstance(m, ManifestError) or not restorable or suspect:
        return NOT_RESTORABLE
    if all(e.type == "dir" for e in m.entries):
        return EMPTY
    return UNVERIFIED if m.verified is False else WHOLE


def retained(
    snapshots: Sequence[tuple[SnapshotRef, bool | str]], keep: int
) -> tuple[list[SnapshotRef], list[SnapshotRef]]:
    """Retention's rule over one stream, newest first, each with how it
    counts (`snapshot_kind`; True is WHOLE, False NOT_RESTORABLE): (kept,
    dropped). A snapshot is kept while fewer than `keep` whole ones are newer
    than it: the `keep` newest whole ones, every damaged or suspect one newer
    than the oldest of those (kept for inspection, never counted), and of the
    unverified and of the empty ones among them the `keep` newest of each. So
    neither a damaged nor an unverified snapshot displaces a verified one (the
    one a restore picks), an empty one (a run started with --no-restore on
    an empty --dir, a push --allow-empty) never displaces one with files,
    neither kind piles up, and no snapshot is dropped that "the `keep`
    newest" would have kept."""
    kept: list[SnapshotRef] = []
    dropped: list[SnapshotRef] = []
    whole = 0
    capped = {UNVERIFIED: 0, EMPTY: 0}
    for ref, how in snapshots:
        kind = how if isinstance(how, str) else WHOLE if how else NOT_RESTORABLE
        keep_it = whole < keep and capped.get(kind, 0) < keep
        (kept if keep_it else dropped).append(ref)
        whole += kind == WHOLE
        if kind in capped:
            capped[kind] += 1
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


class Verdicts:
    """Whether each snapshot (by key) is restorable, as last judged."""

    def __init__(self) -> None:
        self._verdicts: dict[str, bool] = {}

    def forget(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._verdicts.pop(key, None)

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


def load_all(
    repo: Repository, refs: list[SnapshotRef]
) -> list[tuple[SnapshotRef, Manifest | ManifestError]]:
    """Each snapshot's manifest (read once per process), or its error."""
    out: list[tuple[SnapshotRef, Manifest | ManifestError]] = []
    for ref in refs:
        try:
            out.append((ref, repo.load_cached(ref)))
        except ManifestError as exc:
            out.append((ref, exc))
    return out


#: A chunk's name as it appears in a manifest's bytes (BLAKE3, hex).
_NAME_IN_BYTES = re.compile(rb"(?<![0-9a-f])[0-9a-f]{64}(?![0-9a-f])")


def named_by_damaged(repo: Repository, ref: SnapshotRef) -> set[str] | None:
    """The chunks a manifest this ckpt cannot load may name: every chunk name
    in its bytes (one of a newer format, or with one bad field, still lists
    its chunks; retention keeps it for inspection, and its chunks with it).
    None where its bytes cannot be read: then no chunk is known unnamed."""
    try:
        raw = repo.backend.read(ref.key)
    except NotFound:
        return set()
    except RemoteError:
        return None
    return {m.decode() for m in _NAME_IN_BYTES.findall(raw)}


class Audit:
    """Chunks read back and hashed, each once: what `ckpt gc` does to the
    snapshots it keeps in place of the ones it drops, before it counts them
    whole (a chunk in the store is not a chunk that restores: a local
    remote is not fsynced, and a crash can leave it empty)."""

    def __init__(self, repo: Repository, *, concurrency: int = 4) -> None:
        self.repo = repo
        self.concurrency = max(1, concurrency)
        self.verdicts: dict[str, bool] = {}
        self.bytes_read = 0
        #: The snapshots found not to read back whole, in order.
        self.damaged: list[SnapshotRef] = []

    def whole(self, ref: SnapshotRef, m: Manifest) -> bool:
        """Every chunk m (ref's manifest) names reads back whole (size and hash)."""
        import concurrent.futures as cf

        from ckpt_cli.chunks import ChunkError
        from ckpt_cli.repository import chunk_sizes

        todo = [(d, n) for d, n in chunk_sizes(m).items() if d not in self.verdicts]

        def check(item: tuple[str, int]) -> tuple[str, bool]:
            digest, size = item
            try:
                self.repo.chunks.get(digest, size)
            except ChunkError:
                return digest, False
            return digest, True

        with cf.ThreadPoolExecutor(self.concurrency, thread_name_prefix="ckpt-audit") as pool:
            for digest, ok in pool.map(check, todo):
                self.verdicts[digest] = ok
        self.bytes_read += sum(n for _d, n in todo)
        ok = all(self.verdicts[d] for d in m.chunk_digests())
        if not ok and ref not in self.damaged:
            self.damaged.append(ref)
        return ok

    def mark(self) -> None:
        """Mark what did not read back whole suspect, so that a restore tries
        it last and the ranks of a step agree without reading it (a mark
        that cannot be written is left to the next collection)."""
        for ref in self.damaged:
            with contextlib.suppress(RemoteError):
                self.repo.mark_suspect(
                    ref, "damaged: a chunk it names does not read back whole (found by ckpt gc)"
                )


def gc(repo: Repository, keep: int, *, sweep: bool = True, audit: Audit | None = None) -> GcReport:
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
    if repo.stream:
        raise ValueError("gc() prunes the single-node stream; ranks prune with world.prune")
    refs = repo.snapshots()
    listed = repo.chunks.listed() if sweep else None
    present = listed | repo.chunks.trash() if listed is not None else None
    loaded = load_all(repo, refs)
    whole = repo.judge(loaded, present)
    suspect = repo.marks.keys(cached=not sweep)
    kinds = [(r, snapshot_kind(m, whole[r.key], r.key in suspect)) for r, m in loaded]
    kept, dropped = retained(kinds, keep)
    while audit is not None and dropped:
        # What makes the others go must restore: read it back, or count it damaged.
        counted = {r.key for r, kind in kinds if kind == WHOLE} & {r.key for r in kept}
        bad = [
            r.key for r, m in loaded if r.key in counted and isinstance(m, Manifest)
            and not audit.whole(r, m)
        ]  # fmt: skip
        if not bad:
            break
        whole.update(dict.fromkeys(bad, False))
        kinds = [(r, snapshot_kind(m, whole[r.key], r.key in suspect)) for r, m in loaded]
        kept, dropped = retained(kinds, keep)
    if not dropped and not sweep:
        return GcReport([], 0, [r.key for r in kept])
    referenced, unknown = _rank_names(repo)
    candidates: set[str] = set()
    dropped_keys = {r.key for r in dropped}
    for ref, m in loaded:
        if isinstance(m, ManifestError):
            if ref.key not in dropped_keys:
                names = named_by_damaged(repo, ref)
                unknown |= names is None
                referenced |= names or set()
            continue
        if ref.key in dropped_keys:
            if listed is None:
                candidates |= m.chunk_digests()
        else:
            referenced |= m.chunk_digests()
    for ref in dropped:
        repo.backend.delete(ref.key)
    repo.forget_manifests(r.key for r in dropped)
    repo.marks.drop(dropped, suspect)
    if listed is not None:
        candidates = listed
        # Half-written chunks of a writer killed mid-upload (local disks and
        # SFTP write to a temp name first). Only the lease holder sweeps, on
        # its snapshot thread between snapshots: none of them is its own.
        for key in repo.backend.list(CHUNKS, temp=True):
            repo.backend.delete(key)
    if unknown:
        # A kept manifest that cannot be read: which chunks it names is not
        # known, so none is taken for unnamed (the next collection takes them).
        candidates = set()
    deleted = 0
    for digest in sorted(candidates - referenced):
        repo.backend.delete(chunk_key(digest))
        repo.chunks.forget(digest)
        deleted += 1
    return GcReport([r.key for r in dropped], deleted, [r.key for r in kept])


def rank_chunks(repo: Repository) -> set[str]:
    """Every chunk a rank stream's manifest names: the single-node stream's
    retention never deletes them (a repository a multi-node run wrote too)."""
    return _rank_names(repo)[0]


def _rank_names(repo: Repository) -> tuple[set[str], bool]:
    """rank_chunks, with damaged manifests' names (`named_by_damaged`), and
    whether some manifest could not be read at all (its names unknown)."""
    out: set[str] = set()
    unknown = False
    for refs in repo.rank_snapshots().values():
        for ref in refs:
            try:
                out |= repo.load_cached(ref).chunk_digests()
            except ManifestError:
                names = named_by_damaged(repo, ref)
                unknown |= names is None
                out |= names or set()
    return out, unknown
