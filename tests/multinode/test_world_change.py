"""`--allow-world-change` in both directions, through the real binary: a job
of W nodes (W = 1, 2, 3: one node writes the single-node layout, the others
ranks/<r>/) is restored by a world of W - 1 and of W + 1, with step commits
and with auto snapshots only. The rule (README, "The world size changes"):
rank r gets old rank r's files, a rank beyond the old world starts empty.
One node growing to two gave rank 1 the single node's files; a world that
grew back to a size it once had gave its last rank that old world's files.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import Cluster, Remote, assert_restored, expected_files, tree_digests

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.parametrize("make_remote", ["file"], indirect=True),
]

#: Weights per step: small, the rule is about which files, not how many bytes.
SIZE = 64 * 1024
ALLOW = "--allow-world-change"


def _write_world(cluster: Cluster, world: int, commit: str, label: str, steps: int = 2) -> None:
    """Every rank of a world of `world` runs to its end (one after the other)."""
    for rank in range(world):
        node = cluster.start(
            rank,
            world,
            label=label,
            steps=steps,
            commit=commit,
            size=SIZE,
            rank_flags=world > 1,
        )
        node.assert_exit(0)


def _restored(remote: Remote, tmp_path: Path, rank: int, world: int, name: str) -> dict[str, str]:
    dest = tmp_path / name
    res = remote.restore(dest, rank, world, ALLOW)
    assert res.returncode == 0, res.stderr
    return tree_digests(dest)


@pytest.mark.parametrize("commit", ["shell", "none"], ids=["steps", "auto"])
@pytest.mark.parametrize("old", [1, 2, 3])
def test_a_world_grown_or_shrunk_restores_old_ranks_and_nothing_for_new_ones(
    cluster: Cluster, remote: Remote, tmp_path: Path, old: int, commit: str
) -> None:
    """A world of `old` nodes wrote steps 1 and 2 (or, with auto snapshots,
    its final state at step 2). `ckpt restore --rank r --world-size N
    --allow-world-change`, N = old - 1 and old + 1: every rank r < old gets
    exactly old rank r's files of step 2, every rank r >= old nothing."""
    _write_world(cluster, old, commit, "old")
    for new in (old - 1, old + 1):
        if new < 1:
            continue
        for rank in range(new):
            got = _restored(remote, tmp_path, rank, new, f"w{new}-r{rank}")
            want = expected_files(rank, 2, size=SIZE) if rank < old else {}
            assert got == want, f"{old} -> {new} nodes, rank {rank}: {sorted(got)}"


def test_one_node_grown_to_two_starts_rank_1_empty(cluster: Cluster, remote: Remote) -> None:
    """One node (auto snapshots) wrote its state; `ckpt run` as ranks 0 and 1
    of 2 with --allow-world-change: rank 0's child starts with the node's
    files, rank 1's with none (it had the single node's files)."""
    _write_world(cluster, 1, "none", "one")
    nodes = [
        cluster.start(r, 2, label="two", steps=3, commit="shell", size=SIZE, flags=(ALLOW,))
        for r in range(2)
    ]
    report = nodes[0].started()
    assert report["files"] == expected_files(0, 2, size=SIZE)
    assert_restored(nodes[1].started(), 1, 2, None)
    for node in nodes:
        node.assert_exit(0)


def test_a_world_grown_back_never_restores_its_old_last_rank(
    cluster: Cluster, remote: Remote, tmp_path: Path
) -> None:
    """3 nodes, then 2 (allowed), then 3 again (auto snapshots): ranks/2/
    still holds what rank 2 wrote in the first world of 3, which is not the
    job's last state: rank 2 of the new world starts empty, ranks 0 and 1
    get what the world of 2 wrote."""
    _write_world(cluster, 3, "none", "three", steps=1)
    for rank in range(2):
        node = cluster.start(
            rank, 2, label="two", steps=2, commit="none", size=SIZE, flags=(ALLOW,)
        )
        node.assert_exit(0)
    assert _restored(remote, tmp_path, 2, 3, "back-r2") == {}
    for rank in range(2):
        got = _restored(remote, tmp_path, rank, 3, f"back-r{rank}")
        assert got == expected_files(rank, 2, size=SIZE)
