"""Data-loss guards of retention, through the real binary: retention counts
restorable snapshots only (the manifest parses and every chunk it names is in
the store), a damaged snapshot never displaces a whole one, and `ckpt gc
--dry-run` says exactly what `ckpt gc` then does.

- One node, on file:// and S3 (moto): generation 1 whole, generation 2
  missing a chunk. `gc --keep 1`, dry and real, drops nothing (2 is kept for
  inspection, 1 is the only restorable one); once a whole generation 3
  exists, both go, and the run deletes exactly what the dry run named.
- The snapshot thread of `ckpt run --keep 1`: a chunk of the restored
  snapshot is deleted behind ckpt's back while the child runs, so the run's
  own snapshot names a missing chunk: the older whole snapshot is kept.
- Several ranks: steps 5 and 10 complete, step 20 missing a chunk on rank 1.
  `gc --keep 1` drops step 5 only and its dry run says so (it said "would
  drop 0" and the run then dropped step 10); rank 0's own retention in
  `ckpt run --keep 1` keeps step 10 too; every rank restores step 10 after.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from integration._util import PY, write_script
from stores import Store

from ._io import Objects, ckpt, warnings
from ._tally import record

pytestmark = pytest.mark.timeout(240)

KIND = "data-loss guard: retention"


def _ok(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    res = ckpt(args, cwd=cwd, env=env)
    assert res.returncode == 0, f"ckpt {' '.join(args)} exited {res.returncode}:\n{res.stderr}"
    return res.stdout


def _gc(url: str, keep: int, cwd: Path, env: dict[str, str], *, dry: bool) -> dict[str, Any]:
    args = ["gc", url, "--keep", str(keep), "--json", *(["--dry-run"] if dry else [])]
    doc: dict[str, Any] = json.loads(_ok(args, cwd, env))
    return doc


def _same(dry: dict[str, Any], real: dict[str, Any]) -> None:
    """A dry run's report and the run's, but for the dry_run field."""
    assert dry.pop("dry_run") is True and real.pop("dry_run") is False
    assert dry == real, f"the dry run said\n{dry}\nthe run did\n{real}"


def _gens(refs: list[dict[str, Any]]) -> list[int]:
    return sorted(r["generation"] for r in refs)


def _chunk_of(doc: dict[str, Any], path: str) -> str:
    entry = next(e for e in doc["entries"] if e["path"] == path)
    digest: str = entry["chunks"][0]
    return digest


def _chunk_key(digest: str) -> str:
    return f"chunks/{digest[:2]}/{digest}"


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- one node


@pytest.mark.parametrize("kind", ["file", "s3-moto"])
def test_gc_never_drops_the_only_restorable_snapshot(
    kind: str, store_of: Callable[[str], Store], tmp_path: Path
) -> None:
    """Injected: generation 2's own chunk deleted from the remote (generation
    1 whole). Asserted: `ckpt gc --keep 1` and its dry run drop nothing and
    delete nothing; a restore gives generation 1. After a whole generation
    3: the dry run names generations 1 and 2 and one chunk, the run deletes
    exactly those objects, and generation 3 restores without a warning."""
    store = store_of(kind)
    url, env = store.url, store.env
    objects = Objects(url, store.storage_options)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"state one\n")
    _ok(["push", str(src), url], tmp_path, env)
    (src / "b.bin").write_bytes(b"only in generation 2\n" * 50)
    _ok(["push", str(src), url], tmp_path, env)
    first, second = objects.manifests()
    old_a = _chunk_key(_chunk_of(json.loads(objects.read(first)), "a.txt"))
    objects.delete(_chunk_key(_chunk_of(json.loads(objects.read(second)), "b.bin")))
    before = objects.state()

    dry = _gc(url, 1, tmp_path, env, dry=True)
    assert objects.state() == before, "the dry run changed the remote"
    real = _gc(url, 1, tmp_path, env, dry=False)
    assert {k: v for k, v in objects.state().items() if k != "lease.json"} == before
    assert (dry["dropped"], dry["chunks"], _gens(dry["kept"])) == ([], 0, [1, 2]), dry
    _same(dry, real)
    res = ckpt(["restore", url, str(tmp_path / "out1")], cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    assert _files(tmp_path / "out1") == {"a.txt": b"state one\n"}
    assert len(warnings(res.stderr)) == 1 and second.split("-")[1][:8] in res.stderr
    assert f"suspect/{second}" in objects.state(), "the restore marks what it found damaged"

    (src / "a.txt").write_bytes(b"state three\n")
    _ok(["push", str(src), url], tmp_path, env)  # --keep 3: nothing dropped yet
    assert len(objects.manifests()) == 3
    before = objects.state()
    dry = _gc(url, 1, tmp_path, env, dry=True)
    assert objects.state() == before, "the dry run changed the remote"
    assert (_gens(dry["dropped"]), _gens(dry["kept"]), dry["chunks"]) == ([1, 2], [3], 1), dry
    real = _gc(url, 1, tmp_path, env, dry=False)
    gone = set(before) - set(objects.state())
    assert gone == {first, second, old_a, f"suspect/{second}"}, gone
    _same(dry, real)
    res = ckpt(["restore", url, str(tmp_path / "out3")], cwd=tmp_path, env=env)
    assert res.returncode == 0 and not warnings(res.stderr), res.stderr
    assert _files(tmp_path / "out3") == _files(src)
    record(KIND, 2, where=kind, path="ckpt gc")


RUN_CHILD = """
    import os, sys
    from pathlib import Path
    Path(sys.argv[1]).unlink()  # behind ckpt's back: a chunk of the restored snapshot
    d = Path(os.environ["CKPT_DIR"])
    (d / "c.txt.tmp").write_text("written by the run")
    os.replace(d / "c.txt.tmp", d / "c.txt")
"""


def test_the_snapshot_thread_keeps_the_only_restorable_snapshot(tmp_path: Path) -> None:
    """Injected: while `ckpt run --keep 1` runs, the chunk of b.bin (which
    generation 2, restored at start, names; generation 1 does not) is
    deleted from the remote; the run's snapshot (generation 3) names it
    again from its stat cache. Asserted: the run's retention keeps
    generation 1, the only restorable snapshot, and a restore afterwards
    falls back to it with a warning for each damaged one."""
    remote = tmp_path / "remote"
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"state one\n")
    _ok(["push", str(src), str(remote)], tmp_path)
    (src / "b.bin").write_bytes(b"only in generation 2 and later\n" * 50)
    # An hour old: a file modified within a second of the run's start is not
    # trusted from the stat cache (the racy-git rule), and the run would read
    # b.bin again and upload its chunk anew (a whole generation 3, rightly
    # kept instead of 1): on a fast machine the test then tested nothing.
    hour_ago = time.time() - 3600
    for name in ("a.txt", "b.bin"):
        os.utime(src / name, (hour_ago, hour_ago))
    _ok(["push", str(src), str(remote)], tmp_path)
    m2 = sorted((remote / "snapshots").glob("*.json"))[-1]
    chunk = remote / _chunk_key(_chunk_of(json.loads(m2.read_bytes()), "b.bin"))
    child = write_script(tmp_path / "child.py", RUN_CHILD)

    ck = tmp_path / "ck"
    run = ["run", "--dir", str(ck), "--remote", str(remote), "--keep", "1"]
    res = ckpt([*run, "--debounce", "0.2", "--", PY, str(child), str(chunk)], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert not chunk.exists()

    generations = sorted(int(p.name[:10]) for p in (remote / "snapshots").glob("*.json"))
    assert generations[0] == 1, f"generation 1 was dropped: {generations}"
    res = ckpt(["restore", str(remote), str(tmp_path / "out")], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert _files(tmp_path / "out") == {"a.txt": b"state one\n"}
    assert len(warnings(res.stderr)) == len(generations) - 1, res.stderr
    record(KIND, 1, path="ckpt run --keep 1")


# ---------------------------------------------------------------- several ranks

STEPS_CHILD = """
    import os, subprocess, sys
    from pathlib import Path
    d = Path(os.environ["CKPT_DIR"])
    rank = os.environ["CKPT_RANK"]

    def save(name, data):
        (d / (name + ".tmp")).write_bytes(data)
        os.replace(d / (name + ".tmp"), d / name)

    for step in sys.argv[1:]:
        save("shard.bin", f"rank {rank} at step {step}\\n".encode() * 64)
        save("weights.bin", f"weights at step {step}\\n".encode() * 64)
        subprocess.run([os.environ["CKPT_BIN"], "commit", "--step", step], check=True)
"""


def _rank_run(tmp_path: Path, remote: Path, rank: int, steps: list[int], *extra: str) -> list[str]:
    child = write_script(tmp_path / "steps.py", STEPS_CHILD)
    return [
        "run",
        "--dir",
        str(tmp_path / f"ck-r{rank}-{'-'.join(map(str, steps))}"),
        "--remote",
        str(remote),
        "--rank",
        str(rank),
        "--world-size",
        "2",
        "--snapshots",
        "commit",
        *extra,
        "--",
        PY,
        str(child),
        *map(str, steps),
    ]


def _rank_manifests(remote: Path, rank: int) -> dict[int, Path]:
    """Rank's manifests by step."""
    out = {}
    for p in sorted((remote / "ranks" / str(rank) / "snapshots").glob("*.json")):
        out[json.loads(p.read_bytes())["step"]] = p
    return out


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file:// remote where ranks 0 and 1 of 2 committed steps 5, 10 and
    20, and the chunk of rank 1's shard at step 20 is gone (made once)."""
    root = tmp_path_factory.mktemp("three-steps")
    env = {"HOME": str(root / "home"), "XDG_STATE_HOME": str(root / "home" / "state")}
    remote = root / "remote"
    for rank in (0, 1):
        res = ckpt(_rank_run(root, remote, rank, [5, 10, 20], "--keep", "9"), cwd=root, env=env)
        assert res.returncode == 0, res.stderr
    m20 = json.loads(_rank_manifests(remote, 1)[20].read_bytes())
    (remote / _chunk_key(_chunk_of(m20, "shard.bin"))).unlink()
    return remote


@pytest.fixture
def ranks_remote(three_steps: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "remote"
    shutil.copytree(three_steps, dest)
    return dest


def _restores_step(remote: Path, tmp_path: Path, step: int) -> None:
    for rank in (0, 1):
        out = tmp_path / f"restored-r{rank}"
        args = ["restore", str(remote), str(out), "--rank", str(rank), "--world-size", "2"]
        res = ckpt(args, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        assert (out / "shard.bin").read_bytes() == f"rank {rank} at step {step}\n".encode() * 64


def test_gc_of_ranks_keeps_the_newest_complete_step_and_its_dry_run_says_so(
    ranks_remote: Path, tmp_path: Path
) -> None:
    """Injected: step 20 misses a chunk on rank 1 (steps 5 and 10 whole).
    Asserted: `ckpt gc --keep 1 --dry-run` names the two manifests of step 5
    and deletes nothing; `ckpt gc --keep 1` reports the same and deletes
    exactly those; steps 10 and 20 stay on both ranks; both ranks restore
    step 10."""
    remote = ranks_remote
    url = str(remote)
    before = {p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file()}
    step5 = {_rank_manifests(remote, r)[5].relative_to(remote).as_posix() for r in (0, 1)}

    dry = _gc(url, 1, tmp_path, {}, dry=True)
    now = {p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file()}
    assert now == before, "the dry run changed the remote"
    assert len(dry["dropped"]) == 2, dry
    real = _gc(url, 1, tmp_path, {}, dry=False)
    after = {p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file()}
    gone_manifests = {k for k in before - after if "/snapshots/" in k}
    assert gone_manifests == step5
    gone_chunks = {k for k in before - after if k.startswith(("chunks/", "trash/"))}
    assert len(gone_chunks) == real["chunks"], (gone_chunks, real)
    _same(dry, real)
    for rank in (0, 1):
        assert sorted(_rank_manifests(remote, rank)) == [10, 20]
    _restores_step(remote, tmp_path, 10)
    record(KIND, 1, path="ckpt gc, several ranks")


def test_gc_of_ranks_reads_back_the_step_it_keeps_in_place_of_others(
    ranks_remote: Path, tmp_path: Path
) -> None:
    """Injected: rank 1's chunk of step 20 is there but empty (steps 5 and
    10 whole). Asserted: `ckpt gc --keep 1` and its dry run keep step 10 on
    both ranks (step 20 does not read back whole, so it does not count) and
    drop step 5 only; both ranks restore step 10. It kept step 20 alone."""
    remote = ranks_remote
    m20 = json.loads(_rank_manifests(remote, 1)[20].read_bytes())
    (remote / _chunk_key(_chunk_of(m20, "shard.bin"))).write_bytes(b"")
    url = str(remote)
    dry = _gc(url, 1, tmp_path, {}, dry=True)
    real = _gc(url, 1, tmp_path, {}, dry=False)
    _same(dry, real)
    assert len(real["damaged"]) == 1, real  # rank 1's part of step 20, marked suspect
    for rank in (0, 1):
        assert sorted(_rank_manifests(remote, rank)) == [10, 20]
    _restores_step(remote, tmp_path, 10)
    record(KIND, 1, path="ckpt gc, several ranks")


def test_rank_0s_retention_keeps_the_newest_complete_step(
    ranks_remote: Path, tmp_path: Path
) -> None:
    """Injected: step 20 misses a chunk on rank 1 (steps 5 and 10 whole).
    Rank 0 runs again with --keep 1 and commits step 30. Asserted: its
    retention keeps step 10 on both ranks (the newest complete one; it
    dropped it when step 20 counted), and both ranks restore step 10."""
    remote = ranks_remote
    res = ckpt(_rank_run(tmp_path, remote, 0, [30], "--keep", "1"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert 10 in _rank_manifests(remote, 0) and 10 in _rank_manifests(remote, 1)
    _restores_step(remote, tmp_path, 10)
    record(KIND, 1, path="ckpt run --keep 1, rank 0")


# ------------------------------------------------- what gc takes for whole


def _two_generations(store: Store, tmp_path: Path) -> tuple[Objects, Path, str, dict[str, Any]]:
    """Two pushes of src/a.txt to the store, generation 2's content its own:
    (the store's objects, src, generation 2's manifest key, its document)."""
    objects = Objects(store.url, store.storage_options)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"state one\n")
    _ok(["push", str(src), store.url], tmp_path, store.env)
    (src / "a.txt").write_bytes(b"state two, only in generation 2\n")
    _ok(["push", str(src), store.url], tmp_path, store.env)
    _first, second = objects.manifests()
    return objects, src, second, json.loads(objects.read(second))


@pytest.mark.parametrize("kind", ["file", "s3-moto"])
@pytest.mark.parametrize("damage", ["empty", "flipped"])
def test_gc_reads_back_what_it_keeps_in_place_of_a_whole_snapshot(
    kind: str, damage: str, store_of: Callable[[str], Store], tmp_path: Path
) -> None:
    """Injected: generation 2's own chunk emptied (what a crash leaves of a
    file on a disk that was not fsynced) or one byte of it flipped; the
    chunk is still listed. Asserted: `ckpt gc --keep 1` and its dry run
    drop nothing (generation 2 does not read back whole, so it does not
    count, and generation 1 is the only restorable one), and a restore
    gives generation 1. It said "dropped 1 snapshot" and nothing was left
    to restore."""
    store = store_of(kind)
    url, env = store.url, store.env
    objects, _src, second, doc = _two_generations(store, tmp_path)
    key = _chunk_key(_chunk_of(doc, "a.txt"))
    data = objects.read(key)
    objects.write(key, b"" if damage == "empty" else bytes([data[0] ^ 1]) + data[1:])
    before = objects.state()

    dry = _gc(url, 1, tmp_path, env, dry=True)
    assert objects.state() == before, "the dry run changed the remote"
    real = _gc(url, 1, tmp_path, env, dry=False)
    after = {k: v for k, v in objects.state().items() if k != "lease.json"}
    assert set(after) - set(before) == {f"suspect/{second}"}, "the mark of generation 2"
    assert {k: v for k, v in after.items() if k in before} == before
    assert (dry["dropped"], dry["chunks"], _gens(dry["kept"])) == ([], 0, [1, 2]), dry
    assert _gens(real["damaged"]) == [2], real
    _same(dry, real)
    res = ckpt(["restore", url, str(tmp_path / "out")], cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    assert _files(tmp_path / "out") == {"a.txt": b"state one\n"}
    assert "marked suspect (damaged" in res.stderr, res.stderr  # passed over without a read
    record(KIND, 1, where=kind, path="ckpt gc")


@pytest.mark.parametrize("kind", ["file", "s3-moto"])
@pytest.mark.parametrize("damage", ["newer version", "bad field"])
def test_retention_keeps_the_chunks_of_a_damaged_snapshot_it_keeps(
    kind: str, damage: str, store_of: Callable[[str], Store], tmp_path: Path
) -> None:
    """Injected: generation 2's manifest made one this ckpt cannot load (a
    newer format version, or one field out of range), as a newer ckpt in a
    mixed fleet could write. Asserted: the next push's retention and `ckpt
    gc` keep generation 2 (damaged, newer than the oldest kept whole one)
    and the chunk only it names; its dry run says the same. The chunk was
    deleted as "named by no snapshot"."""
    store = store_of(kind)
    url, env = store.url, store.env
    objects, src, second, doc = _two_generations(store, tmp_path)
    key = _chunk_key(_chunk_of(doc, "a.txt"))
    if damage == "newer version":
        doc["version"] = 99
    else:
        doc["created"] = 1e300
    objects.write(second, json.dumps(doc).encode())

    (src / "a.txt").write_bytes(b"state three\n")
    _ok(["push", str(src), url, "--keep", "2"], tmp_path, env)
    assert key in objects.state(), "the next push's retention deleted generation 2's chunk"
    assert second in objects.state()
    before = objects.state()
    dry = _gc(url, 2, tmp_path, env, dry=True)
    real = _gc(url, 2, tmp_path, env, dry=False)
    _same(dry, real)
    assert key in objects.state(), "ckpt gc deleted generation 2's chunk"
    assert {k: v for k, v in objects.state().items() if k != "lease.json"} == before
    record(KIND, 2, where=kind, path="push and gc")


def test_a_snapshot_a_restore_found_damaged_is_marked_and_never_counted(
    tmp_path: Path,
) -> None:
    """Injected: one byte of generation 2's own chunk flipped (generation 1
    whole). `ckpt run --keep 2` on an empty --dir restores generation 1 (2
    is corrupt), and its child adds a file: generation 3. Asserted: the
    restore marked generation 2 suspect, and the run's retention kept
    generation 1 (3 and 1 are the two restorable ones); a later restore of
    --snapshot 1 works. Retention counted the corrupt generation 2 and
    dropped generation 1, which the run had just restored from."""
    remote = tmp_path / "remote"
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"generation one\n" * 100)
    _ok(["push", str(src), str(remote)], tmp_path)
    (src / "a.bin").write_bytes(b"generation two\n" * 100)
    _ok(["push", str(src), str(remote)], tmp_path)
    objects = Objects(str(remote), {})
    first, second = objects.manifests()
    key = _chunk_key(_chunk_of(json.loads(objects.read(second)), "a.bin"))
    data = objects.read(key)
    objects.write(key, bytes([data[0] ^ 1]) + data[1:])

    child = "import os, pathlib; pathlib.Path(os.environ['CKPT_DIR'], 'c.txt').write_text('new')"
    res = ckpt(
        ["run", "--dir", str(tmp_path / "ck"), "--remote", str(remote), "--keep", "2",
         "--", PY, "-c", child],
        cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "marked it suspect" in res.stderr, res.stderr
    assert (tmp_path / "ck" / "a.bin").read_bytes() == b"generation one\n" * 100
    names = objects.manifests()
    assert first in names, f"the run's retention dropped generation 1: {names}"
    assert f"suspect/{second}" in objects.state()
    out = tmp_path / "out"
    res = ckpt(["restore", str(remote), str(out), "--snapshot", "1"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    record(KIND, 1, path="ckpt run --keep 2 after a restore that fell back")
