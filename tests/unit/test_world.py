"""Several ranks in one repository (ckpt_cli.world): global generations,
what each rank restores, retention, and the GC rounds that must never take
a chunk some rank's manifest names. Real repositories on a local directory
and on fsspec's memory:// store; one Snapshotter per rank."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ckpt_cli import world
from ckpt_cli.backends import Backend, NotFound
from ckpt_cli.errors import ConfigError
from ckpt_cli.manifest import Manifest, ManifestError
from ckpt_cli.repository import Repository, chunk_key, rank_stream, trash_key
from ckpt_cli.snapshotter import Snapshotter

from .helpers import CHUNK, data, write

Make = Callable[..., Snapshotter]


@pytest.fixture
def ranks(backend: Backend, tmp_path: Path, make_snapshotter: Make) -> Iterator[list[Snapshotter]]:
    """Two ranks of a world of 2 on one backend, each with its own dir."""
    out = []
    for r in range(2):
        repo = Repository(backend, chunk_size=CHUNK, stream=rank_stream(r, 2))
        out.append(make_snapshotter(repo, tmp_path / f"node{r}", rank=r, world_size=2))
    yield out


def commit(s: Snapshotter, step: int | None, files: dict[str, bytes]) -> Manifest:
    s.root.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        write(s.root / name, content, mtime_ns=1_600_000_000 * 10**9 + step_ns(step))
    pinned = s.pin()
    pinned.step = step
    result = s.snapshot(reason="commit", pinned=pinned)
    assert result.newest is not None
    return result.newest


def step_ns(step: int | None) -> int:
    return (step or 0) * 1000


def all_chunks_present(repo: Repository) -> None:
    """Every chunk every manifest names is in chunks/ (not only in trash/)."""
    present = repo.list_chunks()
    for _ref, m in world.World(repo).manifests():
        missing = m.chunk_digests() - present
        assert not missing, f"{m.id} (rank {m.rank}) names {len(missing)} chunks not in chunks/"


def test_newest_step_of_every_rank_is_chosen(ranks: list[Snapshotter]) -> None:
    r0, r1 = ranks
    weights = data(1, 3 * CHUNK)
    for step in (10, 20):
        commit(r0, step, {"w.bin": weights, "s.txt": b"0-%d" % step})
        commit(r1, step, {"w.bin": weights, "s.txt": b"1-%d" % step})
    commit(r0, 30, {"s.txt": b"0-30"})  # rank 1 never committed 30
    repo = r0.repo
    gens = world.World(repo).generations(repo.present_chunks())
    assert [g.step for g in gens] == [20, 10]
    for r in (0, 1):
        choice = world.choose(repo, r, 2)
        assert choice is not None and choice.consistent
        assert choice.step == 20 and choice.manifest is not None
        assert choice.manifest.rank == r and choice.manifest.step == 20


def test_identical_weights_are_stored_once(ranks: list[Snapshotter]) -> None:
    r0, r1 = ranks
    weights = data(2, 8 * CHUNK)
    commit(r0, 1, {"w.bin": weights})
    m1 = commit(r1, 1, {"w.bin": weights})
    assert m1.new_bytes == 0, "rank 1 found rank 0's chunks"
    stored = sum(len(r0.repo.backend.read(chunk_key(d))) for d in r0.repo.list_chunks())
    assert stored == len(weights)


def test_a_step_with_a_missing_chunk_is_not_complete(ranks: list[Snapshotter]) -> None:
    r0, r1 = ranks
    for step in (1, 2):
        commit(r0, step, {"w.bin": data(step, CHUNK)})
        commit(r1, step, {"w.bin": data(100 + step, CHUNK)})
    m = world.World(r1.repo).newest(rank_stream(1, 2))
    assert m is not None
    r1.repo.backend.delete(chunk_key(next(iter(m.chunk_digests()))))
    choice = world.choose(r0.repo, 0, 2)
    assert choice is not None and choice.step == 1


def test_without_steps_each_rank_restores_its_own_newest(ranks: list[Snapshotter]) -> None:
    r0, r1 = ranks
    commit(r0, None, {"a": b"0"})
    m1 = commit(r1, None, {"a": b"1"})
    choice = world.choose(r1.repo, 1, 2)
    assert choice is not None and not choice.consistent
    assert choice.manifest is not None and choice.manifest.id == m1.id
    assert "not a consistent cut" in choice.note


def test_a_world_of_another_size_is_refused_unless_allowed(ranks: list[Snapshotter]) -> None:
    r0, r1 = ranks
    commit(r0, 5, {"a": b"0"})
    commit(r1, 5, {"a": b"1"})
    with pytest.raises(ConfigError, match="--allow-world-change") as info:
        world.choose(r0.repo, 0, 3)
    assert "world of 2 ranks" in str(info.value)
    with pytest.raises(ConfigError, match="--allow-world-change"):
        world.choose(r0.repo, 0, 1)
    grown = [world.choose(r0.repo, r, 3, allow_change=True) for r in range(3)]
    assert [c.manifest.rank if c and c.manifest else None for c in grown] == [0, 1, None]


def _node(backend: Backend, root: Path, make: Make, rank: int, world_size: int) -> Snapshotter:
    repo = Repository(backend, chunk_size=CHUNK, stream=rank_stream(rank, world_size))
    return make(repo, root / f"w{world_size}-r{rank}", rank=rank, world_size=world_size)


@pytest.mark.parametrize("step", [None, 7], ids=["auto", "steps"])
@pytest.mark.parametrize(("old", "new"), [(1, 2), (2, 3), (2, 1), (3, 2), (3, 4)])
def test_a_changed_world_gives_old_ranks_their_files_and_new_ranks_nothing(
    backend: Backend, tmp_path: Path, make_snapshotter: Make, old: int, new: int, step: int | None
) -> None:
    """Rank r of the new world restores old rank r's newest (or its part of
    the step); a rank beyond the old world starts empty, also when the old
    world was one node (whose stream is the root, rank_stream(r, 1))."""
    for r in range(old):
        commit(_node(backend, tmp_path, make_snapshotter, r, old), step, {"a": b"old %d" % r})
    repo = Repository(backend, chunk_size=CHUNK)
    for r in range(new):
        choice = world.choose(repo, r, new, allow_change=True)
        assert choice is not None
        if r < old:
            assert choice.manifest is not None, (r, choice.note)
            assert (choice.manifest.rank, choice.manifest.world_size) == (r, old)
        else:
            assert choice.manifest is None and "starts empty" in choice.note, choice


def test_a_grown_world_never_restores_a_stale_stream_of_an_older_world(
    backend: Backend, tmp_path: Path, make_snapshotter: Make
) -> None:
    """3 ranks, then 2, then 3 again (auto snapshots): rank 2's stream still
    holds what it wrote in the first world of 3, which is not the state the
    job had last: it starts empty."""
    for r in range(3):
        commit(_node(backend, tmp_path, make_snapshotter, r, 3), None, {"a": b"first %d" % r})
    for r in range(2):
        commit(_node(backend, tmp_path, make_snapshotter, r, 2), None, {"a": b"then %d" % r})
    repo = Repository(backend, chunk_size=CHUNK)
    choice = world.choose(repo, 2, 3, allow_change=True)
    assert choice is not None and choice.manifest is None, choice
    choice = world.choose(repo, 1, 3, allow_change=True)
    assert choice is not None and choice.manifest is not None
    assert choice.manifest.world_size == 2


def test_retention_keeps_the_newest_complete_steps_and_what_is_newer(
    ranks: list[Snapshotter],
) -> None:
    r0, r1 = ranks
    for step in range(1, 6):
        commit(r0, step, {"w": data(step, CHUNK)})
        if step < 5:
            commit(r1, step, {"w": data(50 + step, CHUNK)})
    w = world.World(r0.repo)
    whole = r0.repo.judge(w.loaded(), r0.repo.present_chunks())
    kept, dropped = world.retention(w, 2, whole)
    steps = {ref.key: m.step for ref, m in w.manifests() if ref.key in {k.key for k in kept}}
    assert sorted(s for s in steps.values() if s is not None) == [3, 3, 4, 4, 5]
    assert all(ref.key not in steps for ref in dropped)


def test_only_rank_zero_prunes(ranks: list[Snapshotter]) -> None:
    r0, r1 = ranks
    for step in range(1, 6):
        commit(r0, step, {"w": data(step, CHUNK)})
        commit(r1, step, {"w": data(50 + step, CHUNK)})
    before = {r: len(r1.repo.snapshots(rank_stream(r, 2))) for r in (0, 1)}
    r1.prune(1)
    assert {r: len(r1.repo.snapshots(rank_stream(r, 2))) for r in (0, 1)} == before
    r0.prune(1)
    assert {r: len(r0.repo.snapshots(rank_stream(r, 2))) for r in (0, 1)} == {0: 1, 1: 1}
    all_chunks_present(r0.repo)


def test_gc_waits_for_a_live_rank_and_puts_back_what_it_named(
    ranks: list[Snapshotter],
) -> None:
    """The race: rank 0 takes chunk X out (only dropped manifests name it)
    while rank 1, which has X in its cache from before, names X in a new
    manifest. The round must wait for rank 1 and then put X back."""
    r0, r1 = ranks
    old = data(7, 2 * CHUNK)
    lease = r1.repo.lease("rank-1", ttl=60.0)
    lease.acquire()
    try:
        commit(r0, 1, {"w": old})
        commit(r1, 1, {"w": old})  # rank 1's cache now knows old's chunks
        for step in (2, 3):
            commit(r0, step, {"w": data(step, 2 * CHUNK)})
            commit(r1, step, {"w": data(60 + step, 2 * CHUNK)})
        r0.prune(1)  # drops steps 1 and 2: old's chunks go to trash/
        trashed = r0.repo.backend.list("trash/")
        assert trashed, "the round moved chunks to trash/"
        # Rank 1 has not seen the round: its cache still says old exists.
        stale = set(r1.repo._known_chunks())
        assert any(k.rsplit("/", 1)[-1] in stale for k in trashed)
        # A snapshot that started before the round (it does not see it) names
        # old's chunks from the stale cache; rank 0 prunes again while that
        # snapshot is in flight, just before its manifest is written.
        r1.may_write = lambda: r0.prune(1)
        named = _snapshot_without_seeing_rounds(r1, 4, {"w": old})
        r1.may_write = lambda: None
        assert named.chunk_digests() <= stale
        assert set(r0.repo.backend.list("trash/")) == set(trashed), "the round waited"
        commit(r1, 5, {"w": old, "more": b"x"})  # sees the round now
        r0.prune(1)  # every live rank caught up: the round ends
        assert [(r.seq, r.done) for r in world.rounds(r0.repo)][:1] == [(1, True)]
        assert named.chunk_digests() <= r0.repo.list_chunks(), "put back from trash/"
    finally:
        lease.release()
    all_chunks_present(r0.repo)
    # every kept manifest of rank 1 restores whole
    for ref, m in world.World(r0.repo).manifests(rank_stream(1, 2)):
        for d in m.chunk_digests():
            r0.repo.get_chunk(d)
        del ref


def _snapshot_without_seeing_rounds(s: Snapshotter, step: int, files: dict[str, bytes]) -> Manifest:
    saved = world.see_rounds
    world.see_rounds = lambda repo, seen: seen  # type: ignore[assignment]
    try:
        return commit(s, step, files)
    finally:
        world.see_rounds = saved  # type: ignore[assignment]


def test_a_dead_rank_does_not_hold_a_round_open(ranks: list[Snapshotter]) -> None:
    r0, r1 = ranks
    for step in (1, 2, 3):
        commit(r0, step, {"w": data(step, CHUNK)})
        commit(r1, step, {"w": data(70 + step, CHUNK)})
    r0.prune(1)
    assert r0.repo.backend.list("trash/")
    r0.prune(1)  # rank 1 holds no lease: nothing can be behind
    assert not r0.repo.backend.list("trash/")
    assert [(r.seq, r.done, r.chunks) for r in world.rounds(r0.repo)] == [(1, True, ())]
    all_chunks_present(r0.repo)


def test_round_numbers_are_never_used_twice(ranks: list[Snapshotter]) -> None:
    """A finished round leaves its number behind: a rank that saw round 1
    must not take the next round for one it has seen (its cache would still
    name the chunks that round deletes)."""
    r0, r1 = ranks
    lease = r1.repo.lease("rank-1", ttl=60.0)
    lease.acquire()
    try:
        for step in (1, 2, 3):
            commit(r0, step, {"w": data(step, CHUNK)})
            commit(r1, step, {"w": data(80 + step, CHUNK), "c": data(90, CHUNK)})
        r0.prune(1)  # round 1: steps 1 and 2 go
        commit(r1, 4, {"w": data(84, CHUNK), "c": data(90, CHUNK)})  # rank 1 sees round 1
        r0.prune(1)  # round 1 ends (rank 1 saw it); nothing new to take
        assert [(r.seq, r.done) for r in world.rounds(r0.repo)] == [(1, True)]
        commit(r0, 4, {"w": data(4, CHUNK)})
        r0.prune(1)  # step 3 goes: round 2, not round 1 again
        assert [(r.seq, r.done) for r in world.rounds(r0.repo)] == [(1, True), (2, False)]
        assert r1.gc_seen == 1
        # rank 1 has not seen round 2: a snapshot of it now forgets its chunks
        commit(r1, 5, {"w": data(83, CHUNK), "c": data(90, CHUNK)})  # step 3's bytes again
        assert r1.gc_seen == 2
        m5 = world.World(r0.repo).newest(rank_stream(1, 2))
        assert m5 is not None and m5.chunk_digests() <= r1.repo.list_chunks(), "uploaded again"
        commit(r0, 5, {"w": data(5, CHUNK)})
        r0.prune(1)
    finally:
        lease.release()
    all_chunks_present(r0.repo)
    records = world.rounds(r0.repo)
    assert records and all(r.done for r in records[:-1]) and len(records) <= 2, records


def test_restore_reads_a_chunk_from_trash(ranks: list[Snapshotter]) -> None:
    r0, _r1 = ranks
    m = commit(r0, 1, {"w": data(3, CHUNK)})
    d = next(iter(m.chunk_digests()))
    r0.repo.backend.rename(chunk_key(d), trash_key(d))
    assert r0.repo.get_chunk(d, CHUNK) == data(3, CHUNK)
    r0.repo.backend.delete(trash_key(d))
    with pytest.raises(Exception, match="missing"):
        r0.repo.get_chunk(d, CHUNK)


def test_single_node_gc_keeps_chunks_a_rank_names(backend: Backend, tmp_path: Path,
                                                  make_snapshotter: Make) -> None:  # fmt: skip
    rank = make_snapshotter(
        Repository(backend, chunk_size=CHUNK, stream=rank_stream(1, 2)),
        tmp_path / "n1",
        rank=1,
        world_size=2,
    )
    m = commit(rank, 1, {"w": data(9, CHUNK)})
    single = Repository(backend, chunk_size=CHUNK)
    single.gc(1, sweep=True)
    assert m.chunk_digests() <= single.list_chunks()


def test_manifest_fields_round_trip_and_are_checked() -> None:
    m = Manifest("0123abcd", 3, (), CHUNK, 1.0, step=1200, rank=1, world_size=2, gc_seen=4)
    back = Manifest.from_bytes(m.to_bytes(), m.key)
    assert (back.step, back.rank, back.world_size, back.gc_seen) == (1200, 1, 2, 4)
    bad = m.to_bytes().replace(b'"step":1200', b'"step":-1')
    with pytest.raises(ManifestError, match="step"):
        Manifest.from_bytes(bad, m.key)


def test_rename_of_a_missing_object_is_not_found(backend: Backend) -> None:
    with pytest.raises(NotFound):
        backend.rename("chunks/aa/nothing", "trash/aa/nothing")
    backend.write("a/b", b"x")
    backend.rename("a/b", "c/d")
    assert backend.read("c/d") == b"x"
    with pytest.raises(NotFound):
        backend.read("a/b")
