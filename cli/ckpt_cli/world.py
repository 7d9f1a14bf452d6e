"""Several ranks in one repository: global generations, what each rank
restores, retention across ranks, and garbage collection that cannot race
another rank's upload. No coordinator: the repository is the only shared state.

- Every rank writes its own stream (ranks/<r>/snapshots/) and shares chunks/.
- A commit tagged with a training step belongs to global generation `step`.
  Step S written by a world of W ranks is *complete* when each of the ranks
  0..W-1 has a manifest with that step and world size, each loads, and every
  chunk they name is in the store. Each rank restores its own manifest of the
  newest complete step: the same cut on every rank.
- Only rank 0 prunes: the `keep` newest complete steps, a step counting only
  when every rank's part of it is restorable (a damaged step never displaces
  a whole one). Chunks that no kept manifest names are not deleted at
  once: a GC round (gc/<seq>-<id>.json) lists them and moves them to trash/.
  Every rank reads new rounds before each snapshot, forgets their chunks (so
  it uploads them again rather than naming a trashed one) and records the
  newest round it saw in its manifest (`gc_seen`). A later prune deletes a
  round's trash only once every rank with a live lease has written a manifest
  that saw the round, and first puts back any chunk some manifest names (one
  written by a rank that had not seen the round yet). A restore reads a chunk
  from trash/ while it waits there. This is the two-step "fossil" collection
  of duplicacy, with the lease standing in for "this rank is still writing".
- `ckpt gc` (`collect`) prunes every stream of a stopped job through a
  `Recorder`, so its dry run is the same code and says what the run does.
Nothing here prints: what a prune did is returned (`PruneReport`,
`describe`), and callers say it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping

from ckpt_cli.backends import NotFound
from ckpt_cli.errors import ConfigError
from ckpt_cli.lease import Lease, live_leases
from ckpt_cli.manifest import HASH_RE, SNAPSHOTS, Manifest, ManifestError
from ckpt_cli.repository import (
    CHUNKS,
    RANKS,
    GcPlan,
    Recorder,
    Repository,
    SnapshotRef,
    chunk_key,
    chunk_sizes,
    rank_stream,
    retained,
    snapshot_kind,
    snapshot_ref,
    stream_rank,
    trash_key,
)
from ckpt_cli.retention import WHOLE, Audit, named_by_damaged

GC = "gc/"
_ROUND_RE = re.compile(r"^gc/(\d{10})-([0-9a-f]{8})\.json$")
_LEASE_RE = re.compile(r"^ranks/(\d+)/lease\.json$")
#: The flag that lets a run restore what a world of another size wrote.
ALLOW_FLAG = "--allow-world-change"


@dataclasses.dataclass(frozen=True)
class Member:
    """One rank's manifest in a world."""

    rank: int
    ref: SnapshotRef
    manifest: Manifest


@dataclasses.dataclass(frozen=True)
class Generation:
    """A step committed by every rank of a world of `world_size`."""

    step: int
    world_size: int
    members: dict[int, Member]

    @property
    def created(self) -> float:
        return max(m.manifest.created for m in self.members.values())


class World:
    """Every stream of a repository with its manifests, loaded once: the
    rank streams under ranks/ and the single-node stream (rank 0 of 1)."""

    def __init__(self, repo: Repository, *, cached: bool = False) -> None:
        self.repo = repo
        self.streams: dict[str, list[tuple[SnapshotRef, Manifest | ManifestError]]] = {}
        #: Snapshot keys the crash-loop guard marked suspect: never restored
        #: as part of a step, never counted by retention (cached: the last
        #: listing, for retention on the snapshot thread).
        self.suspect = repo.suspect_keys(cached=cached)
        listing: dict[str, list[SnapshotRef]] = {"": repo.snapshots("")}
        for rank, refs in repo.rank_snapshots().items():
            listing[rank_stream(rank, 2)] = refs
        # Manifests are written once and never changed: rank 0 prunes after
        # every snapshot, and reads each manifest of every rank only once.
        listed = {ref.key for refs in listing.values() for ref in refs}
        repo.forget_manifests([key for key in repo.loaded if key not in listed])
        for stream, refs in listing.items():
            loaded: list[tuple[SnapshotRef, Manifest | ManifestError]] = []
            for ref in refs:
                try:
                    m = repo.load_cached(ref)
                    if (m.rank, m.world_size > 1) != (stream_rank(stream), bool(stream)):
                        raise ManifestError(
                            f"says rank {m.rank} of {m.world_size} but is in {stream or 'the root'}"
                        )
                    loaded.append((ref, m))
                except ManifestError as exc:
                    loaded.append((ref, exc))
            if loaded:
                self.streams[stream] = loaded

    def manifests(self, stream: str | None = None) -> Iterator[tuple[SnapshotRef, Manifest]]:
        for s, loaded in self.streams.items():
            if stream is None or s == stream:
                for ref, m in loaded:
                    if isinstance(m, Manifest):
                        yield ref, m

    def newest(self, stream: str, *, usable: bool = False) -> Manifest | None:
        """The newest manifest of a stream (usable: that is not suspect)."""
        return next(
            (m for r, m in self.manifests(stream) if not (usable and r.key in self.suspect)),
            None,
        )

    def newest_overall(self) -> Manifest | None:
        return max((m for _r, m in self.manifests()), key=lambda m: m.created, default=None)

    def loaded(self) -> Iterator[tuple[SnapshotRef, Manifest | ManifestError]]:
        """Every snapshot of every stream, loaded, or the error that makes it damaged."""
        for loaded in self.streams.values():
            yield from loaded

    def generations(
        self, present: set[str] | None = None, *, whole: Mapping[str, bool] | None = None
    ) -> list[Generation]:
        """Complete steps, newest (highest step) first. With `present` (the
        chunks in the store), a step whose chunks are not all there is not
        complete; with `whole` (Repository.judge), one whose part of some
        rank is not restorable. A step with a part marked suspect is not
        complete: every rank goes back to the step before it."""
        groups: dict[tuple[int, int], dict[int, Member]] = {}
        for loaded in self.streams.values():
            for ref, m in loaded:
                if not isinstance(m, Manifest) or m.step is None:
                    continue
                members = groups.setdefault((m.step, m.world_size), {})
                if m.rank not in members:  # newest first: the newest of the step wins
                    members[m.rank] = Member(m.rank, ref, m)
        out = []
        for (step, w), members in groups.items():
            # Ranks 0..w-1 each once (no set of range(w): w comes from a manifest).
            if len(members) != w or max(members) >= w:
                continue
            if present is not None and any(
                not mem.manifest.chunk_digests() <= present for mem in members.values()
            ):
                continue
            if whole is not None and not all(whole[mem.ref.key] for mem in members.values()):
                continue
            if any(mem.ref.key in self.suspect for mem in members.values()):
                continue
            out.append(Generation(step, w, members))
        out.sort(key=lambda g: (g.step, g.created), reverse=True)
        return out


# ------------------------------------------------------------------ restore


@dataclasses.dataclass(frozen=True)
class Choice:
    """What rank `rank` restores: a manifest (or None: start empty), the step
    it belongs to (None: not a global generation), and whether every rank
    restores the same cut."""

    manifest: Manifest | None
    ref: SnapshotRef | None
    step: int | None
    consistent: bool
    note: str


def choose(
    repo: Repository, rank: int, world_size: int, *, allow_change: bool = False
) -> Choice | None:
    """What this rank restores; None when the repository has no snapshot at
    all. ConfigError when the newest state was written by a world of another
    size and allow_change is False."""
    world = World(repo)
    if not world.streams:
        return None
    gens = world.generations(repo.present_chunks())
    if gens:
        g = gens[0]
        if g.world_size != world_size and not allow_change:
            raise _world_changed(g.world_size, world_size, f"step {g.step}")
        member = g.members.get(rank)
        if member is None:
            return Choice(
                None,
                None,
                g.step,
                True,
                f"step {g.step} was written by {_ranks(g.world_size)}: rank {rank} starts empty",
            )
        return Choice(
            member.manifest,
            member.ref,
            g.step,
            True,
            f"step {g.step}, complete on all {_ranks(g.world_size)}",
        )
    newest = world.newest_overall()
    if newest is not None and newest.world_size != world_size:
        if not allow_change:
            raise _world_changed(newest.world_size, world_size, "its newest snapshot")
        old = newest.world_size
        if rank >= old:
            return Choice(
                None,
                None,
                None,
                False,
                f"the newest snapshot was written by {_ranks(old)}: rank {rank} starts empty",
            )
        # Old rank r's newest snapshot of that world (its stream may also
        # hold older snapshots of other worlds; they are not what it had last).
        stream = rank_stream(rank, old)
        found = next(
            (
                (r, m)
                for r, m in world.manifests(stream)
                if m.world_size == old and r.key not in world.suspect
            ),
            (None, None),
        )
        ref, own = found
    else:
        own = world.newest(rank_stream(rank, world_size), usable=True)
        ref = next((r for r, m in world.manifests(rank_stream(rank, world_size)) if m is own), None)
    if own is None:
        return Choice(None, None, None, world_size == 1, f"rank {rank} has no snapshot yet")
    if world_size == 1:  # one node: its own newest is all there is to agree on
        return Choice(own, ref, own.step, True, "the newest snapshot")
    return Choice(
        own,
        ref,
        own.step,
        False,
        f"no step is committed by every rank (commit with a step: ckpt.commit(step=N)): "
        f"rank {rank} restores its own newest snapshot, which is not a consistent cut "
        "across ranks",
    )


def _ranks(n: int) -> str:
    return "1 rank (one node)" if n == 1 else f"{n} ranks"


def _world_changed(old: int, new: int, what: str) -> ConfigError:
    return ConfigError(
        f"the remote's {what} was written by a world of {_ranks(old)}, this run is a world "
        f"of {_ranks(new)} (--world-size); pass {ALLOW_FLAG} to restore rank r's files of "
        f"it on rank r (ranks beyond the old world start empty)"
    )


# ------------------------------------------------------------------ GC rounds


@dataclasses.dataclass(frozen=True)
class Round:
    seq: int
    key: str
    created: float
    chunks: tuple[str, ...]
    #: Finished: its record stays (without chunks) as the high-water mark of
    #: round numbers, which must never be used twice: a rank whose gc_seen is
    #: N would take a new round N for one it has seen, and keep naming its
    #: chunks from its cache while they are deleted.
    done: bool = False


def _round_keys(repo: Repository) -> list[tuple[int, str]]:
    return sorted(
        (int(m.group(1)), key) for key in repo.backend.list(GC) if (m := _ROUND_RE.match(key))
    )


def rounds(repo: Repository, after: int = 0) -> list[Round]:
    """The GC round records with seq > after, oldest first, finished ones
    included. A record that does not parse is skipped (its chunks stay in
    trash/; its number still counts, see prune)."""
    out = []
    for seq, key in _round_keys(repo):
        if seq <= after:
            continue
        try:
            doc = json.loads(repo.backend.read(key))
            chunks = tuple(doc["chunks"])
            # Its names become keys that are moved and deleted: anything but
            # a chunk's name (say "../../x") makes the record a damaged one.
            if not all(isinstance(c, str) and HASH_RE.match(c) for c in chunks):
                continue
            done = bool(doc.get("done", False))
            out.append(Round(seq, key, float(doc.get("created", 0)), chunks, done))
        except (NotFound, ValueError, KeyError, TypeError, RecursionError):
            continue
    return out


def see_rounds(repo: Repository, seen: int) -> int:
    """Before a snapshot on any rank: forget the chunks of rounds not seen yet
    (a chunk a round took out is uploaded again, never named from the cache);
    returns the newest round seen, for the manifest's gc_seen."""
    if not any(seq > seen for seq, _key in _round_keys(repo)):
        return seen
    for r in rounds(repo, seen):
        for digest in r.chunks:
            repo.forget_chunk(digest)
        seen = max(seen, r.seq)
    return seen


@dataclasses.dataclass
class PruneReport:
    dropped: list[str] = dataclasses.field(default_factory=list)
    trashed: int = 0
    deleted: int = 0
    restored: int = 0
    waiting: list[int] = dataclasses.field(default_factory=list)  # rounds not ready
    kept: int = 0  # snapshots kept
    steps: list[int] = dataclasses.field(default_factory=list)  # complete steps kept


def describe(report: PruneReport) -> str:
    """What rank 0's prune did, in one (debug) line."""
    return (
        f"retention (rank 0): steps kept {report.steps or 'none (auto mode)'}, "
        f"{report.kept} snapshots kept, {len(report.dropped)} dropped; "
        f"GC rounds: {report.trashed} chunks to trash/, {report.deleted} deleted, "
        f"{report.restored} put back, rounds waiting for a rank: {report.waiting or 'none'}"
    )


def retention(
    world: World, keep: int, whole: Mapping[str, bool], audit: Audit | None = None
) -> tuple[list[SnapshotRef], list[SnapshotRef]]:
    """`_retention`; with an audit (`ckpt gc`), every snapshot it counts in
    place of one it drops is read back first, and one that does not read
    whole counts as damaged."""
    judged = dict(whole)
    while True:
        kept, dropped, counted = _retention(world, keep, judged)
        if audit is None or not dropped:
            return kept, dropped
        manifests = dict(world.manifests())
        bad = [
            ref.key for ref in counted
            if ref in manifests and not audit.whole(ref, manifests[ref])
        ]  # fmt: skip
        if not bad:
            return kept, dropped
        judged.update(dict.fromkeys(bad, False))


def _retention(
    world: World, keep: int, whole: Mapping[str, bool]
) -> tuple[list[SnapshotRef], list[SnapshotRef], list[SnapshotRef]]:
    """(kept, dropped) refs of the rank streams, given which snapshots are
    restorable (`whole`, Repository.judge): the `keep` newest complete steps
    (every rank's part of each restorable, none suspect); of each rank
    everything from its manifest of the oldest kept step on; each rank's
    newest. Without complete steps, each rank by the single-node rule
    (`retained`): its `keep` newest restorable snapshots and the damaged,
    suspect and unverified ones newer than them. The
    single-node stream is its own run's to prune, never touched here."""
    gens = world.generations(whole=whole)[:keep]
    kept: list[SnapshotRef] = []
    dropped: list[SnapshotRef] = []
    # The snapshots kept because they count (the parts of the kept steps,
    # the whole ones a rank's own rule keeps): what an audit reads back.
    counted = [mem.ref for g in gens for mem in g.members.values()]
    for stream, loaded in world.streams.items():
        if not stream:
            continue
        rank = stream_rank(stream)
        cutoffs = [g.members[rank].ref.generation for g in gens if rank in g.members]
        if not cutoffs:
            kinds = [
                (ref, snapshot_kind(m, whole[ref.key], ref.key in world.suspect))
                for ref, m in loaded
            ]
            k, d = retained(kinds, keep)
            kept += k
            dropped += d
            keys = {r.key for r in k}
            counted += [r for r, kind in kinds if kind == WHOLE and r.key in keys]
            continue
        for i, (ref, _m) in enumerate(loaded):  # newest first
            if i == 0 or ref.generation >= min(cutoffs):
                kept.append(ref)
            else:
                dropped.append(ref)
    return kept, dropped, counted


def live_ranks(
    repo: Repository,
    ttl: float,
    *,
    wait: bool = False,
    on_wait: Callable[[str], None] = lambda _message: None,
) -> set[int]:
    """Ranks whose lease is held now (lease.live_leases: a lease that looks
    stale counts as live until it was seen unchanged for its ttl)."""
    keys = [key for key in repo.backend.list(RANKS) if _LEASE_RE.match(key)]
    probes = [Lease(repo.backend, "", ttl, key=key) for key in keys]
    live = live_leases(probes, wait=wait, on_wait=on_wait)
    return {int(m.group(1)) for p in live if (m := _LEASE_RE.match(p.key))}


def _empty_trash(repo: Repository, r: Round, referenced: set[str], report: PruneReport) -> None:
    """Finish round r's chunks: put back those a manifest names, delete the rest."""
    for digest in r.chunks:
        if digest in referenced:
            with contextlib.suppress(NotFound):
                repo.backend.rename(trash_key(digest), chunk_key(digest))
                report.restored += 1
            repo.forget_chunk(digest)  # known again only once seen in a listing
        else:
            repo.backend.delete(trash_key(digest))
            report.deleted += 1


def prune(
    repo: Repository,
    keep: int,
    *,
    me: int,
    ttl: float,
    sweep: bool = False,
    live: set[int] | None = None,
    audit: Audit | None = None,
) -> PruneReport:
    """Rank 0's retention and GC (module docstring). Runs on rank 0's snapshot
    thread between its snapshots, holding its lease. sweep: also take every
    chunk no manifest names, and judge every snapshot by one listing of the
    chunks (Repository.judge: without it, only snapshots first seen now are
    judged, by the ordering rule). live: the ranks taken to hold their lease
    (None: read the leases)."""
    report = PruneReport()
    world = World(repo, cached=not sweep)
    listed = repo.list_chunks() if sweep else None
    present = listed | repo.trash_chunks() if listed is not None else None
    whole = repo.judge(
        [(ref, m) for stream, loaded in world.streams.items() if stream for ref, m in loaded],
        present,
    )
    kept, dropped = retention(world, keep, whole, audit)
    dropped_keys = {r.key for r in dropped}
    referenced: set[str] = set()
    unknown = False  # a kept manifest not read at all: which chunks it names is not known
    for ref, m in world.loaded():
        if ref.key in dropped_keys:
            continue
        if isinstance(m, Manifest):
            referenced |= m.chunk_digests()
        else:  # kept for inspection, and its chunks with it
            names = named_by_damaged(repo, ref)
            unknown |= names is None
            referenced |= names or set()

    # 1. Finish the rounds every live rank has caught up with.
    records = rounds(repo)
    open_rounds = [r for r in records if not r.done]
    last_done = max((r.seq for r in records if r.done), default=0)
    live = (live_ranks(repo, ttl) if live is None else live) - {me}
    seen_by: dict[int, int] = {}
    for stream in world.streams:
        newest = world.newest(stream)
        if stream and newest is not None:
            seen_by[stream_rank(stream)] = newest.gc_seen
    for r in open_rounds:
        behind = sorted(rank for rank in live if seen_by.get(rank, 0) < r.seq)
        if behind or unknown:
            report.waiting.append(r.seq)
            continue
        _empty_trash(repo, r, referenced, report)
        done = {"seq": r.seq, "created": r.created, "finished": time.time(), "done": True}
        repo.backend.write(r.key, json.dumps({**done, "chunks": []}).encode())
        last_done = max(last_done, r.seq)
    # Of the finished records only the newest is needed (the high-water mark).
    for r in records:
        if r.done and r.seq < last_done:
            repo.backend.delete(r.key)

    # 2. Drop old manifests, then take what only they named out of chunks/.
    candidates: set[str] = set()
    for ref in dropped:
        with contextlib.suppress(ManifestError):
            candidates |= repo.load_cached(ref).chunk_digests()
        repo.backend.delete(ref.key)
        report.dropped.append(ref.key)
    repo.forget_manifests(report.dropped)
    repo.drop_marks(dropped, world.suspect)
    if listed is not None:
        candidates |= listed
    # Chunks waiting in an open round are not taken again.
    waiting = {d for r in open_rounds if r.seq in report.waiting for d in r.chunks}
    candidates -= referenced | waiting
    if candidates and not unknown:
        # Never a number used before (see Round.done): every record counts,
        # also one that does not parse.
        seq = max([s for s, _k in _round_keys(repo)] + [0]) + 1
        key = f"{GC}{seq:010d}-{repo.new_id()}.json"
        doc = {"seq": seq, "created": time.time(), "by_rank": me, "chunks": sorted(candidates)}
        repo.backend.write(key, json.dumps(doc).encode())  # the record first, then the moves
        for digest in sorted(candidates):
            repo.forget_chunk(digest)
            with contextlib.suppress(NotFound):
                repo.backend.rename(chunk_key(digest), trash_key(digest))
                report.trashed += 1
    report.steps = [g.step for g in world.generations(whole=whole)[:keep]]
    report.kept = len(kept)
    return report


# ------------------------------------------------------------------ ckpt gc


def collect(repo: Repository, keep: int, *, dry_run: bool) -> GcPlan:
    """`ckpt gc`: the retention of every stream (the single-node one by its
    rule, the ranks' by rank 0's), then every chunk no remaining manifest
    names and the temp objects of killed writers, for a job that has stopped
    (the caller holds the writer lease and saw no rank's lease held).

    Everything goes through a Recorder: what was deleted is read off it, and
    a dry run is this very code on an overlay that deletes nothing, so it
    says exactly what the run does (for a job whose ranks hold their leases,
    what the run will do once they have stopped)."""
    recorder = Recorder(repo.backend, dry_run=dry_run)
    r = Repository(recorder, repo.chunk_size, repo.hash_name)
    audit = Audit(r)
    sizes: dict[str, int] = {}
    for _ref, m in World(r).manifests():
        sizes.update(chunk_sizes(m))
    if r.rank_snapshots():
        # The job is stopped (no rank holds its lease): every rank's stream
        # is pruned by rank 0's rule, every snapshot judged by a listing, and
        # the round made by the first pass is finished by the second (no rank
        # can be behind it). A rank that starts meanwhile holds its lease,
        # and the round waits for it.
        stopped: set[int] | None = set() if dry_run else None
        for _ in range(2):
            prune(r, keep, me=-1, ttl=60.0, sweep=True, live=stopped, audit=audit)
    r.gc(keep, sweep=True, audit=audit)
    audit.mark()
    for key in recorder.list(SNAPSHOTS, temp=True):  # gc swept chunks/; snapshots/ too
        recorder.delete(key)

    dropped = [ref for key in recorder.deleted if (ref := snapshot_ref(key)) is not None]
    kept = r.snapshots("") + [ref for refs in r.rank_snapshots().values() for ref in refs]
    chunks: dict[str, int | None] = {}
    for key in recorder.deleted:
        name = key.rsplit("/", 1)[-1]
        if key.startswith((CHUNKS, "trash/")) and HASH_RE.match(name):
            chunks[name] = sizes.get(name)
    temps = [key for key in recorder.deleted if key in recorder.temps]
    return GcPlan(
        kept, dropped, dict(sorted(chunks.items())), temps, audit.bytes_read, audit.damaged
    )
