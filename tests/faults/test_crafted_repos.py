"""Crafted repositories through the real binary: one planted manifest, chunk
or record must never block every restore, hang, crash, or make ckpt delete
anything outside the repository. Every size read from a repository is
bounded; a bad snapshot is skipped with a warning and the previous one
restored, and `ckpt verify` reports it damaged.

- The newest manifest (generation 3, planted above two good ones): chunk_size
  1 GiB for a 4-byte file (restoring it held a 1 GiB buffer), a path with a
  lone surrogate (exit 70, while verify said "all complete"), a 300-byte name
  (69), JSON nested 100,000 deep (70), a creation time of 1e300 (`show`
  crashed).
- A chunk object that is a FIFO (the restore hung, deaf to SIGINT) or a
  directory (69).
- A tree 1,100 directories deep, real: push, verify, restore, and a restore
  over it (RecursionError, exit 70, in each).
- ckpt.json with chunk_size 2**63: push says so in one line, 78 (it was 70).
- A GC round record of a multi-node repository naming "../../victim.txt" as a
  chunk: `ckpt gc` deleted that file outside the repository.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from blake3 import blake3

from conftest import CKPT
from integration._util import PY, write_script

from ._io import ckpt, one_error, tree, warnings
from ._tally import record

pytestmark = pytest.mark.timeout(240)

KIND = "crafted repository"
DAMAGED, CONFIG = 65, 78

OLD = {"state.txt": b"old content, snapshot one\n"}
NEW = {"state.txt": b"new content, snapshot two (longer)\n", "other.bin": bytes(range(256)) * 160}
#: A restore that does not end within this many seconds hangs (a FIFO).
HANG = 60


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file:// remote holding OLD (generation 1) then NEW (generation 2),
    made once per module with `ckpt push` (copied by each test)."""
    root = tmp_path_factory.mktemp("crafted-base")
    env = {"HOME": str(root / "home"), "XDG_STATE_HOME": str(root / "home" / "state")}
    src = root / "src"
    src.mkdir()
    for files in (OLD, NEW):
        for rel, data in files.items():
            (src / rel).write_bytes(data)
        res = ckpt(["push", str(src), str(root / "remote")], cwd=root, env=env)
        assert res.returncode == 0, res.stderr
    return root / "remote"


@pytest.fixture
def remote(base: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "remote"
    shutil.copytree(base, dest)
    return dest


def _manifests(remote: Path) -> list[Path]:
    return sorted((remote / "snapshots").glob("*.json"))


def _as_tree(files: dict[str, bytes]) -> dict[str, tuple[str, bytes | str]]:
    return {k: ("file", v) for k, v in files.items()}


def _chunk(remote: Path, data: bytes) -> tuple[str, Path]:
    """Store `data` as a chunk (named by its BLAKE3, the repository's hash)."""
    digest = blake3(data).hexdigest()
    path = remote / "chunks" / digest[:2] / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest, path


def _file(path: str, digest: str, size: int) -> dict[str, Any]:
    return {"path": path, "type": "file", "mode": 0o644, "size": size, "mtime_ns": 1, "ino": 0,
            "chunks": [digest]}  # fmt: skip


Doc = dict[str, Any]


def _plant(remote: Path, change: Callable[[Doc, Path], Doc | bytes]) -> str:
    """Generation 3: generation 2's manifest changed by `change`; its id."""
    doc = json.loads(_manifests(remote)[-1].read_bytes())
    doc["generation"], doc["id"] = 3, "00000003"
    out = change(doc, remote)
    key = remote / "snapshots" / "0000000003-00000003.json"
    key.write_bytes(out if isinstance(out, bytes) else json.dumps(out).encode())
    return "00000003"


def _huge_chunk_size(doc: Doc, remote: Path) -> Doc:
    digest, _ = _chunk(remote, b"tiny")
    doc.update(chunk_size=1 << 30, entries=[_file("tiny.bin", digest, 4)])
    return doc


def _add_file(path: str) -> Callable[[Doc, Path], Doc]:
    def go(doc: Doc, remote: Path) -> Doc:
        digest, _ = _chunk(remote, b"a file of generation 3\n")
        doc["entries"].append(_file(path, digest, len(b"a file of generation 3\n")))
        return doc

    return go


def _special_chunk(make: Callable[[Path], None]) -> Callable[[Doc, Path], Doc]:
    """Generation 3 names a chunk whose object is not a regular file."""

    def go(doc: Doc, remote: Path) -> Doc:
        data = b"never stored as a file\n"
        digest, path = _chunk(remote, data)
        path.unlink()
        make(path)
        doc["entries"].append(_file("special.bin", digest, len(data)))
        return doc

    return go


CASES: dict[str, Callable[[Doc, Path], Doc | bytes]] = {
    "chunk_size 1 GiB for a 4-byte file": _huge_chunk_size,
    "a path with a lone surrogate": _add_file("bad-\ud800-name.bin"),
    "a 300-byte name": _add_file("n" * 300),
    "JSON nested 100,000 deep": lambda doc, remote: b"[" * 100_000 + b"]" * 100_000,
    "created 1e300": lambda doc, remote: {**doc, "created": 1e300},
    "a chunk that is a FIFO": _special_chunk(os.mkfifo),
    "a chunk that is a directory": _special_chunk(lambda p: p.mkdir()),
}

#: Runs a command (argv[2:]) for at most argv[1] seconds (then kills it: a
#: hang, exit 124) and prints the largest resident size of its tree (KiB).
MAXRSS = """
    import resource, subprocess, sys
    try:
        code = subprocess.run(
            sys.argv[2:], stdin=subprocess.DEVNULL, timeout=float(sys.argv[1])
        ).returncode
    except subprocess.TimeoutExpired:
        code = 124
    print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    sys.exit(code)
"""


@pytest.mark.parametrize("case", list(CASES))
def test_a_crafted_snapshot_is_skipped_and_reported(
    case: str, remote: Path, tmp_path: Path
) -> None:
    """Injected: generation 3, planted above the good generations 1 and 2,
    with one defect (the case). Asserted: `ckpt restore` ends (no hang),
    exits 0 with generation 2, whole, and one warning naming generation 3,
    its memory bounded (no buffer of a size the manifest chose); `ckpt
    verify --full` exits 65 naming it; `ckpt show` exits 0 (with a bad
    manifest, showing generation 2)."""
    bad = _plant(remote, CASES[case])
    out = tmp_path / "out"
    wrap = write_script(tmp_path / "maxrss.py", MAXRSS)
    res = subprocess.run(
        [PY, str(wrap), str(HANG), str(CKPT), "restore", str(remote), str(out)],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=HANG + 30,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode != 124, f"the restore hung for {HANG}s:\n{res.stderr}"
    assert res.returncode == 0, res.stderr
    max_rss_mib = int(res.stdout.split()[-1]) // 1024
    assert max_rss_mib < 400, f"restore held {max_rss_mib} MiB"
    assert tree(out) == _as_tree(NEW)
    warned = warnings(res.stderr)
    assert len(warned) == 1 and bad in warned[0], res.stderr

    for full in (["--full"], []):  # the listing alone must see it too (not --full)
        check = ckpt(["verify", str(remote), *full], cwd=tmp_path, timeout=HANG)
        assert check.returncode == DAMAGED, (full, check.stderr)
        assert bad in one_error(check, str(remote))
    show = ckpt(["show", str(remote)], cwd=tmp_path, timeout=HANG)
    assert show.returncode == 0, show.stderr
    if not case.startswith("a chunk that is"):  # a bad manifest: show skips it
        assert "(generation 2)" in show.stderr, show.stderr
    record(KIND, 1, case=case)


def test_no_snapshot_with_a_surrogate_path_is_called_complete(remote: Path, tmp_path: Path) -> None:
    """verify without --full (one listing) calls a manifest complete only if
    a restore can use it: the surrogate path is damage there too."""
    bad = _plant(remote, CASES["a path with a lone surrogate"])
    res = ckpt(["verify", str(remote)], cwd=tmp_path)
    assert res.returncode == DAMAGED and bad in one_error(res, str(remote)), res.stderr
    record(KIND, 1, case="verify of a surrogate path")


DEPTH = 1100


@pytest.fixture
def deep_tmp(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, emptied without recursion after the test: pytest's own
    cleanup of old tmp dirs (shutil.rmtree) dies of RecursionError on a tree
    1,100 levels deep, at the end of every later session."""
    try:
        yield tmp_path
    finally:
        stack, seen = [str(tmp_path)], []
        while stack:
            directory = stack.pop()
            seen.append(directory)
            with os.scandir(directory) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    else:
                        os.unlink(e.path)
        for directory in reversed(seen[1:]):
            os.rmdir(directory)


def _deep(root: Path) -> Path:
    """root/d/d/.../d (DEPTH levels) holding one file; made without recursion."""
    path = root
    for _ in range(DEPTH):
        path = path / "d"
        path.mkdir(parents=True)
    (path / "bottom.txt").write_bytes(b"at the bottom\n")
    return path / "bottom.txt"


def test_a_tree_1100_directories_deep(deep_tmp: Path) -> None:
    """A real tree 1,100 directories deep (paths of 2,200 bytes, within
    PATH_MAX). Asserted: push exits 0, verify says complete, a restore
    gives the file back at the bottom, and a restore --force over that
    deep tree replaces it (no RecursionError anywhere)."""
    src = deep_tmp / "src"
    bottom = _deep(src)
    remote = deep_tmp / "remote"
    res = ckpt(["push", str(src), str(remote)], cwd=deep_tmp)
    assert res.returncode == 0, res.stderr
    res = ckpt(["verify", str(remote)], cwd=deep_tmp)
    assert res.returncode == 0 and "all complete" in res.stderr, res.stderr
    out = deep_tmp / "out"
    res = ckpt(["restore", str(remote), str(out)], cwd=deep_tmp)
    assert res.returncode == 0, res.stderr
    assert (out / bottom.relative_to(src)).read_bytes() == b"at the bottom\n"

    (src / "d").rename(src / "gone")  # a shallow state, restored over the deep one
    (src / "top.txt").write_bytes(b"shallow\n")
    res = ckpt(["push", str(src), str(remote)], cwd=deep_tmp)
    assert res.returncode == 0, res.stderr
    res = ckpt(["restore", str(remote), str(out), "--force"], cwd=deep_tmp)
    assert res.returncode == 0, res.stderr
    assert (out / "top.txt").read_bytes() == b"shallow\n" and not (out / "d").exists()
    assert sorted(p.name for p in deep_tmp.iterdir() if ".ckpt-" in p.name) == []
    record(KIND, 4, case="a tree 1,100 directories deep")


def test_a_chunk_size_of_2_63_is_bad_input(tmp_path: Path) -> None:
    """Injected: ckpt.json says chunk_size 2**63. Asserted: push exits 78
    with one error line naming the remote and chunk_size; nothing written."""
    remote = tmp_path / "remote"
    remote.mkdir()
    config = {"format": "ckpt", "version": 1, "chunk_size": 2**63, "hash": "blake3"}
    (remote / "ckpt.json").write_text(json.dumps(config))
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a")
    res = ckpt(["push", str(src), str(remote)], cwd=tmp_path)
    assert res.returncode == CONFIG, res.stderr
    assert "chunk_size" in one_error(res, str(remote))
    assert sorted(p.name for p in remote.iterdir()) == ["ckpt.json"]
    record(KIND, 1, case="ckpt.json chunk_size 2**63")


RANK_CHILD = """
    import os
    from pathlib import Path
    (Path(os.environ["CKPT_DIR"]) / "state.txt").write_text("rank 0")
"""


def test_a_gc_round_naming_a_path_outside_deletes_nothing_there(tmp_path: Path) -> None:
    """Injected: in a multi-node repository (rank 0 of 2 wrote a snapshot), a
    GC round record gc/0000000001-...json whose chunk list names
    "../../victim.txt". Asserted: `ckpt gc --keep 1` exits 0 and the file
    that name reaches from trash/ (two levels above the remote) still
    exists, as does everything the repository held."""
    remote = tmp_path / "a" / "remote"
    remote.parent.mkdir()
    child = write_script(tmp_path / "child.py", RANK_CHILD)
    run = ["run", "--dir", str(tmp_path / "ck"), "--remote", str(remote)]
    res = ckpt([*run, "--rank", "0", "--world-size", "2", "--", PY, str(child)], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    victim = tmp_path / "victim.txt"  # trash/../../../victim.txt seen from the remote
    victim.write_text("not ckpt's")
    (remote / "trash").mkdir(exist_ok=True)  # there after any earlier round
    assert (remote / "trash" / ".." / ".." / ".." / "victim.txt").resolve() == victim.resolve()
    (remote / "gc").mkdir(exist_ok=True)
    record_doc = {"seq": 1, "created": 0, "by_rank": 0, "chunks": ["../../victim.txt"]}
    (remote / "gc" / "0000000001-0000abcd.json").write_text(json.dumps(record_doc))
    kept = {p for p in remote.rglob("*") if p.is_file() and "/gc/" not in str(p)}

    res = ckpt(["gc", str(remote), "--keep", "1"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert victim.read_text() == "not ckpt's"
    assert kept <= {p for p in remote.rglob("*") if p.is_file()}
    record(KIND, 1, case="a GC round naming ../../victim.txt")


def test_records_nested_100000_deep_are_garbage_not_crashes(remote: Path, tmp_path: Path) -> None:
    """Injected: lease.json and a run record runs/x.json that are JSON arrays
    nested 100,000 deep (the parser's stack overflows: RecursionError, not
    ValueError), and `-o k=[[[[...` as a storage option. Asserted: the lease
    is garbage (stale: taken over), the record is skipped, the option is a
    string; `ckpt run` restores, runs and ends 0, `ckpt ls --runs` lists
    nothing crafted; no crash (70)."""
    deep = "[" * 100_000
    (remote / "lease.json").write_text(deep)
    (remote / "runs").mkdir(exist_ok=True)
    (remote / "runs" / "20260101T000000-deadbe.json").write_text(deep)
    child = write_script(tmp_path / "child.py", "print('ran')\n")
    args = ["--dir", str(tmp_path / "ck"), "--remote", str(remote), "-o", f"k={deep}"]
    res = ckpt(["run", *args, "--", PY, str(child)], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert tree(tmp_path / "ck") == _as_tree(NEW)
    res = ckpt(["ls", str(remote), "--runs", "--json"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    runs = json.loads(res.stdout)["runs"]
    assert [r["run"] for r in runs if r["run"].startswith("20260101")] == []
    record(KIND, 3, case="lease, run record and storage option nested 100,000 deep")


def test_a_chunk_store_1100_directories_deep_is_listed(remote: Path, tmp_path: Path) -> None:
    """Injected: a tree 1,100 directories deep planted under chunks/ (the
    local listing walked it with os.walk, which recurses in Python 3.11).
    Asserted: `ckpt verify`, `ckpt push` and `ckpt gc --dry-run` end without
    a crash; verify finds every snapshot complete."""
    deep = remote / "chunks" / "zz"
    level = deep
    for _ in range(1100):  # os.makedirs recurses once per level too
        level = level / "d"
        level.mkdir(parents=level.parent == deep)
    try:
        res = ckpt(["verify", str(remote)], cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        src = tmp_path / "src"
        src.mkdir()
        (src / "state.txt").write_bytes(b"a third state\n")
        res = ckpt(["push", str(src), str(remote), "--keep", "5"], cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        res = ckpt(["gc", str(remote), "--keep", "5", "--dry-run"], cwd=tmp_path)
        assert res.returncode == 0, res.stderr
    finally:
        from ckpt._fs import remove_tree

        remove_tree(deep)  # pytest's own cleanup of tmp dirs recurses too
    record(KIND, 1, case="a chunk store 1,100 directories deep")
