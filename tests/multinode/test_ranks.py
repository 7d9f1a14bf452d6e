"""Several ranks on one remote, with real supervisors and real children: one
`ckpt run --rank R --world-size N` per rank, each with its own --dir, all
against ONE repository (a directory, or the S3 test server).

- a rank killed (kill -9, supervisor and child) between two ranks' commits of
  a step: replacement nodes with empty dirs all restore the newest step that
  every rank committed, each its own files of it;
- the weights every rank writes are stored once (bytes under chunks/);
- with no step commits, each rank restores its own newest snapshot and says it
  is not a consistent cut;
- a world of another size (more ranks, or back to one node) is refused (the
  local dir untouched) unless --allow-world-change, which gives old ranks
  their files and new ranks none;
- one supervisor per rank (a second is refused), and a rank killed with -9
  does not stop the others;
- the rank comes from the engine's variables (torchrun, SLURM, a Kubernetes
  Indexed Job, SkyPilot, CKPT_RANK) when no flag gives it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ckpt._contract import ExitCode

from .conftest import (
    WEIGHTS,
    Cluster,
    Node,
    Remote,
    assert_restored,
    assert_verified,
    chunk_names,
    expected_files,
    one_error_line,
    sha,
    tree_digests,
)

pytestmark = pytest.mark.timeout(180)

#: The step rank 0 commits while rank 1 is killed before committing it.
K = 4
#: The last step of the runs after the replacement.
LAST = 6


#: Rank 1 of 2 as each engine says it: (env, rank flags given?, the source the banner names).
ENGINES: dict[str, tuple[dict[str, str], bool, str]] = {
    "ckpt-env": ({"CKPT_RANK": "1", "CKPT_WORLD_SIZE": "2"}, False, "CKPT_RANK"),
    "torchrun-env": ({"GROUP_RANK": "1", "PET_NNODES": "2"}, False, "GROUP_RANK"),
    "slurm": ({"SLURM_NODEID": "1", "SLURM_NNODES": "2"}, False, "SLURM_NODEID"),
    "k8s-indexed-job": ({"JOB_COMPLETION_INDEX": "1", "CKPT_WORLD_SIZE": "2"}, False, "JOB_"),
    "skypilot": ({"SKYPILOT_NODE_RANK": "1", "SKYPILOT_NUM_NODES": "2"}, False, "SKYPILOT_"),
    "flags-over-slurm": ({"SLURM_NODEID": "0", "SLURM_NNODES": "3"}, True, "--rank"),
}


def _committed(node: Node) -> int:
    """The newest step the node's child has committed (0 if none)."""
    done = [int(p.name.split("-", 1)[1]) for p in node.ctl.glob("committed-*")]
    return max(done, default=0)


def test_replacement_nodes_restore_the_newest_step_complete_on_every_rank(
    cluster: Cluster, remote: Remote, tmp_path: Path
) -> None:
    """Rank 0 commits step K (shim: ckpt.commit(step=K)); rank 1 (shell: `ckpt
    commit --step`) has written step K's files but is held before its commit,
    then its supervisor and child are killed with -9. Replacement nodes with
    empty --dirs: both restore step K-1 (rank 0 not its newest, K), each its
    own shard and the shared weights of K-1, and CKPT_RESTORED_STEP says K-1.
    They go on to LAST; then `ckpt restore --rank R` gives each rank step LAST."""
    r0 = cluster.start(0, 2, label="first", steps=K, commit="shim", finish=True)
    r1 = cluster.start(1, 2, label="first", steps=LAST, commit="shell", gates=(K,))
    first0, first1 = r0.started(), r1.started()
    assert_restored(first0, 0, 2, None)
    assert_restored(first1, 1, 2, None)
    assert first0["shim_restored_step"] is None, "ckpt.checkpoint().restored_step on a fresh start"
    r0.mark(f"committed-{K}")
    r1.mark(f"at-{K}")  # step K's files are written on rank 1; its commit waits
    assert K in remote.steps(0), remote.steps(0)
    assert K - 1 in remote.steps(1) and K not in remote.steps(1), remote.steps(1)
    r1.kill9()
    r0.finish()
    r0.assert_exit(0)

    assert "ckpt: rank 0 of 2" in r0.stderr(), r0.stderr()
    assert "ckpt: rank 1 of 2" in r1.stderr(), r1.stderr()
    for rank in (0, 1):
        for key, m in remote.manifests(rank):
            assert (m.get("rank"), m.get("world_size")) == (rank, 2), f"{key}: {m}"
            assert "gc_seen" in m, f"{key} has no gc_seen"
    assert not remote.root_manifests(), "a multi-rank run wrote to the single-node stream"
    doc = remote.ls()
    assert doc["complete_steps"][0] == K - 1, doc["complete_steps"]
    assert set(doc["ranks"]) == {"0", "1"}, doc["ranks"]

    # Replacement nodes: fresh, empty dirs; this time rank 0 uses the shell, rank 1 the shim.
    n0 = cluster.start(0, 2, label="second", steps=LAST, commit="shell")
    n1 = cluster.start(1, 2, label="second", steps=LAST, commit="shim")
    assert_restored(n0.started(), 0, 2, K - 1)
    assert_restored(n1.started(), 1, 2, K - 1)
    assert n1.child["shim_restored_step"] == K - 1
    n0.assert_exit(0)
    n1.assert_exit(0)
    assert "took over the lease" in n1.stderr(), "rank 1's dead supervisor's lease"

    doc = remote.ls()
    assert doc["complete_steps"][0] == LAST, doc["complete_steps"]
    for rank in (0, 1):
        dest = tmp_path / f"restored-r{rank}"
        res = remote.restore(dest, rank, 2)
        assert res.returncode == 0, res.stderr
        assert tree_digests(dest) == expected_files(rank, LAST)
        ranked = remote.ls("--rank", str(rank))
        assert ranked["complete_steps"][0] == LAST
        assert ranked["world_size"] == 2
        assert all(s["rank"] == rank for s in ranked["snapshots"]), ranked["snapshots"]
    assert_verified(remote)


def test_identical_weights_are_stored_once_across_ranks(
    cluster: Cluster, make_remote: Callable[[str], Remote]
) -> None:
    """Two ranks write the same 3 MiB weights per step (and a small shard of
    their own) and commit 2 steps; one rank alone (no --rank: the single-node
    layout) writes the same. The two-rank repository holds less than 1.2x the
    chunk bytes of the one-rank one: the weights are stored once."""
    steps = 2
    two = cluster.remote
    a = cluster.start(0, 2, label="two", steps=steps, sleep=0)
    b = cluster.start(1, 2, label="two", steps=steps, sleep=0)
    a.assert_exit(0)
    b.assert_exit(0)
    one = make_remote("single")
    s = cluster.start(0, 1, label="one", steps=steps, sleep=0, remote=one, rank_flags=False)
    s.assert_exit(0)

    # One node keeps the old layout exactly; the step is recorded there too.
    assert one.root_manifests() and not one.objects("ranks/"), sorted(one.objects())
    assert one.read_json(one.root_manifests()[-1]).get("step") == steps

    for step in range(1, steps + 1):
        w = [
            next(e for e in remote_m["entries"] if e["path"] == "weights.bin")["chunks"]
            for remote_m in (two.manifest_of(0, step)[1], two.manifest_of(1, step)[1])
        ]
        assert w[0] == w[1], f"step {step}: the ranks name different chunks for the same weights"

    two_bytes, one_bytes = sum(two.chunks().values()), sum(one.chunks().values())
    ratio = two_bytes / one_bytes
    print(
        f"\n[dedup {two.kind}] chunks/ bytes: one rank {one_bytes} ({len(one.chunks())} chunks), "
        f"two ranks {two_bytes} ({len(two.chunks())} chunks): ratio {ratio:.3f} "
        f"(weights {steps} x {WEIGHTS} B per rank)"
    )
    for node in (a, b, s):
        summary = [ln for ln in node.stderr().splitlines() if "uploaded" in ln]
        print(f"[dedup {two.kind}] rank {node.rank} of {node.world}: {summary[-1:]}")
    assert one_bytes >= steps * WEIGHTS
    assert ratio < 1.2, f"two ranks store {ratio:.2f}x what one rank stores"
    doc = two.ls()
    assert doc["complete_steps"] == [2, 1], doc["complete_steps"]
    assert set(doc["ranks"]) == {"0", "1"}, doc


def test_auto_mode_restores_each_ranks_own_newest_and_says_it_is_not_a_consistent_cut(
    cluster: Cluster, remote: Remote, tmp_path: Path
) -> None:
    """No step commits (auto snapshots on quiet periods and at exit): rank 0
    gets to state 2, rank 1 to state 1. Replacement nodes restore each its own
    newest snapshot (not a common step), with CKPT_RESTORED_STEP empty, and say
    on stderr that it is not a consistent cut; so does `ckpt restore --rank`."""
    a = cluster.start(0, 2, label="first", steps=2, commit="none")
    b = cluster.start(1, 2, label="first", steps=1, commit="none")
    a.assert_exit(0)
    b.assert_exit(0)
    assert remote.steps(0) and remote.steps(1)
    assert set(remote.steps(0)) | set(remote.steps(1)) == {None}, "no manifest has a step"
    assert remote.ls()["complete_steps"] == []

    n0 = cluster.start(0, 2, label="second", steps=2, commit="none")
    n1 = cluster.start(1, 2, label="second", steps=1, commit="none")
    for node, state in ((n0, 2), (n1, 1)):
        report = node.started()
        assert report["env"]["CKPT_RANK"] == str(node.rank)
        assert report["files"] == expected_files(node.rank, state), f"rank {node.rank}"
        assert report["env"]["CKPT_RESTORED_STEP"] == "", report["env"]
        assert report["env"]["CKPT_RESTORED"], "a snapshot was restored"
        node.assert_exit(0)
        assert "not a consistent cut" in node.stderr(), node.stderr()

    dest = tmp_path / "restored-r1"
    res = remote.restore(dest, 1, 2)
    assert res.returncode == 0, res.stderr
    assert "not a consistent cut" in res.stderr, res.stderr
    assert tree_digests(dest) == expected_files(1, 1)


def test_a_world_size_change_is_refused_unless_allowed(
    cluster: Cluster, remote: Remote, tmp_path: Path
) -> None:
    """A repository written by 2 ranks (steps 1, 2). `ckpt run --rank 0
    --world-size 3` is refused: the exit code of a config error, one error
    line naming --allow-world-change, the child never started, its --dir (with
    a file of its own) untouched, no snapshot written; `ckpt restore --rank 0
    --world-size 3` too. With --allow-world-change, ranks 0 and 1 restore their
    files of step 2 and rank 2 starts empty; once all three committed step 3,
    a world of 3 needs no flag."""
    for rank in (0, 1):
        cluster.start(rank, 2, label="old", steps=2, sleep=0).assert_exit(0)
    snapshots_before = {k for k in remote.objects("ranks/") if "/snapshots/" in k}

    mine = tmp_path / "ck-grown-r0"
    mine.mkdir()
    (mine / "local.txt").write_text("the node's own state")
    refused = cluster.start(0, 3, label="grown", steps=3, ckpt_dir=mine)
    rc = refused.wait()
    assert rc == ExitCode.CONFIG, f"exit {rc}:\n{refused.stderr()}"
    line = one_error_line(refused.stderr())
    assert "--allow-world-change" in line, line
    assert not (refused.ctl / "started-1.json").exists(), "the child ran"
    assert tree_digests(mine) == {"local.txt": sha(b"the node's own state")}
    assert [p.name for p in tmp_path.iterdir() if "ck-grown-r0" in p.name] == [mine.name]
    assert {k for k in remote.objects("ranks/") if "/snapshots/" in k} == snapshots_before

    dest = tmp_path / "restore-grown"
    res = remote.restore(dest, 0, 3)
    assert res.returncode == ExitCode.CONFIG, res.stderr
    assert "--allow-world-change" in one_error_line(res.stderr)
    assert tree_digests(dest) == {}

    allow = ("--allow-world-change",)
    nodes = [cluster.start(r, 3, label="allowed", steps=3, flags=allow) for r in range(3)]
    assert_restored(nodes[0].started(), 0, 3, 2)
    assert_restored(nodes[1].started(), 1, 3, 2)
    assert_restored(nodes[2].started(), 2, 3, None)
    for node in nodes:
        node.assert_exit(0)
    assert_verified(remote)
    doc = remote.ls("--rank", "2")
    assert doc["complete_steps"][0] == 3, doc
    assert doc["world_size"] == 3, doc
    for rank in range(3):
        dest = tmp_path / f"restored-3-r{rank}"
        res = remote.restore(dest, rank, 3)
        assert res.returncode == 0, res.stderr
        assert tree_digests(dest) == expected_files(rank, 3)


@pytest.mark.parametrize("make_remote", ["file"], indirect=True)
@pytest.mark.parametrize("engine", list(ENGINES))
def test_the_rank_comes_from_the_engines_environment(
    cluster: Cluster, remote: Remote, engine: str
) -> None:
    """With no --rank/--world-size, a real run takes rank 1 of 2 from the
    variables its engine sets (flags win over them): the banner names the
    source, the child gets CKPT_RANK/CKPT_WORLD_SIZE, and its snapshots go to
    ranks/1/ only."""
    env, flags, source = ENGINES[engine]
    node = cluster.start(1, 2, label=engine, steps=1, rank_flags=flags, env=env)
    report = node.started()
    assert (report["env"]["CKPT_RANK"], report["env"]["CKPT_WORLD_SIZE"]) == ("1", "2")
    node.assert_exit(0)
    banner = [ln for ln in node.stderr().splitlines() if ln.startswith("ckpt: rank 1 of 2 (")]
    assert banner and source in banner[0], node.stderr()
    assert remote.steps(1)[-1:] == [1], remote.steps(1)
    assert not remote.objects("ranks/0/") and not remote.root_manifests()


@pytest.mark.parametrize("make_remote", ["file"], indirect=True)
def test_shrinking_to_one_node_in_auto_mode_is_refused_unless_allowed(
    cluster: Cluster, remote: Remote, tmp_path: Path
) -> None:
    """No step commits: two ranks wrote snapshots. A plain `ckpt run` (no rank
    anywhere: one node) is refused like any world-size change (its dir
    untouched); with --allow-world-change it restores old rank 0's newest
    files and writes the single-node layout; the next plain run then needs no
    flag and restores what that run committed."""
    cluster.start(0, 2, label="old", steps=2, commit="none").assert_exit(0)
    cluster.start(1, 2, label="old", steps=1, commit="none").assert_exit(0)

    mine = tmp_path / "ck-one-r0"
    mine.mkdir()
    (mine / "local.txt").write_text("the node's own state")
    refused = cluster.start(0, 1, label="one", steps=3, rank_flags=False, ckpt_dir=mine)
    rc = refused.wait()
    assert rc == ExitCode.CONFIG, f"exit {rc}:\n{refused.stderr()}"
    assert "--allow-world-change" in one_error_line(refused.stderr())
    assert tree_digests(mine) == {"local.txt": sha(b"the node's own state")}
    assert not (refused.ctl / "started-1.json").exists(), "the child ran"

    allowed = cluster.start(
        0, 1, label="allowed", steps=3, rank_flags=False, flags=("--allow-world-change",)
    )
    report = allowed.started()
    assert report["files"] == expected_files(0, 2), "old rank 0's newest files"
    assert (report["env"]["CKPT_RANK"], report["env"]["CKPT_WORLD_SIZE"]) == ("0", "1")
    assert report["env"]["CKPT_RESTORED_STEP"] == "", report["env"]
    allowed.assert_exit(0)
    assert remote.root_manifests(), "one node writes the single-node layout"

    again = cluster.start(0, 1, label="again", steps=3, rank_flags=False)
    assert_restored(again.started(), 0, 1, 3)
    again.assert_exit(0)


def test_one_supervisor_per_rank_and_a_killed_rank_does_not_stop_the_others(
    cluster: Cluster, remote: Remote, tmp_path: Path
) -> None:
    """Ranks 0 and 1 commit steps continuously. A second supervisor for rank 1
    is refused (exit 69, one error line naming the holder's pid; its child
    never runs, its dir untouched) and the holders go on. Then rank 1 is
    killed with -9: rank 0 keeps committing, its lease is its own and
    untouched, and a second supervisor for rank 0 is still refused."""
    stop = tmp_path / "stop"
    small = 256 * 1024
    r0 = cluster.start(0, 2, label="a", steps=10_000, sleep=0.1, stop=stop, size=small)
    r1 = cluster.start(1, 2, label="a", steps=10_000, sleep=0.1, stop=stop, size=small)
    r0.started()
    r1.started()
    r0.mark("committed-2")
    r1.mark("committed-2")
    for node in (r0, r1):
        lease = remote.read_json(f"ranks/{node.rank}/lease.json")
        assert lease["pid"] == node.proc.pid, lease

    def refused(rank: int, label: str, holder: Node) -> None:
        other = tmp_path / f"ck-{label}-r{rank}"
        other.mkdir()
        (other / "mine.txt").write_text("a second node's own state")
        dup = cluster.start(rank, 2, label=label, steps=1, ckpt_dir=other, size=small)
        rc = dup.wait()
        assert rc == ExitCode.UNAVAILABLE, f"exit {rc}:\n{dup.stderr()}"
        line = one_error_line(dup.stderr())
        assert str(holder.proc.pid) in line, line
        assert not (dup.ctl / "started-1.json").exists(), "the refused run's child ran"
        assert tree_digests(other) == {"mine.txt": sha(b"a second node's own state")}

    refused(1, "dup1", r1)
    for node in (r0, r1):
        assert remote.read_json(f"ranks/{node.rank}/lease.json")["pid"] == node.proc.pid
        node.mark(f"committed-{_committed(node) + 2}")

    r1.kill9()
    at_kill = _committed(r0)
    r0.mark(f"committed-{at_kill + 3}")
    assert {at_kill + 1, at_kill + 2, at_kill + 3} <= set(remote.steps(0)), remote.steps(0)
    assert remote.read_json("ranks/0/lease.json")["pid"] == r0.proc.pid
    assert remote.read_json("ranks/1/lease.json")["pid"] == r1.proc.pid, "nobody touched it"
    refused(0, "dup0", r0)
    stop.touch()
    r0.assert_exit(0)
    said = r0.stderr().replace(str(tmp_path), "<tmp>").replace(sys.prefix, "<venv>")
    lease_lines = [ln for ln in said.splitlines() if "lease" in ln]  # not in a path
    assert not lease_lines, f"rank 0 complained about its lease: {lease_lines}"
    assert not remote.objects("ranks/0/lease.json"), "rank 0 released its lease"
    # Every manifest of rank 0 names only chunks the store has.
    have = set(remote.chunks()) | set(remote.trash())
    for key, m in remote.manifests(0):
        assert chunk_names(m) <= have, f"{key} names missing chunks"
