"""Several ranks in one repository: global generations, what each rank
restores, retention across ranks, and garbage collection that cannot race
another rank's upload. No coordinator: the repository is the only shared state.

- Every rank writes its own stream (ranks/<r>/snapshots/) and shares chunks/.
- A commit tagged with a training step belongs to global generation `step`.
  Step S written by a world of W ranks is *complete* when each of the ranks
  0..W-1 has a manifest with that step and world size, each loads, and every
  chunk they name is in the store. Each rank restores its own manifest of the
  newest complete step: the same cut on every rank.
- Only rank 0 prunes. Chunks that no kept manifest names are not deleted at
  once: a GC round (gc/<seq>-<id>.json) lists them and moves them to trash/.
  Every rank reads new rounds before each snapshot, forgets their chunks (so
  it uploads them again rather than naming a trashed one) and records the
  newest round it saw in its manifest (`gc_seen`). A later prune deletes a
  round's trash only once every rank with a live lease has written a manifest
  that saw the round, and first puts back any chunk some manifest names (one
  written by a rank that had not seen the round yet). A restore reads a chunk
  from trash/ while it waits there. This is the two-step "fossil" collection
  of duplicacy, with the lease standing in for "this rank is still writing".
Imports: standard library, `repository`, `manifest`, `lease`, `remote`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import time
from collections.abc import Callable, Iterator

from ckpt_cli import console
from ckpt_cli.errors import ConfigError
from ckpt_cli.lease import Lease, live_leases
from ckpt_cli.manifest import Manifest, ManifestError
from ckpt_cli.remote import NotFound
from ckpt_cli.repository import (
    RANKS,
    Repository,
    SnapshotRef,
    chunk_key,
    rank_stream,
    stream_rank,
    trash_key,
)

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

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.streams: dict[str, list[tuple[SnapshotRef, Manifest | ManifestError]]] = {}
        listing: dict[str, list[SnapshotRef]] = {"": repo.snapshots("")}
        for rank, refs in repo.rank_snapshots().items():
            listing[rank_stream(rank, 2)] = refs
        # Manifests are written once and never changed: rank 0 prunes after
        # every snapshot, and reads each manifest of every rank only once.
        cache = repo.world_manifests
        listed = {ref.key for refs in listing.values() for ref in refs}
        for key in list(cache):
            if key not in listed:
                del cache[key]
        for stream, refs in listing.items():
            loaded: list[tuple[SnapshotRef, Manifest | ManifestError]] = []
            for ref in refs:
                try:
                    m = cache.get(ref.key) or repo.load(ref)
                    if (m.rank, m.world_size > 1) != (stream_rank(stream), bool(stream)):
                        raise ManifestError(
                            f"says rank {m.rank} of {m.world_size} but is in {stream or 'the root'}"
                        )
                    cache[ref.key] = m
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

    def newest(self, stream: str) -> Manifest | None:
        return next((m for _ref, m in self.manifests(stream)), None)

    def newest_overall(self) -> Manifest | None:
        return max((m for _r, m in self.manifests()), key=lambda m: m.created, default=None)

    def generations(self, present: set[str] | None = None) -> list[Generation]:
        """Complete steps, newest (highest step) first. With `present` (the
        chunks in the store), a step whose chunks are not all there is not
        complete."""
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
            if set(members) != set(range(w)):
                continue
            if present is not None and any(
                not mem.manifest.chunk_digests() <= present for mem in members.values()
            ):
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
    if newest is not None and newest.world_size != world_size and not allow_change:
        raise _world_changed(newest.world_size, world_size, "its newest snapshot")
    own = world.newest(rank_stream(rank, world_size))
    ref = next((r for r, m in world.manifests(rank_stream(rank, world_size)) if m is own), None)
    if own is None and allow_change and newest is not None:
        # a world of another size: this rank's stream of that world, if any
        old = world.newest(rank_stream(rank, newest.world_size))
        if old is not None:
            own = old
            ref = next(r for r, m in world.manifests() if m is old)
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
            chunks = tuple(str(c) for c in doc["chunks"])
            done = bool(doc.get("done", False))
            out.append(Round(seq, key, float(doc.get("created", 0)), chunks, done))
        except (NotFound, ValueError, KeyError, TypeError):
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


def retention(world: World, keep: int) -> tuple[list[SnapshotRef], list[SnapshotRef]]:
    """(kept, dropped) refs of the rank streams: the `keep` newest complete
    steps; of each rank everything from its manifest of the oldest kept step
    on; each rank's newest. Without complete steps, each rank's `keep` newest.
    The single-node stream is its own run's to prune, never touched here."""
    gens = world.generations()[:keep]
    kept: list[SnapshotRef] = []
    dropped: list[SnapshotRef] = []
    for stream, loaded in world.streams.items():
        if not stream:
            continue
        rank = stream_rank(stream)
        cutoffs = [g.members[rank].ref.generation for g in gens if rank in g.members]
        for i, (ref, _m) in enumerate(loaded):  # newest first
            if i == 0 or (ref.generation >= min(cutoffs) if cutoffs else i < keep):
                kept.append(ref)
            else:
                dropped.append(ref)
    return kept, dropped


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


def prune(repo: Repository, keep: int, *, me: int, ttl: float, sweep: bool = False) -> PruneReport:
    """Rank 0's retention and GC (module docstring). Runs on rank 0's snapshot
    thread between its snapshots, holding its lease."""
    report = PruneReport()
    world = World(repo)
    _kept, dropped = retention(world, keep)
    dropped_keys = {r.key for r in dropped}
    referenced: set[str] = set()
    for ref, m in world.manifests():
        if ref.key not in dropped_keys:
            referenced |= m.chunk_digests()

    # 1. Finish the rounds every live rank has caught up with.
    records = rounds(repo)
    open_rounds = [r for r in records if not r.done]
    last_done = max((r.seq for r in records if r.done), default=0)
    live = live_ranks(repo, ttl) - {me}
    seen_by: dict[int, int] = {}
    for stream in world.streams:
        newest = world.newest(stream)
        if stream and newest is not None:
            seen_by[stream_rank(stream)] = newest.gc_seen
    for r in open_rounds:
        behind = sorted(rank for rank in live if seen_by.get(rank, 0) < r.seq)
        if behind:
            report.waiting.append(r.seq)
            continue
        for digest in r.chunks:
            if digest in referenced:
                with contextlib.suppress(NotFound):
                    repo.backend.rename(trash_key(digest), chunk_key(digest))
                    report.restored += 1
                repo.forget_chunk(digest)  # known again only once seen in a listing
            else:
                repo.backend.delete(trash_key(digest))
                report.deleted += 1
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
            candidates |= repo.load(ref).chunk_digests()
        repo.backend.delete(ref.key)
        report.dropped.append(ref.key)
    if sweep:
        candidates |= repo.list_chunks()
    # Chunks waiting in an open round are not taken again.
    waiting = {d for r in open_rounds if r.seq in report.waiting for d in r.chunks}
    candidates -= referenced | waiting
    if candidates:
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
    steps = [g.step for g in world.generations()[:keep]]
    console.debug(
        f"retention (rank 0): steps kept {steps or 'none (auto mode)'}, "
        f"{len(_kept)} snapshots kept, {len(report.dropped)} dropped; "
        f"GC rounds: {report.trashed} chunks to trash/, {report.deleted} deleted, "
        f"{report.restored} put back, rounds waiting for a rank: {report.waiting or 'none'}"
    )
    return report
