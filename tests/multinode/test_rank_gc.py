"""Retention and garbage collection with several ranks on one remote (a
directory, or the S3 test server), with real supervisors:

- only rank 0 prunes: a lone rank 1 with --keep deletes nothing; rank 0
  deletes rank 1's manifests older than the kept steps; every kept step
  restores on every rank, `ckpt verify` passes, and what is left in trash/ is
  named by no manifest;
- the race GC must not lose: rank 1 uploads new chunks (and names again
  chunks only pruned manifests named) while rank 0 prunes after every one of
  its commits; every manifest of rank 1 that is kept restores;
- a GC round's trash waits for a live rank that has not seen the round, and
  ends once it has; a restore reads chunks that wait in trash/.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from integration._util import wait_for

from .conftest import (
    DEADLINE,
    Cluster,
    Remote,
    assert_restored,
    assert_verified,
    chunk_names,
    expected_files,
    tree_digests,
    weights,
)

pytestmark = pytest.mark.timeout(240)

#: Every rank keeps 2 steps and snapshots only on commits (no quiet-period
#: snapshot without a step between them).
KEEP = ("--keep", "2", "--snapshots", "commit")
SIZE = 256 * 1024
#: Rank 1's cycle.bin comes back to the same bytes every PERIOD steps.
PERIOD = 4
#: What rank 1 writes (Cluster.start and expected_files take the same keywords).
RANK1 = {"size": SIZE, "period": PERIOD, "period_size": SIZE}


def _layout(remote: Remote) -> set[str]:
    """Every object a prune could delete: manifests, chunks, trash, GC rounds."""
    prunable = ("chunks/", "trash/", "gc/")
    return {k for k in remote.objects() if k.startswith(prunable) or "/snapshots/" in k}


def _snapshot_id(key: str) -> str:
    """ranks/<r>/snapshots/<gen>-<id>.json -> <id>."""
    return key.rsplit("/", 1)[-1].removesuffix(".json").split("-", 1)[1]


def _restores(
    remote: Remote, tmp_path: Path, rank: int, key: str, m: dict[str, Any], **content: int
) -> None:
    """Rank's manifest `key` restores (by id) to exactly its files of m's step."""
    dest = tmp_path / "restores" / f"r{rank}-{_snapshot_id(key)}"
    res = remote.restore(dest, rank, 2, "--snapshot", _snapshot_id(key))
    assert res.returncode == 0, (
        f"restore of rank {rank}'s {key} (step {m.get('step')}):\n{res.stderr}"
    )
    assert tree_digests(dest) == expected_files(rank, m["step"], **content), key


def _referenced(remote: Remote) -> set[str]:
    names: set[str] = set()
    for rank in (0, 1):
        for _key, m in remote.manifests(rank):
            names |= chunk_names(m)
    return names


def test_only_rank_0_prunes_and_every_kept_step_restores(
    cluster: Cluster, remote: Remote, tmp_path: Path
) -> None:
    """--keep 2 on both ranks, 12 steps; rank 1 commits fast, rank 0 slowly
    and waits before step 11 until rank 1 has finished.
    A: when rank 1 ends, more than 2 of its manifests are left (it prunes
       nothing itself); rank 0 goes on and deletes rank 1's manifests older
       than the kept steps: rank 1 keeps steps 11, 12, like rank 0.
    B: rank 1 alone (steps 13..16, --keep 2) deletes no object at all and
       starts no GC round.
    C, D: rank 0 alone twice more (steps 13, 14; then 15): the kept steps are
       14, 15 and rank 1 keeps its manifests from step 14 on.
    Then every kept step restores on both ranks (by id and by default), rank
    1's step 16 too, `ckpt verify` passes, and trash/ holds no chunk that a
    manifest names."""
    r1 = cluster.start(1, 2, label="a", steps=12, sleep=0, flags=KEEP, **RANK1)
    r0 = cluster.start(0, 2, label="a", steps=12, sleep=0.1, flags=KEEP, size=SIZE, gates=(11,))
    r1.assert_exit(0)
    r0.mark("at-11")
    left = remote.steps(1)
    assert {10, 11, 12} <= set(left) and len(left) > 2, left
    r0.open("step-11")
    r0.assert_exit(0)
    assert remote.steps(1) == [11, 12], remote.steps(1)
    assert remote.steps(0) == [11, 12], remote.steps(0)
    assert remote.ls()["complete_steps"] == [12, 11]

    before, rounds = _layout(remote), set(remote.objects("gc/"))
    b1 = cluster.start(1, 2, label="b", steps=16, sleep=0, flags=KEEP, **RANK1)
    assert_restored(b1.started(), 1, 2, 12, **RANK1)
    b1.assert_exit(0)
    assert "ckpt: rank 1 of 2" in b1.stderr()
    gone = before - _layout(remote)
    assert not gone, f"a lone rank 1 deleted {sorted(gone)[:10]}"
    assert set(remote.objects("gc/")) == rounds, "rank 1 started a GC round"
    assert remote.steps(1) == [11, 12, 13, 14, 15, 16], remote.steps(1)

    c0 = cluster.start(0, 2, label="c", steps=14, sleep=0, flags=KEEP, size=SIZE)
    assert_restored(c0.started(), 0, 2, 12, size=SIZE)
    c0.assert_exit(0)
    assert remote.steps(0) == [13, 14], remote.steps(0)
    assert remote.steps(1) == [13, 14, 15, 16], remote.steps(1)

    d0 = cluster.start(0, 2, label="d", steps=15, sleep=0, flags=KEEP, size=SIZE)
    assert_restored(d0.started(), 0, 2, 14, size=SIZE)
    d0.assert_exit(0)
    assert remote.steps(0) == [14, 15], remote.steps(0)
    assert remote.steps(1) == [14, 15, 16], remote.steps(1)

    doc = remote.ls("--rank", "1")
    assert doc["complete_steps"] == [15, 14], doc["complete_steps"]
    for rank in (0, 1):
        content = RANK1 if rank == 1 else {"size": SIZE}
        for key, m in remote.manifests(rank):
            _restores(remote, tmp_path, rank, key, m, **content)
    dest = tmp_path / "newest-r1"
    res = remote.restore(dest, 1, 2)
    assert res.returncode == 0, res.stderr
    assert tree_digests(dest) == expected_files(1, 15, **RANK1), "the default: newest complete"

    assert_verified(remote)

    referenced, chunks, trash = _referenced(remote), set(remote.chunks()), set(remote.trash())
    print(
        f"\n[gc {remote.kind}] after the last rank-0 run: {len(chunks)} chunks, "
        f"{len(trash)} in trash/, {len(remote.objects('gc/'))} GC round(s) left"
    )
    assert not referenced & trash, "trash/ holds chunks that kept manifests name"
    assert referenced <= chunks, "kept manifests name chunks that are not in chunks/"


def test_rank0_prunes_while_rank1_uploads_new_chunks(
    cluster: Cluster, remote: Remote, tmp_path: Path
) -> None:
    """Rank 1 commits 16 steps back to back, each with a new 1 MiB weights
    chunk and a cycle.bin that names again, every 4 steps, a chunk only
    pruned manifests named. Rank 0 (--keep 2) commits each step as soon as
    rank 1 has started uploading it, and prunes after every commit: its GC
    lists chunks/ while rank 1's new chunks have no manifest yet. No commit of
    rank 1 fails, and every manifest of rank 1 still kept restores byte for
    byte (as does every kept complete step on both ranks); `ckpt verify`
    passes; no kept manifest names a chunk that is in neither chunks/ nor
    trash/."""
    steps, mib = 16, 1024 * 1024
    rank1 = {"size": mib, "period": PERIOD, "period_size": mib}
    r1 = cluster.start(1, 2, label="race", steps=steps, sleep=0, flags=KEEP, **rank1)
    r0 = cluster.start(
        0, 2, label="race", steps=steps, sleep=0, flags=KEEP, size=16 * 1024, pace=r1.ctl
    )
    r1.assert_exit(0)
    r0.assert_exit(0)
    for node in (r0, r1):
        assert "snapshot failed" not in node.stderr(), node.stderr()

    doc = remote.ls()
    assert doc["complete_steps"][0] == steps, doc["complete_steps"]
    # Rank 0 pruned: it committed step S only after rank 1 had committed S-1,
    # so its last retention kept at most steps S-2..S of every rank.
    kept1 = remote.manifests(1)
    assert kept1 and kept1[-1][1]["step"] == steps
    assert set(remote.steps(1)) <= {steps - 2, steps - 1, steps}, remote.steps(1)
    assert set(remote.steps(0)) <= {steps - 2, steps - 1, steps}, remote.steps(0)
    for key, m in kept1:
        _restores(remote, tmp_path, 1, key, m, **rank1)
    for step in doc["complete_steps"]:
        key, m = remote.manifest_of(0, step)
        _restores(remote, tmp_path, 0, key, m, size=16 * 1024)

    referenced, chunks, trash = _referenced(remote), set(remote.chunks()), set(remote.trash())
    print(
        f"\n[gc race {remote.kind}] rank 1 kept steps {[m['step'] for _k, m in kept1]}; "
        f"{len(chunks)} chunks, {len(trash)} in trash/ ({len(referenced & trash)} of them "
        f"named by kept manifests), {len(remote.objects('gc/'))} GC round(s)"
    )
    missing = referenced - chunks - trash
    assert not missing, f"kept manifests name {len(missing)} chunks the store lost"
    assert_verified(remote)


def test_trash_waits_for_a_live_rank_that_has_not_seen_the_round(
    cluster: Cluster, remote: Remote, tmp_path: Path
) -> None:
    """A GC round's trash waits for every live rank, also after earlier rounds
    have ended. Steps are gated so the order is fixed:
    - an orphan chunk (a killed upload's) is in chunks/: rank 0's first prune
      (a full sweep) makes round A of it; rank 1 sees A at its step 2 and
      rank 0's prune after step 3 ends A (no round is open any more);
    - rank 1 commits step 3 and idles before step 4, its lease live; rank 0
      commits 4..8: step 1 is dropped, a new round B takes the chunks only
      step 1 named (the weights of step 1, and rank 1's cycle.bin of step 1)
      to trash/, and they stay there through rank 0's prunes after 5..7:
      rank 1 has not seen B;
    - rank 1 commits 4 and 5 (its cycle.bin of step 4 has the bytes of step
      1's again: it must upload them again, not name the trashed chunk from
      its cache) and keeps running; rank 0 commits 9 and B ends: step 1's
      weights are gone from trash/ and chunks/.
    Every manifest of rank 1 restores byte for byte; `ckpt verify` passes."""
    from ckpt_cli.manifest import hash_bytes

    period = 3  # cycle.bin of step 4 == cycle.bin of step 1
    rank1 = {"size": SIZE, "period": period, "period_size": SIZE}
    orphan = random.Random("orphan").randbytes(4096)
    digest = hash_bytes(orphan)  # new repositories hash with blake3 (ckpt.json)
    remote.put(f"chunks/{digest[:2]}/{digest}", orphan)

    r1 = cluster.start(1, 2, label="a", steps=5, flags=KEEP, gates=(2, 3, 4), finish=True, **rank1)
    r0 = cluster.start(0, 2, label="a", steps=9, flags=KEEP, size=SIZE, gates=(2, 3, 4, 9))
    r0.mark("at-2")
    r1.mark("at-2")
    r0.open("step-2")
    r0.mark("committed-2")  # rank 0's first prune (after step 1, a sweep) is done
    r1.open("step-2")
    r1.mark("committed-2")  # rank 1 read the rounds before its step 2
    r0.open("step-3")
    r0.mark("committed-3")
    r1.open("step-3")
    r1.mark("at-4")  # rank 1 committed 3 and idles, holding its lease
    r0.open("step-4")
    r0.mark("at-9")  # rank 0 committed 4..8: its prunes after 3..7 are done

    hash_name = remote.read_json("ckpt.json")["hash"]
    w1 = hash_bytes(weights(1, SIZE), hash_name)
    assert digest not in remote.chunks() and digest not in remote.trash(), "the orphan stays"
    assert 1 not in remote.steps(0) + remote.steps(1), "step 1 was not dropped"
    assert remote.objects("ranks/1/lease.json"), "rank 1's lease"
    problems = []
    if w1 not in remote.trash():
        where = "chunks/" if w1 in remote.chunks() else "neither chunks/ nor trash/"
        problems.append(
            f"step 1's weights are in {where} while rank 1 (live, idle since step 3) has not "
            f"seen the round that took them; GC rounds now: {sorted(remote.objects('gc/'))}; "
            f"rank 1's gc_seen: {[m.get('gc_seen') for _k, m in remote.manifests(1)]}"
        )

    r1.open("step-4")
    r1.mark("done")  # committed 4 and 5, having read the round; still running
    r0.open("step-9")
    wait_for(
        lambda: w1 not in remote.trash(),
        what="the round to end once rank 1 saw it",
        timeout=DEADLINE,
        proc=r0.proc,
    )
    assert w1 not in remote.chunks(), "an unreferenced chunk was put back"
    assert r1.proc.proc.poll() is None, "rank 1 ended: its lease no longer held the round"
    r0.assert_exit(0)
    r1.finish()
    r1.assert_exit(0)
    for key, m in remote.manifests(1):
        try:
            _restores(remote, tmp_path, 1, key, m, **rank1)
        except AssertionError as exc:
            problems.append(f"a committed manifest of rank 1 does not restore: {exc}")
    try:
        assert_verified(remote)
    except AssertionError as exc:
        problems.append(str(exc))
    assert not problems, "\n\n".join(problems)


def test_a_restore_reads_chunks_waiting_in_trash(
    cluster: Cluster, remote: Remote, tmp_path: Path
) -> None:
    """Every chunk of rank 1's step 2 is moved to trash/ by hand (as a GC round
    in progress leaves them): step 2 is still complete, `ckpt restore --rank 1`
    and a replacement `ckpt run` of rank 1 restore it byte for byte, and
    `ckpt verify` passes."""
    for rank in (0, 1):
        cluster.start(rank, 2, label="w", steps=2, sleep=0, size=SIZE).assert_exit(0)
    _key, m = remote.manifest_of(1, 2)
    moved = sorted(chunk_names(m))
    for digest in moved:
        remote.move(f"chunks/{digest[:2]}/{digest}", f"trash/{digest[:2]}/{digest}")
    assert set(moved) <= set(remote.trash()) and not set(moved) & set(remote.chunks())

    assert remote.ls()["complete_steps"][0] == 2
    dest = tmp_path / "restored-r1"
    res = remote.restore(dest, 1, 2)
    assert res.returncode == 0, res.stderr
    assert tree_digests(dest) == expected_files(1, 2, size=SIZE)
    node = cluster.start(1, 2, label="again", steps=2, size=SIZE)
    assert_restored(node.started(), 1, 2, 2, size=SIZE)
    node.assert_exit(0)
    assert_verified(remote)
