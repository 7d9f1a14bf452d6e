"""retention_policy: the policies a Snapshotter is given, one node or a rank of several."""

from __future__ import annotations

from pathlib import Path

from ckpt_cli import world
from ckpt_cli.backends import open_backend
from ckpt_cli.repository import Repository, rank_stream
from ckpt_cli.retention_policy import (
    LatestRestorable,
    RankRounds,
    SeeRounds,
    Stamp,
    for_world,
    single_node,
)
from ckpt_cli.snapshotter import Snapshotter

from .helpers import CHUNK, data, write


def test_one_node_keeps_the_latest_restorable_and_stamps_rank_0_of_1() -> None:
    retention, hook = for_world(0, 1, 60.0)
    assert retention == LatestRestorable() and hook is single_node
    assert single_node(None) == Stamp(0, 1, 0)  # type: ignore[arg-type]  # reads nothing


def test_a_rank_of_several_prunes_by_rounds_and_sees_them() -> None:
    retention, hook = for_world(1, 4, 30.0)
    assert retention == RankRounds(1, 30.0)
    assert isinstance(hook, SeeRounds) and (hook.rank, hook.world_size, hook.seen) == (1, 4, 0)


def test_a_snapshot_records_the_hook_stamp_and_prunes_by_the_policy(tmp_path: Path) -> None:
    """Injected: the manifest's rank, world size and round seen come from the
    hook; the snapshotter's prune is the policy's."""
    repo = Repository(open_backend(str(tmp_path / "r")), chunk_size=CHUNK)
    pruned: list[tuple[int, bool]] = []

    class Counting:
        def prune(self, repo: Repository, keep: int, *, sweep: bool) -> None:
            pruned.append((keep, sweep))

    root = tmp_path / "d"
    write(root / "a", data(1, 10))
    snap = Snapshotter(repo, root, retention=Counting(), before_snapshot=lambda _r: Stamp(3, 8, 5))
    try:
        m = snap.snapshot(reason="t", keep=2).manifest
        write(root / "a", data(2, 20))
        snap.snapshot(reason="t", keep=2)
    finally:
        snap.close()
    assert m is not None and (m.rank, m.world_size, m.gc_seen) == (3, 8, 5)
    assert snap.gc_seen == 5
    assert pruned == [(2, True), (2, False)], "the first prune of a process sweeps"


def test_a_rank_other_than_0_prunes_nothing(tmp_path: Path) -> None:
    backend = open_backend(str(tmp_path / "r"))
    repo = Repository(backend, chunk_size=CHUNK, stream=rank_stream(1, 2))
    root = tmp_path / "d"
    snap = Snapshotter(repo, root, rank=1, world_size=2)
    try:
        for i in range(3):
            write(root / "a", data(i, 10 + i))
            snap.snapshot(reason="t", keep=1)
    finally:
        snap.close()
    assert len(repo.snapshots()) == 3


def test_describe_says_what_rank_0_pruned() -> None:
    report = world.PruneReport(dropped=["k1"], trashed=2, waiting=[4], kept=3, steps=[9, 8])
    assert world.describe(report) == (
        "retention (rank 0): steps kept [9, 8], 3 snapshots kept, 1 dropped; GC rounds: "
        "2 chunks to trash/, 0 deleted, 0 put back, rounds waiting for a rank: [4]"
    )
    assert "steps kept none (auto mode)" in world.describe(world.PruneReport())
