"""Incremental upload, restore and its defences: dedup by chunk, fallback past a
corrupt chunk or an unsafe manifest, and which of local dir / remote wins."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from ckpt_cli.manifest import hash_bytes

from ._util import (
    MiB,
    all_paths,
    chunk_digests,
    chunk_path,
    ckpt_ok,
    entry,
    load_manifest,
    ls_json,
    manifest_paths,
    newest_manifest,
    read_report,
    read_tree,
    reporter,
    restore_into,
    run_args,
    run_ckpt,
    stored_chunks,
    writer,
)

pytestmark = pytest.mark.timeout(180)


def push(src: Path, remote: Path, cwd: Path) -> dict[str, Any]:
    """`ckpt push` and return the manifest it committed."""
    before = {p.name for p in manifest_paths(remote)}
    ckpt_ok(["push", str(src), str(remote)], cwd=cwd)
    new = [p for p in manifest_paths(remote) if p.name not in before]
    assert len(new) == 1, f"push committed {len(new)} manifests"
    return load_manifest(new[0])


def sha(data: bytes) -> str:
    """A chunk's name: the repository's hash (blake3) of its bytes."""
    return hash_bytes(data)


# ---------------------------------------------------------------- 6. dedup


def test_changing_one_large_file_uploads_only_its_chunks(tmp_path: Path, remote: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    size_a, size_b = 20 * MiB + 1234, 20 * MiB + 4321
    (src / "a.bin").write_bytes(os.urandom(size_a))
    (src / "b.bin").write_bytes(os.urandom(size_b))

    m1 = push(src, remote, tmp_path)
    chunk_size = json.loads((remote / "ckpt.json").read_text())["chunk_size"]
    assert chunk_size == 8 * MiB
    n_b = -(-size_b // chunk_size)
    chunks1 = stored_chunks(remote)
    assert len(chunks1) == -(-size_a // chunk_size) + n_b

    new_b = os.urandom(size_b)
    (src / "b.bin").write_bytes(new_b)
    m2 = push(src, remote, tmp_path)
    chunks2 = stored_chunks(remote)

    listed = ls_json(remote, cwd=tmp_path)["snapshots"][0]
    assert listed["id"] == m2["id"]
    assert listed["new_bytes"] == size_b
    assert m2["new_bytes"] == size_b
    new_chunks = chunks2 - chunks1
    assert len(new_chunks) == n_b
    a1, a2, b2 = entry(m1, "a.bin"), entry(m2, "a.bin"), entry(m2, "b.bin")
    assert a1 is not None and a2 is not None and b2 is not None
    assert a2["chunks"] == a1["chunks"]
    assert set(b2["chunks"]) == new_chunks

    out = tmp_path / "out"
    restore_into(remote, out, cwd=tmp_path)
    assert sha((out / "b.bin").read_bytes()) == sha(new_b)
    assert sha((out / "a.bin").read_bytes()) == sha((src / "a.bin").read_bytes())


def test_push_of_unchanged_dir_uploads_nothing(tmp_path: Path, remote: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "state.bin").write_bytes(os.urandom(3 * MiB))
    push(src, remote, tmp_path)
    before = (manifest_paths(remote), stored_chunks(remote))
    res = ckpt_ok(["push", str(src), str(remote)], cwd=tmp_path)
    assert "nothing changed" in res.stderr
    assert (manifest_paths(remote), stored_chunks(remote)) == before


# ---------------------------------------------------------------- two snapshots to damage

OLD = {"state.txt": "old content, snapshot one\n"}
NEW = {"state.txt": "new content, snapshot two (longer)\n", "other.txt": "only in two\n"}


@pytest.fixture
def two_snapshots(tmp_path: Path, remote: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    src = tmp_path / "src"
    src.mkdir()
    for rel, text in OLD.items():
        (src / rel).write_text(text)
    m1 = push(src, remote, tmp_path)
    for rel, text in NEW.items():
        (src / rel).write_text(text)
    m2 = push(src, remote, tmp_path)
    assert m2["generation"] > m1["generation"]
    return m1, m2


def as_bytes(files: dict[str, str]) -> dict[str, bytes]:
    return {k: v.encode() for k, v in files.items()}


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("ckpt: warning:")]


# ---------------------------------------------------------------- 7. corrupt chunk


@pytest.fixture
def corrupt_newest(
    remote: Path, two_snapshots: tuple[dict[str, Any], dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    m1, m2 = two_snapshots
    only_newest = chunk_digests(m2) - chunk_digests(m1)
    assert only_newest
    for digest in only_newest:
        chunk_path(remote, digest).write_bytes(b"garbage " * 8)
    return m1, m2


def test_restore_falls_back_past_a_corrupt_chunk(
    tmp_path: Path, remote: Path, corrupt_newest: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    _m1, m2 = corrupt_newest
    out = tmp_path / "out"
    res = run_ckpt(["restore", str(remote), str(out)], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert read_tree(out) == as_bytes(OLD)
    assert any(m2["id"] in w for w in _warnings(res.stderr)), res.stderr
    assert not [p for p in tmp_path.iterdir() if ".ckpt-" in p.name], "temp dirs left behind"


def test_restore_of_the_corrupt_snapshot_by_id_fails_and_leaves_dir_untouched(
    tmp_path: Path, remote: Path, corrupt_newest: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    _m1, m2 = corrupt_newest
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("local work")
    res = run_ckpt(
        ["restore", str(remote), str(out), "--snapshot", m2["id"], "--force"], cwd=tmp_path
    )
    assert res.returncode != 0
    assert m2["id"] in res.stderr
    assert read_tree(out) == {"mine.txt": b"local work"}


def test_run_on_empty_dir_restores_the_previous_snapshot_past_a_corrupt_chunk(
    tmp_path: Path,
    remote: Path,
    ckpt_dir: Path,
    corrupt_newest: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    m1, m2 = corrupt_newest
    report = tmp_path / "report.json"
    res = run_ckpt([*run_args(ckpt_dir, remote), *reporter(tmp_path, report)], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    seen = read_report(report)
    assert seen["CKPT_RESTORED"] == m1["id"]
    assert seen["files"] == OLD
    assert any(m2["id"] in w for w in _warnings(res.stderr)), res.stderr


# ---------------------------------------------------------------- 8. unsafe manifest


def _rewrite_entry(manifest_file: Path, old_path: str, **changes: Any) -> None:
    doc = load_manifest(manifest_file)
    for e in doc["entries"]:
        if e["path"] == old_path:
            e.update(changes)
            break
    else:
        raise AssertionError(f"{old_path} not in {manifest_file}")
    manifest_file.write_text(json.dumps(doc))


def _add_entries(manifest_file: Path, *entries: dict[str, Any]) -> None:
    doc = load_manifest(manifest_file)
    doc["entries"].extend(entries)
    doc["entries"].sort(key=lambda e: e["path"])
    manifest_file.write_text(json.dumps(doc))


@pytest.mark.parametrize("evil", ["../evil", "sub/../../evil", "ABSOLUTE"])
def test_path_traversal_entry_is_refused_and_restore_falls_back(
    tmp_path: Path, remote: Path, evil: str, two_snapshots: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    m1, m2 = two_snapshots
    if evil == "ABSOLUTE":  # like "/tmp/x", but private to this test
        evil = str(tmp_path / "abs-evil")
    _rewrite_entry(manifest_paths(remote)[-1], "other.txt", path=evil)
    out = tmp_path / "restore-here" / "out"
    outside_before = all_paths(tmp_path, skip=out)

    res = run_ckpt(["restore", str(remote), str(out)], cwd=tmp_path)

    outside_after = all_paths(tmp_path, skip=out)
    assert outside_after - outside_before <= {str(out.parent)}, "created outside the target"
    assert not (tmp_path / "evil").exists() and not (tmp_path / "abs-evil").exists()
    assert res.returncode == 0, res.stderr
    assert any(m2["id"] in w for w in _warnings(res.stderr)), res.stderr
    assert read_tree(out) == as_bytes(OLD)
    assert f"restored snapshot {m1['id']}" in res.stderr


@pytest.mark.parametrize("target", ["../outside", "/etc"])
def test_symlink_escaping_the_dir_is_refused(
    tmp_path: Path, remote: Path, target: str, two_snapshots: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    _m1, m2 = two_snapshots
    _add_entries(
        manifest_paths(remote)[-1],
        {"path": "link", "type": "symlink", "mode": 0o777, "target": target},
    )
    out = tmp_path / "out"
    res = run_ckpt(["restore", str(remote), str(out)], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert any(m2["id"] in w for w in _warnings(res.stderr)), res.stderr
    assert not (out / "link").is_symlink()
    assert read_tree(out) == as_bytes(OLD)


@pytest.mark.usefixtures("two_snapshots")
def test_chained_symlinks_escaping_the_dir_are_refused(tmp_path: Path, remote: Path) -> None:
    """Each link looks harmless on its own ("here" -> ".", "up" -> "here/..")
    but together they point at the parent of the restored directory."""
    _add_entries(
        manifest_paths(remote)[-1],
        {"path": "here", "type": "symlink", "mode": 0o777, "target": "."},
        {"path": "up", "type": "symlink", "mode": 0o777, "target": "here/.."},
    )
    out = tmp_path / "out"
    res = run_ckpt(["restore", str(remote), str(out)], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    real_out = Path(os.path.realpath(out))
    for p in out.iterdir():
        resolved = Path(os.path.realpath(p))
        assert resolved == real_out or real_out in resolved.parents, (
            f"{p.name} resolves to {resolved}, outside {real_out}; stderr:\n{res.stderr}"
        )


# ---------------------------------------------------------------- 13. local vs remote


def _first_run(tmp_path: Path, remote: Path, ckpt_dir: Path) -> dict[str, Any]:
    res = run_ckpt(
        [*run_args(ckpt_dir, remote), *writer(tmp_path, {"state.txt": "v1"})], cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
    newest: dict[str, Any] = ls_json(remote, cwd=tmp_path)["snapshots"][0]
    assert newest["files"] == 1
    return newest


def test_local_dir_newer_than_remote_is_kept_and_uploaded(
    tmp_path: Path, remote: Path, ckpt_dir: Path
) -> None:
    snap = _first_run(tmp_path, remote, ckpt_dir)
    state = ckpt_dir / "state.txt"
    state.write_text("v2 written locally after the snapshot")
    later = int((snap["created"] + 2) * 1e9)
    if state.stat().st_mtime_ns < later:  # coarse clocks: make "after" unambiguous
        os.utime(state, ns=(later, later))

    report = tmp_path / "report.json"
    res = run_ckpt([*run_args(ckpt_dir, remote), *reporter(tmp_path, report)], cwd=tmp_path)

    assert res.returncode == 0, res.stderr
    seen = read_report(report)
    assert seen["files"] == {"state.txt": "v2 written locally after the snapshot"}
    assert "keeping the local state" in res.stderr
    newest = newest_manifest(remote)
    assert newest["id"] != snap["id"]
    restore_into(remote, tmp_path / "fresh", cwd=tmp_path)
    assert read_tree(tmp_path / "fresh") == {"state.txt": b"v2 written locally after the snapshot"}


def test_local_dir_older_than_remote_is_replaced(
    tmp_path: Path, remote: Path, ckpt_dir: Path
) -> None:
    snap = _first_run(tmp_path, remote, ckpt_dir)
    state = ckpt_dir / "state.txt"
    state.write_text("stale local content")
    earlier = int((snap["created"] - 3600) * 1e9)
    os.utime(state, ns=(earlier, earlier))

    report = tmp_path / "report.json"
    res = run_ckpt([*run_args(ckpt_dir, remote), *reporter(tmp_path, report)], cwd=tmp_path)

    assert res.returncode == 0, res.stderr
    seen = read_report(report)
    assert seen["files"] == {"state.txt": "v1"}
    assert seen["CKPT_RESTORED"] == snap["id"]
    assert "older than snapshot" in res.stderr


def test_local_dir_holding_the_newest_snapshot_is_used_as_is(
    tmp_path: Path, remote: Path, ckpt_dir: Path
) -> None:
    snap = _first_run(tmp_path, remote, ckpt_dir)
    inode = (ckpt_dir / "state.txt").stat().st_ino
    report = tmp_path / "report.json"
    res = run_ckpt([*run_args(ckpt_dir, remote), *reporter(tmp_path, report)], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    seen = read_report(report)
    assert seen["CKPT_RESTORED"] == snap["id"]
    assert seen["files"] == {"state.txt": "v1"}
    assert (ckpt_dir / "state.txt").stat().st_ino == inode, "not re-downloaded"
    assert ls_json(remote, cwd=tmp_path)["snapshots"][0]["id"] == snap["id"]


def test_chunk_found_corrupt_during_restore_is_uploaded_again(
    tmp_path: Path,
    remote: Path,
    ckpt_dir: Path,
    corrupt_newest: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    """The run restores the older snapshot (the newest has a corrupt chunk);
    its child then produces the newest snapshot's bytes again (deterministic
    training redoes the same step). The new snapshot must not reuse the
    corrupt chunk it was just warned about: it must restore cleanly."""
    _m1, m2 = corrupt_newest
    res = run_ckpt([*run_args(ckpt_dir, remote), *writer(tmp_path, NEW)], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    m3 = newest_manifest(remote)
    assert m3["generation"] > m2["generation"]

    out = tmp_path / "fresh"
    res = restore_into(remote, out, cwd=tmp_path)
    assert read_tree(out) == as_bytes(NEW)
    assert f"restored snapshot {m3['id']}" in res.stderr, res.stderr
    assert not _warnings(res.stderr), res.stderr


def test_run_with_explicit_snapshot_restores_exactly_that_one(
    tmp_path: Path,
    remote: Path,
    ckpt_dir: Path,
    two_snapshots: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    m1, _m2 = two_snapshots
    ckpt_dir.mkdir()
    (ckpt_dir / "state.txt").write_text("local work, newer than everything")
    report = tmp_path / "report.json"
    res = run_ckpt(
        [*run_args(ckpt_dir, remote, "--snapshot", m1["id"]), *reporter(tmp_path, report)],
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    seen = read_report(report)
    assert seen["CKPT_RESTORED"] == m1["id"]
    assert seen["files"] == OLD


def test_run_with_no_restore_starts_from_the_dir_as_it_is(
    tmp_path: Path,
    remote: Path,
    ckpt_dir: Path,
    two_snapshots: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    ckpt_dir.mkdir()
    (ckpt_dir / "mine.txt").write_text("mine")
    old = int((two_snapshots[1]["created"] - 3600) * 1e9)
    os.utime(ckpt_dir / "mine.txt", ns=(old, old))  # older than the remote: would be replaced
    report = tmp_path / "report.json"
    res = run_ckpt(
        [*run_args(ckpt_dir, remote, "--no-restore"), *reporter(tmp_path, report)],
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    seen = read_report(report)
    assert seen["CKPT_RESTORED"] == ""
    assert seen["files"] == {"mine.txt": "mine"}
