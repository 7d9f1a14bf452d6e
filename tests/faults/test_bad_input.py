"""Bad input through the real binary: every case gets one clear line (or, for a
damaged snapshot among good ones, a warning and the previous snapshot) and
changes nothing it should not.

- Manifests planted in a real (file://) remote, table-driven: unsafe or
  unnormalised paths, symlinks that escape or that files hide below,
  duplicates, absurd sizes, modes and times, chunk lists that do not match,
  unknown format versions, truncated or non-JSON bytes. tests/unit/
  test_manifest.py checks the parser; tests/integration/test_restore.py one
  `../` path, one absolute path and escaping symlinks through the binary.
  Here: restore skips each with a warning naming it and uses the previous
  snapshot; with no good snapshot left, restore and run fail with one line
  and leave --dir untouched; push next to them still commits a restorable one.
- A --dir that is a regular file, the root, or not writable.
- A --remote that is malformed (no bucket, an unknown scheme, file:// with a
  host, empty) or overlaps --dir.

"Changes nothing": the tree of the test's directory (--dir, the remote, the
working directory) is compared byte for byte before and after.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from integration._util import PY, read_report, reporter

from ._io import ckpt, leftovers, one_error, read_only, tree, warnings, writable_probe
from ._tally import record

pytestmark = pytest.mark.timeout(180)

UNAVAILABLE, CONFIG = 69, 78

OLD = {"state.txt": b"old content, snapshot one\n"}
NEW = {"state.txt": b"new content, snapshot two (longer)\n", "other.bin": bytes(range(256)) * 160}


# ---------------------------------------------------------------- a remote with two snapshots


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file:// remote holding OLD (generation 1) then NEW (generation 2),
    made once per module with `ckpt push` (copied by each test)."""
    root = tmp_path_factory.mktemp("bad-input-base")
    home = root / "home"
    env = {
        "HOME": str(home),
        "XDG_DATA_HOME": str(home / "data"),
        "XDG_STATE_HOME": str(home / "state"),
        "XDG_CONFIG_HOME": str(home / "config"),
    }
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


def _snap_id(path: Path) -> str:
    return path.stem.split("-", 1)[1]


#: Cases a restore finds only by reading the snapshot's chunks: it marks
#: the snapshot suspect (docs/restore.md), so retention never counts it.
MARKED = {"size smaller than its chunk", "size larger than its chunk", "chunk that does not exist"}


def _marks(t: dict[str, tuple[str, bytes | str]], remote: str) -> dict[str, str]:
    """The suspect marks in the remote of tree t: key -> the snapshot id each names."""
    out = {}
    for k, (kind, body) in t.items():
        if k.startswith(f"{remote}/suspect/") and kind == "file":
            assert isinstance(body, bytes)
            doc = json.loads(body)
            assert doc["format"] == "ckpt-suspect" and doc["why"], doc
            out[k] = doc["snapshot"]
    return out


def _but_marks(t: dict[str, tuple[str, bytes | str]], remote: str) -> dict[str, Any]:
    return {k: v for k, v in t.items() if not k.startswith(f"{remote}/suspect")}


def _as_tree(files: dict[str, bytes]) -> dict[str, tuple[str, bytes | str]]:
    return {k: ("file", v) for k, v in files.items()}


# ---------------------------------------------------------------- the bad manifests

Doc = dict[str, Any]
Transform = Callable[[Doc], Doc | bytes]
DROP = object()


def _entry(doc: Doc, path: str) -> Doc:
    found: Doc = next(e for e in doc["entries"] if e["path"] == path)
    return found


def _set(at: str, /, **changes: Any) -> Transform:
    def go(doc: Doc) -> Doc:
        _entry(doc, at).update(changes)
        return doc

    return go


def _add(*entries: Doc) -> Transform:
    def go(doc: Doc) -> Doc:
        doc["entries"].extend(copy.deepcopy(list(entries)))
        return doc

    return go


def _top(**changes: Any) -> Transform:
    def go(doc: Doc) -> Doc:
        for k, v in changes.items():
            if v is DROP:
                doc.pop(k, None)
            else:
                doc[k] = v
        return doc

    return go


def _both(*steps: Transform) -> Transform:
    def go(doc: Doc) -> Doc | bytes:
        out: Doc | bytes = doc
        for step in steps:
            assert isinstance(out, dict)
            out = step(out)
        return out

    return go


def _bytes(fn: Callable[[bytes], bytes]) -> Transform:
    return lambda doc: fn(json.dumps(doc).encode())


def _other_chunk(doc: Doc) -> str:
    chunk: str = _entry(doc, "other.bin")["chunks"][0]
    return chunk


def _dup_chunks(doc: Doc) -> Doc:
    e = _entry(doc, "other.bin")
    e["chunks"] = e["chunks"] * 2
    return doc


def _too_few_chunks(doc: Doc) -> Doc:
    _entry(doc, "other.bin")["size"] = doc["chunk_size"] + 1
    return doc


def _dup_file(doc: Doc) -> Doc:
    doc["entries"].append(copy.deepcopy(_entry(doc, "state.txt")))
    return doc


def _file_below_link(doc: Doc) -> Doc:
    _entry(doc, "other.bin")["path"] = "ln/other.bin"
    doc["entries"].append({"path": "ln", "type": "symlink", "mode": 0o777, "target": "sub"})
    return doc


LINK = {"type": "symlink", "mode": 0o777}
CHUNK_0 = "0" * 64  # a well-formed name of a chunk that does not exist

CASES: dict[str, Transform] = {
    # paths
    "path ./x": _set("other.bin", path="./other.bin"),
    "path a//b": _set("other.bin", path="sub//other.bin"),
    "path a/./b": _set("other.bin", path="sub/./other.bin"),
    "path with trailing /": _set("other.bin", path="other.bin/"),
    "path ..": _set("other.bin", path=".."),
    "path .": _set("other.bin", path="."),
    "empty path": _set("other.bin", path=""),
    "NUL in path": _set("other.bin", path="oth\x00er.bin"),
    "path not text": _set("other.bin", path=["other.bin"]),
    "dir entry ../x": _add({"path": "../outside-dir", "type": "dir", "mode": 0o755}),
    "dir entry a/../../x": _add({"path": "a/../../outside-dir", "type": "dir", "mode": 0o755}),
    # symlinks
    "file below a symlink": _file_below_link,
    "symlink sub/up -> ../../x": _add({"path": "sub/up", "target": "../../outside", **LINK}),
    "symlink to itself": _add({"path": "loop", "target": "loop", **LINK}),
    "symlink with empty target": _add({"path": "ln", "target": "", **LINK}),
    "symlink target not text": _add({"path": "ln", "target": 7, **LINK}),
    # duplicates and overlaps
    "file listed twice": _dup_file,
    "file and dir at one path": _add({"path": "state.txt", "type": "dir", "mode": 0o755}),
    "file below a file": _add(
        {"path": "state.txt/x", "type": "file", "mode": 0o644, "size": 0, "chunks": []}
    ),
    # sizes, chunk lists, modes, times
    "size -1": _set("state.txt", size=-1),
    "size 2**70": _set("other.bin", size=2**70),
    "size a float": _set("other.bin", size=40960.0),
    "size a string": _set("other.bin", size="40960"),
    "size true": _set("state.txt", size=True),
    "more chunks than the size needs": _dup_chunks,
    "fewer chunks than the size needs": _too_few_chunks,
    "size smaller than its chunk": _set("other.bin", size=100),
    "size larger than its chunk": _set("other.bin", size=50_000),
    "empty file with a chunk": lambda doc: _set("state.txt", size=0, chunks=[_other_chunk(doc)])(
        doc
    ),
    "chunk that does not exist": _set("other.bin", chunks=[CHUNK_0]),
    "chunk name ../../ckpt.json": _set("other.bin", chunks=["../../ckpt.json"]),
    "chunks not a list": _set("other.bin", chunks="abc"),
    "mode -1": _set("state.txt", mode=-1),
    "mode 0o200000": _set("state.txt", mode=0o200000),
    "mtime 10**30 ns": _set("state.txt", mtime_ns=10**30),
    "mtime -10**30 ns": _set("state.txt", mtime_ns=-(10**30)),
    "mtime a string": _set("state.txt", mtime_ns="yesterday"),
    "mtime Infinity": _set("state.txt", mtime_ns=float("inf")),
    "attempt Infinity": _top(attempt=float("inf")),
    "unknown entry type": _add({"path": "fifo", "type": "fifo", "mode": 0o644}),
    "entry not an object": _top(entries=["state.txt"]),
    # the document
    "version 2": _top(version=2),
    "version 0": _top(version=0),
    "version '1'": _top(version="1"),
    "no version": _top(version=DROP),
    "format 'restic'": _top(format="restic"),
    "hash md5": _top(hash="md5"),
    "chunk_size 0": _top(chunk_size=0),
    "chunk_size 2**40": _top(chunk_size=2**40),
    "chunk_size 1024 (chunks are larger)": _top(chunk_size=1024),
    "generation not its name's": _top(generation=99),
    "id not its name's": _top(id="deadbeef"),
    "entries not a list": _top(entries={"state.txt": {}}),
    "no entries": _top(entries=DROP),
    "created missing": _top(created=DROP),
    # the bytes
    "truncated JSON": _bytes(lambda b: b[: len(b) // 2]),
    "empty object": _bytes(lambda b: b""),
    "binary garbage": _bytes(lambda b: b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + b[:20]),
    "JSON array": _bytes(lambda b: b"[" + b + b"]"),
    "JSON null": _bytes(lambda b: b"null"),
}


def _plant(manifest: Path, transform: Transform, *, gen: int | None = None) -> Path:
    """Apply transform to (a copy of) manifest's document and write it, under
    the same name or, with gen, as a new snapshot of that generation."""
    doc = json.loads(manifest.read_bytes())
    key = manifest
    if gen is not None:
        doc["generation"], doc["id"] = gen, f"{gen:08x}"
        key = manifest.with_name(f"{gen:010d}-{gen:08x}.json")
    out = transform(doc)
    key.write_bytes(out if isinstance(out, bytes) else json.dumps(out).encode())
    return key


@pytest.mark.parametrize("case", list(CASES))
def test_bad_manifest_is_skipped_and_the_previous_snapshot_restored(
    case: str, remote: Path, tmp_path: Path
) -> None:
    """Injected: the newest manifest of a remote with two snapshots is
    rewritten with one defect (the case).
    Asserted: `ckpt restore` exits 0 with the previous snapshot, whole; one
    warning names the damaged snapshot; nothing is created outside the target
    and nothing in the remote changes but, where only reading the chunks
    found the damage, the suspect mark of that one snapshot."""
    m1, m2 = _manifests(remote)
    _plant(m2, CASES[case])
    out = tmp_path / "restore-here" / "out"
    outside = {k: v for k, v in tree(tmp_path).items() if not k.startswith("restore-here")}

    res = ckpt(["restore", str(remote), str(out)], cwd=tmp_path)

    assert res.returncode == 0, res.stderr
    assert tree(out) == _as_tree(OLD)
    warned = warnings(res.stderr)
    assert len(warned) == 1 and _snap_id(m2) in warned[0], res.stderr
    assert f"restored snapshot {_snap_id(m1)}" in res.stderr
    after = {k: v for k, v in tree(tmp_path).items() if not k.startswith("restore-here")}
    rel = remote.relative_to(tmp_path).as_posix()
    assert _but_marks(after, rel) == outside, "something outside the target changed"
    assert set(_marks(after, rel).values()) == ({_snap_id(m2)} if case in MARKED else set())
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]
    record(f"bad manifest: {case}")


@pytest.fixture
def all_bad(remote: Path) -> Path:
    """The remote with every bad manifest of CASES planted above its two good
    snapshots (generations 10 and up)."""
    _m1, m2 = _manifests(remote)
    for i, transform in enumerate(CASES.values()):
        _plant(m2, transform, gen=10 + i)
    return remote


def test_no_good_snapshot_fails_with_one_line_and_touches_nothing(
    all_bad: Path, tmp_path: Path
) -> None:
    """Injected: every bad manifest of the table at once, and no good one.
    Asserted: `ckpt restore` and `ckpt run` (empty --dir) exit 69 with one
    error line naming the remote and saying the dir is untouched, a warning
    for each bad snapshot; the child never starts; --dir, the remote and
    everything else in the test's directory are unchanged, but for the
    suspect marks of the snapshots whose damage only their chunks show
    (written by the first command; the second finds them marked)."""
    remote = all_bad
    for good in _manifests(remote)[:2]:
        good.unlink()
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "mine.txt").write_text("local work")
    empty = tmp_path / "empty"
    empty.mkdir()
    marker = tmp_path / "report.json"
    run = ["run", "--dir", str(empty), "--remote", str(remote), "--", *reporter(tmp_path, marker)]
    rel = remote.relative_to(tmp_path).as_posix()
    for args, target in ((["restore", str(remote), str(ck), "--force"], ck), (run, empty)):
        before = tree(tmp_path)
        res = ckpt(args, cwd=tmp_path)
        assert res.returncode == UNAVAILABLE, res.stderr
        one_error(res, str(remote), f"{target} is untouched")
        assert len(warnings(res.stderr)) == len(CASES), res.stderr
        assert not marker.exists()
        after = tree(tmp_path)
        assert _but_marks(after, rel) == _but_marks(before, rel)
        assert len(_marks(after, rel)) == len(MARKED), res.stderr
    record("bad manifest: all at once, none good", 2)


def test_run_restores_past_every_bad_manifest(all_bad: Path, tmp_path: Path) -> None:
    """Injected: every bad manifest of the table above the good snapshots.
    Asserted: `ckpt run` on an empty --dir starts the child on the newest
    good snapshot, with a warning for each bad one."""
    m2 = _manifests(all_bad)[1]
    report = tmp_path / "report.json"
    res = ckpt(
        [
            "run",
            "--dir",
            str(tmp_path / "ck"),
            "--remote",
            str(all_bad),
            "--",
            *reporter(tmp_path, report),
        ],
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    seen = read_report(report)
    assert seen["CKPT_RESTORED"] == _snap_id(m2)
    assert sorted(seen["files"]) == sorted(NEW)
    assert tree(tmp_path / "ck") == _as_tree(NEW)
    assert len(warnings(res.stderr)) == len(CASES), res.stderr
    record("bad manifest: run past all of them")


def test_push_after_a_manifest_whose_chunk_is_gone_makes_a_restorable_snapshot(
    remote: Path, tmp_path: Path
) -> None:
    """Injected: the newest manifest, pushed from this very directory (same
    host, path, inodes, sizes and times), names a chunk that has gone from the
    remote (deleted behind ckpt's back).
    Asserted: `ckpt push` of the unchanged directory does not trust that
    manifest's chunk list ("nothing changed" would leave the state only in an
    unrestorable snapshot): afterwards the newest snapshot restores the
    directory byte for byte, without warnings."""
    src = tmp_path / "src"
    src.mkdir()
    for rel, data in NEW.items():
        (src / rel).write_bytes(data)
    old = time.time() - 60  # not "racy": the stat cache may trust these files
    for p in src.iterdir():
        os.utime(p, (old, old))
    res = ckpt(["push", str(src), str(remote)], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    newest = _manifests(remote)[-1]
    chunk = _entry(json.loads(newest.read_bytes()), "other.bin")["chunks"][0]
    (remote / "chunks" / chunk[:2] / chunk).unlink()

    res = ckpt(["push", str(src), str(remote)], cwd=tmp_path)
    assert res.returncode == 0, res.stderr

    out = tmp_path / "out"
    res = ckpt(["restore", str(remote), str(out)], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert not warnings(res.stderr), res.stderr
    assert tree(out) == _as_tree(NEW)
    record("bad manifest: names a chunk that is gone, then push")


# ---------------------------------------------------------------- bad --dir


def _run_args(directory: Path, remote: str, marker: Path) -> list[str]:
    return [
        "run",
        "--dir",
        str(directory),
        "--remote",
        remote,
        "--",
        PY,
        "-c",
        f"open({str(marker)!r}, 'w')",
    ]


@pytest.fixture
def scene(remote: Path, tmp_path: Path) -> dict[str, Path]:
    """Paths of a bad-input case: the remote (two snapshots), a source dir for
    push, a regular file, and where a child would leave its marker."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "state.txt").write_text("to push")
    afile = tmp_path / "a-file"
    afile.write_text("not a directory")
    return {"remote": remote, "src": src, "file": afile, "marker": tmp_path / "child-ran"}


def _unchanged(tmp_path: Path, args: list[str], code: int, *names: str) -> None:
    """Run ckpt; it exits `code` with one error naming `names` and changes
    nothing below tmp_path nor in the (isolated) home directory."""
    home_data = Path(os.environ["XDG_DATA_HOME"])
    before = tree(tmp_path)
    res = ckpt(args, cwd=tmp_path)
    assert res.returncode == code, f"ckpt {' '.join(args)}\n{res.stderr}"
    one_error(res, *names)
    assert tree(tmp_path) == before, f"ckpt {' '.join(args)} changed something"
    assert not home_data.exists(), f"ckpt {' '.join(args)} made a store in {home_data}"


def test_dir_that_is_a_file_or_the_root_is_refused(scene: dict[str, Path], tmp_path: Path) -> None:
    """Injected: --dir (DIR of push and restore) is a regular file, or `/`.
    Asserted: run, push and restore exit 78 with one error naming it, and
    change nothing (the file, the remote, the working directory)."""
    remote, afile, marker = str(scene["remote"]), scene["file"], scene["marker"]
    n = 0
    for bad in (afile, Path("/")):
        for args in (
            _run_args(bad, remote, marker),
            ["push", str(bad), remote],
            ["restore", remote, str(bad)],
        ):
            _unchanged(tmp_path, args, CONFIG, str(bad), "--dir" if bad == afile else "root")
            n += 1
    assert not marker.exists()
    record("bad --dir: a file or /", n)


def test_unwritable_dir_is_refused_and_left_alone(scene: dict[str, Path], tmp_path: Path) -> None:
    """Injected: --dir's parent (and --dir in it) is read-only (a read-only
    bind mount as root; chmod a-w otherwise).
    Asserted: `ckpt restore` into it and `ckpt run` on a missing --dir in it
    (with a snapshot to restore, and with none: nothing to restore, but the
    dir cannot be made) exit 78 with one error naming the dir and the reason,
    the child never starts, nothing changes; `ckpt push` only reads DIR: it
    works and leaves the dir as it was."""
    remote, marker = scene["remote"], scene["marker"]
    parent = tmp_path / "locked"
    existing = parent / "ck"
    existing.mkdir(parents=True)
    (existing / "mine.txt").write_text("local work")
    missing = parent / "new-ck"
    empty_remote = tmp_path / "empty-remote"
    with read_only(parent):
        assert not writable_probe(parent), "the dir is still writable"
        cases = [
            ["restore", str(remote), str(existing), "--force"],
            _run_args(missing, str(remote), marker),
            _run_args(missing, str(empty_remote), marker),
        ]
        for args in cases:
            before = tree(tmp_path)
            res = ckpt(args, cwd=tmp_path)
            assert res.returncode == CONFIG, f"ckpt {' '.join(args)}\n{res.stderr}"
            line = one_error(res, str(existing if args[0] == "restore" else missing))
            assert "Read-only file system" in line or "Permission denied" in line, line
            after = tree(tmp_path)
            # a run may create an empty remote (ckpt.json) where none was; nothing else
            after = {k: v for k, v in after.items() if not k.startswith("empty-remote")}
            before = {k: v for k, v in before.items() if not k.startswith("empty-remote")}
            assert after == before, f"ckpt {' '.join(args)} changed something"
            assert not marker.exists()
            assert leftovers(parent) == []
        before = tree(existing)
        res = ckpt(["push", str(existing), str(remote)], cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        assert tree(existing) == before
    record("bad --dir: not writable", len(cases))


# ---------------------------------------------------------------- bad --remote

#: Where an S3 or GCS client would go: a closed port on loopback (nothing may leave it).
NOWHERE = {
    "AWS_ACCESS_KEY_ID": "bad-input-key",
    "AWS_SECRET_ACCESS_KEY": "bad-input-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9",
    "STORAGE_EMULATOR_HOST": "http://127.0.0.1:9",
    "FSSPEC_GS_TOKEN": "anon",
    "CKPT_IO_TIMEOUT": "2",
}

MALFORMED = {
    "s3:// (no bucket)": ("s3://", "bucket"),
    "s3:///x (no bucket)": ("s3:///x", "bucket"),
    "gs:// (no bucket)": ("gs://", "bucket"),
    "bogus://x (unknown scheme)": ("bogus://x", "bogus"),
    "file:// with a host": ("file://somehost/x", "somehost"),
    "empty": ("", "empty"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_remote_is_refused(
    case: str, scene: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Injected: a --remote (REMOTE of push and restore) that cannot name a
    repository. Asserted: run, push and restore exit 78 with one error naming
    it and --remote, and change nothing (no directory made from a URL, no
    default store used instead, nothing sent anywhere)."""
    for k, v in NOWHERE.items():
        monkeypatch.setenv(k, v)
    url, name = MALFORMED[case]
    src, marker = scene["src"], scene["marker"]
    out = tmp_path / "out"
    for args in (
        ["push", str(src), url],
        ["restore", url, str(out)],
        _run_args(tmp_path / "ck", url, marker),
    ):
        _unchanged(tmp_path, args, CONFIG, name, "--remote")
    assert not marker.exists()
    record(f"bad --remote: {case}", 3)


def test_a_remote_that_is_a_file_is_refused(scene: dict[str, Path], tmp_path: Path) -> None:
    """Injected: a local --remote (REMOTE of push, ls and restore) that is a
    regular file. Asserted: run, push, ls and restore exit 78 with one error
    naming it and saying it is not a directory, and change nothing (push and
    run said 69, "retry later", from `creating ckpt.json ... Not a
    directory`, where ls said 78)."""
    src, afile, marker = scene["src"], scene["file"], scene["marker"]
    out = tmp_path / "out"
    n = 0
    for args in (
        ["push", str(src), str(afile)],
        _run_args(tmp_path / "ck", str(afile), marker),
        ["ls", str(afile)],
        ["restore", str(afile), str(out)],
    ):
        _unchanged(tmp_path, args, CONFIG, str(afile), "not a directory")
        n += 1
    assert not marker.exists()
    record("bad --remote: a file", n)


def test_remote_overlapping_dir_is_refused(scene: dict[str, Path], tmp_path: Path) -> None:
    """Injected: a local remote inside --dir, equal to it, or --dir inside a
    file:// remote (plain path and file:// URL, also through a symlink).
    Asserted: run, push and restore exit 78 with one error saying which is
    inside which, and change nothing."""
    remote, src, marker = scene["remote"], scene["src"], scene["marker"]
    link = tmp_path / "link-to-src"
    link.symlink_to(src)
    pairs = [
        (src, str(src / "remote")),
        (src, f"file://{src}/remote"),
        (src, str(src)),
        (src, str(link)),
        (remote / "ck", str(remote)),
        (remote / "ck", f"file://{remote}"),
        (link / "sub", str(src)),
    ]
    n = 0
    for directory, url in pairs:
        for args in (
            _run_args(directory, url, marker),
            ["push", str(directory), url],
            ["restore", url, str(directory)],
        ):
            if args[0] == "push" and not directory.is_dir():
                continue  # push of a missing dir is another error
            _unchanged(tmp_path, args, CONFIG, "inside", "--remote")
            n += 1
    assert not marker.exists()
    record("bad --remote: overlaps --dir", n)


# ---------------------------------------------------------------- an unknown --snapshot


def test_an_unknown_snapshot_is_bad_input_everywhere(remote: Path, tmp_path: Path) -> None:
    """Injected: `--snapshot 99` (and a snapshot id no snapshot has) on a
    remote with two snapshots. Asserted: run, restore, show, diff and verify
    all exit 78 with one error line naming it and --snapshot or `ckpt ls`
    (run and restore said 69, "retry later", which a service manager
    retries forever); the child never starts; nothing changes."""
    marker = tmp_path / "report.json"
    ck = tmp_path / "ck"
    n = 0
    for wanted in ("99", "feedface"):
        for args in (
            ["run", "--dir", str(ck), "--remote", str(remote), "--snapshot", wanted,
             "--", PY, "-c", f"open({str(marker)!r}, 'w')"],
            ["restore", str(remote), str(tmp_path / "out"), "--snapshot", wanted],
            ["show", str(remote), wanted],
            ["diff", str(remote), "1", wanted],
            ["verify", str(remote), "--snapshot", wanted],
        ):  # fmt: skip
            before = tree(tmp_path)
            res = ckpt(args, cwd=tmp_path)
            assert res.returncode == CONFIG, f"{args[0]}: {res.returncode}\n{res.stderr}"
            line = one_error(res, repr(wanted))
            assert "--snapshot" in line or "ckpt ls" in line, line
            assert tree(tmp_path) == before
            n += 1
    assert not marker.exists()
    record("bad --snapshot: no such snapshot", n)


# ------------------------------------------------ a --checkpoint-signal ckpt cannot use

#: (how it is given, source, what the error line names besides the value)
BAD_SIGNALS: list[tuple[str, str, str]] = [
    ("SIGKILL", "flag", "--checkpoint-signal"),  # can never be caught
    ("KILL", "flag", "--checkpoint-signal"),
    ("SIGSTOP", "flag", "--checkpoint-signal"),
    ("stop", "flag", "--checkpoint-signal"),
    ("SIGTERM", "flag", "--checkpoint-signal"),  # already means "stop" to ckpt
    ("SIGINT", "flag", "--checkpoint-signal"),
    ("SIGHUP", "flag", "--checkpoint-signal"),
    ("SIGCHLD", "flag", "--checkpoint-signal"),  # ckpt's own
    ("SIGSEGV", "flag", "--checkpoint-signal"),  # a fault, not a request
    ("SIGKILL", "env", "CKPT_CHECKPOINT_SIGNAL"),
    ("SIGSTOP", "toml", "checkpoint-signal"),
]


@pytest.mark.parametrize(
    ("sig", "source", "named"), BAD_SIGNALS, ids=[f"{s[1]} {s[0]}" for s in BAD_SIGNALS]
)
def test_a_checkpoint_signal_ckpt_cannot_use_is_refused_before_the_restore(
    sig: str,
    source: str,
    named: str,
    remote: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Injected: --checkpoint-signal (its env var, its ckpt.toml key) naming a
    signal that cannot be caught (SIGKILL, SIGSTOP), that already means
    "stop" to ckpt (SIGTERM, SIGINT, SIGHUP), that is ckpt's own (SIGCHLD)
    or a fault (SIGSEGV), over a remote with two snapshots and an empty
    --dir. Asserted: 78 with one error naming the option and the value,
    the child never starts, and nothing changes: --dir is not restored. (A
    SIGKILL or SIGSTOP used to restore --dir and then crash with exit 70,
    "OSError: [Errno 22] Invalid argument", when ckpt installed its handler.)"""
    ck = tmp_path / "ck"
    ck.mkdir()  # empty: a run restores the newest snapshot into it
    marker = tmp_path / "child-ran"
    flags: list[str] = []
    if source == "flag":
        flags = ["--checkpoint-signal", sig]
    elif source == "env":
        monkeypatch.setenv("CKPT_CHECKPOINT_SIGNAL", sig)
    else:
        (tmp_path / "ckpt.toml").write_text(f'checkpoint-signal = "{sig}"\n')
    args = _run_args(ck, str(remote), marker)
    args[1:1] = flags
    _unchanged(tmp_path, args, CONFIG, named, sig)
    assert not marker.exists()
    record("bad --checkpoint-signal", 1, what=f"{source} {sig}")
