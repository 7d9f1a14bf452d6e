"""What a writer's stream keeps, and what each of its snapshots records of
its world: the policies injected into a `Snapshotter`.

One node (`LatestRestorable`): after a snapshot, the newest `keep`
restorable snapshots are kept (`Repository.gc`). A rank of several
(`RankRounds`): only rank 0 prunes, every stream, by complete steps, with
GC rounds that no rank's upload can race (`world.prune`); before each
snapshot every rank reads the rounds it has not seen (`SeeRounds`, the
pre-snapshot hook) and its manifest records the newest (`Stamp.gc_seen`).
`for_world` builds the pair a rank of a world of `world_size` uses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

from ckpt_cli import console, world
from ckpt_cli.repository import Repository


@dataclasses.dataclass(frozen=True)
class Stamp:
    """What a manifest records of the world its writer is in: this stream's
    rank of world_size (0 of 1: a single node), and the newest GC round seen."""

    rank: int = 0
    world_size: int = 1
    gc_seen: int = 0


class Retention(Protocol):
    """Retention of a stream, run by its writer between snapshots."""

    def prune(self, repo: Repository, keep: int, *, sweep: bool) -> None:
        """Keep the newest `keep` snapshots by the policy's rule; sweep: also
        take the chunks no manifest names (the first prune of a process)."""
        ...


#: The pre-snapshot hook: run before a snapshot looks up any chunk; returns
#: what its manifest records of the world (a Stamp).
PreSnapshot = Callable[[Repository], Stamp]


@dataclasses.dataclass(frozen=True)
class LatestRestorable:
    """One node: the newest `keep` restorable snapshots (Repository.gc)."""

    def prune(self, repo: Repository, keep: int, *, sweep: bool) -> None:
        repo.gc(keep, sweep=sweep)


@dataclasses.dataclass(frozen=True)
class RankRounds:
    """A rank of several: rank 0 prunes every rank's stream by complete steps
    with GC rounds (world.prune); the other ranks prune nothing. ttl: other
    ranks' leases are live within it."""

    rank: int
    ttl: float

    def prune(self, repo: Repository, keep: int, *, sweep: bool) -> None:
        if self.rank != 0:  # only rank 0 prunes a multi-rank repository
            return
        report = world.prune(repo, keep, me=self.rank, ttl=self.ttl, sweep=sweep)
        console.debug(world.describe(report))


def single_node(_repo: Repository) -> Stamp:
    """One node's pre-snapshot hook: nothing to read; rank 0 of 1."""
    return Stamp()


@dataclasses.dataclass
class SeeRounds:
    """A rank's pre-snapshot hook: forget the chunks of GC rounds not seen yet
    (world.see_rounds) and stamp the manifest with the newest one seen."""

    rank: int
    world_size: int
    seen: int = 0

    def __call__(self, repo: Repository) -> Stamp:
        self.seen = world.see_rounds(repo, self.seen)
        return Stamp(self.rank, self.world_size, self.seen)


def for_world(rank: int, world_size: int, lease_ttl: float) -> tuple[Retention, PreSnapshot]:
    """The retention policy and pre-snapshot hook of rank `rank` of a world
    of `world_size` (1: a single node)."""
    if world_size == 1:
        return LatestRestorable(), single_node
    return RankRounds(rank, lease_ttl), SeeRounds(rank, world_size)
