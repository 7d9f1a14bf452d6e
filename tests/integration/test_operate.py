"""Operating a repository through the real binary: ls (empty, missing and
damaged remotes), show, diff, restore --force, verify (--full) and gc, their
--json output parsed back, their error lines and exit statuses; one S3 case.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest

from ckpt._contract import ExitCode

from ._util import (
    chunk_path,
    ckpt_ok,
    error_lines,
    load_manifest,
    ls_json,
    manifest_paths,
    read_tree,
    run_ckpt,
    script,
    stored_chunks,
    wait_for,
)

V1 = {"state.txt": "step 1\n", "sub/weights.bin": "w" * 3000, "keep.txt": "same\n"}
V2 = {"state.txt": "step 2, longer\n", "sub/weights.bin": "w" * 3000, "new.txt": "added\n"}


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def _push(src: Path, remote: Path | str, tmp_path: Path, *extra: str) -> dict[str, Any]:
    ckpt_ok(["push", str(src), str(remote), "--keep", "10", *extra], cwd=tmp_path)
    if isinstance(remote, Path):
        return load_manifest(manifest_paths(remote)[-1])
    return {}


def _one_error(res: Any, code: int, *words: str) -> str:
    assert res.returncode == code, f"exit {res.returncode}, not {code}\n{res.stderr}"
    lines = error_lines(res.stderr)
    assert len(lines) == 1, f"expected one error line:\n{res.stderr}"
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    assert "Traceback" not in res.stderr
    return lines[0]


def _json(args: list[str], tmp_path: Path, code: int = 0) -> dict[str, Any]:
    res = run_ckpt([*args, "--json"], cwd=tmp_path)
    assert res.returncode == code, res.stderr
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


@pytest.fixture
def two(tmp_path: Path, remote: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """remote holds V1 (with a symlink) then V2 (no symlink, state.txt 0600)."""
    src = tmp_path / "src"
    _write(src, V1)
    (src / "link").symlink_to("state.txt")
    m1 = _push(src, remote, tmp_path)
    (src / "keep.txt").unlink()
    (src / "link").unlink()
    _write(src, V2)
    os.chmod(src / "state.txt", 0o600)
    m2 = _push(src, remote, tmp_path)
    return m1, m2


def _chunks_only_in(newer: dict[str, Any], older: dict[str, Any]) -> list[str]:
    old = {c for e in older["entries"] for c in e.get("chunks", ())}
    return sorted({c for e in newer["entries"] for c in e.get("chunks", ())} - old)


# ---------------------------------------------------------------- help


@pytest.mark.parametrize("command", ["ls", "show", "diff", "restore", "push", "verify", "gc"])
def test_every_command_has_help_with_an_example(command: str, tmp_path: Path) -> None:
    res = ckpt_ok([command, "--help"], cwd=tmp_path)
    assert "Example:" in res.stdout, res.stdout


# ---------------------------------------------------------------- ls


def test_ls_of_an_empty_location_says_so_and_exits_0(tmp_path: Path) -> None:
    never_made = tmp_path / "not-yet"
    made_empty = tmp_path / "empty"
    made_empty.mkdir()
    for where in (never_made, made_empty):
        res = ckpt_ok(["ls", str(where)], cwd=tmp_path)
        assert "empty: no snapshots yet" in res.stderr
        assert res.stdout == ""
        assert ls_json(where, cwd=tmp_path) == {"remote": str(where), "snapshots": [], "runs": []}
    assert not never_made.exists(), "a reading command created the remote"


def test_ls_of_a_missing_location_is_one_line_69(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "remote"
    res = run_ckpt(["ls", str(missing)], cwd=tmp_path)
    _one_error(res, ExitCode.UNAVAILABLE, str(missing), "does not exist")
    assert not missing.parent.exists()


def test_ls_of_something_that_is_no_repository_is_78_with_a_hint(
    tmp_path: Path, remote: Path, two: Any
) -> None:
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "notes.txt").write_text("not ckpt's")
    shutil.copytree(remote, parent / "exp1")
    res = run_ckpt(["ls", str(parent)], cwd=tmp_path)
    _one_error(res, ExitCode.CONFIG, str(parent), "ckpt.json", str(parent / "exp1"))


def test_ls_marks_the_newest_complete_snapshot_and_damaged_ones(
    tmp_path: Path, remote: Path, two: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    m1, m2 = two
    rows = ls_json(remote, cwd=tmp_path)["snapshots"]
    assert [(r["id"], r["state"], r["ok"]) for r in rows] == [
        (m2["id"], "newest", True),
        (m1["id"], "complete", True),
    ]
    assert rows[0]["files"] == 3 and rows[0]["attempt"] == 0

    lost = _chunks_only_in(m2, m1)[0]
    chunk_path(remote, lost).unlink()
    rows = ls_json(remote, cwd=tmp_path)["snapshots"]
    assert [(r["id"], r["state"], r["ok"]) for r in rows] == [
        (m2["id"], "damaged", False),
        (m1["id"], "newest", True),
    ]
    assert lost[:12] in rows[0]["error"] and "missing" in rows[0]["error"]
    table = ckpt_ok(["ls", str(remote)], cwd=tmp_path).stdout
    lines = [line for line in table.splitlines() if line.strip()]
    assert "state" in lines[0]
    assert lines[1].startswith(m2["id"]) and "damaged: 1 chunk missing" in lines[1]
    assert lines[2].startswith(m1["id"]) and lines[2].rstrip().endswith("newest")

    manifest_paths(remote)[-1].write_bytes(b"\x00 not json")
    rows = ls_json(remote, cwd=tmp_path)["snapshots"]
    assert rows[0]["state"] == "damaged" and "manifest" in rows[0]["error"]
    assert "created" not in rows[0]


# ---------------------------------------------------------------- show


def test_show_lists_the_newest_snapshot_by_default(
    tmp_path: Path, remote: Path, two: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    _m1, m2 = two
    doc = _json(["show", str(remote)], tmp_path)
    assert doc["snapshot"]["id"] == m2["id"] and doc["snapshot"]["generation"] == 2
    files = {e["path"]: e for e in doc["entries"]}
    assert files["state.txt"] == {
        "path": "state.txt",
        "type": "file",
        "mode": "0600",
        "size": len(V2["state.txt"]),
        "chunks": 1,
        "mtime_ns": files["state.txt"]["mtime_ns"],
        "check": "",  # the format check it passed when taken: none applies to text
    }
    assert files["sub"]["type"] == "dir"
    assert set(files) == {"state.txt", "sub", "sub/weights.bin", "new.txt"}

    res = ckpt_ok(["show", str(remote)], cwd=tmp_path)
    assert m2["id"] in res.stderr and "3 files" in res.stderr
    assert any(line.startswith("new.txt ") for line in res.stdout.splitlines()), res.stdout


def test_show_a_snapshot_by_generation_or_id_prefix(
    tmp_path: Path, remote: Path, two: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    m1, _m2 = two
    for wanted in ("1", m1["id"][:5]):
        doc = _json(["show", str(remote), wanted], tmp_path)
        assert doc["snapshot"]["id"] == m1["id"]
        link = next(e for e in doc["entries"] if e["path"] == "link")
        assert link == {"path": "link", "type": "symlink", "mode": "0777", "target": "state.txt"}
    assert "link -> state.txt" in ckpt_ok(["show", str(remote), "1"], cwd=tmp_path).stdout


def test_show_of_an_unknown_or_damaged_snapshot(
    tmp_path: Path, remote: Path, two: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    _m1, m2 = two
    res = run_ckpt(["show", str(remote), "77"], cwd=tmp_path)
    _one_error(res, ExitCode.CONFIG, "'77'", str(remote), "ckpt ls")
    manifest_paths(remote)[-1].write_text('{"truncated": ')
    res = run_ckpt(["show", str(remote), m2["id"]], cwd=tmp_path)
    _one_error(res, ExitCode.DAMAGED, m2["id"], "not valid JSON", "ckpt verify")
    # Without an argument: the newest readable one, with a warning.
    res = ckpt_ok(["show", str(remote)], cwd=tmp_path)
    assert "generation 1" in res.stderr and "warning:" in res.stderr


def test_show_of_an_empty_remote(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    assert "empty" in ckpt_ok(["show", str(empty)], cwd=tmp_path).stderr
    assert _json(["show", str(empty)], tmp_path)["entries"] == []


# ---------------------------------------------------------------- diff


def test_diff_lists_added_removed_and_changed(
    tmp_path: Path, remote: Path, two: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    m1, m2 = two
    doc = _json(["diff", str(remote), "1", m2["id"][:6]], tmp_path)
    assert (doc["from"]["id"], doc["to"]["id"]) == (m1["id"], m2["id"])
    assert [e["path"] for e in doc["added"]] == ["new.txt"]
    assert [e["path"] for e in doc["removed"]] == ["keep.txt", "link"]
    changed = {c["path"]: c for c in doc["changed"]}
    assert set(changed) == {"state.txt"}, changed  # weights.bin: same chunks
    assert changed["state.txt"]["what"] == ["content", "size", "mode"]
    assert changed["state.txt"]["before"]["mode"] == "0644"
    assert changed["state.txt"]["after"]["mode"] == "0600"

    res = ckpt_ok(["diff", str(remote), "1", "2"], cwd=tmp_path)
    assert "1 added, 2 removed, 1 changed" in res.stderr
    marks = {line.split()[1]: line.split()[0] for line in res.stdout.splitlines() if line.strip()}
    assert marks == {"new.txt": "+", "keep.txt": "-", "link": "-", "state.txt": "~"}
    assert "mode 0644 -> 0600" in res.stdout

    same = ckpt_ok(["diff", str(remote), "2", "2"], cwd=tmp_path)
    assert "no differences" in same.stderr and same.stdout == ""


def test_diff_of_an_unknown_snapshot_names_it(
    tmp_path: Path, remote: Path, two: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    res = run_ckpt(["diff", str(remote), "1", "deadbeef"], cwd=tmp_path)
    _one_error(res, ExitCode.CONFIG, "'deadbeef'", "ckpt ls")
    res = run_ckpt(["diff", str(tmp_path / "empty"), "1", "2"], cwd=tmp_path)
    _one_error(res, ExitCode.CONFIG, "'1'", "empty")


# ---------------------------------------------------------------- restore


def test_restore_refuses_a_non_empty_dir_without_force(
    tmp_path: Path, remote: Path, two: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    m1, _m2 = two
    out = tmp_path / "out"
    _write(out, {"mine.txt": "local work"})
    res = run_ckpt(["restore", str(remote), str(out)], cwd=tmp_path)
    _one_error(res, ExitCode.CONFIG, str(out), "not empty", "--force")
    assert read_tree(out) == {"mine.txt": b"local work"}

    res = ckpt_ok(["restore", str(remote), str(out), "--snapshot", "1", "--force"], cwd=tmp_path)
    assert f"restored snapshot {m1['id']}" in res.stderr
    assert read_tree(out) == {k: v.encode() for k, v in V1.items()}
    assert os.readlink(out / "link") == "state.txt"
    # No temp dir is left; the replaced file, in no snapshot, is kept aside.
    (kept,) = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert kept.name.startswith(".out.ckpt-kept-")
    assert read_tree(kept) == {"mine.txt": b"local work"}

    empty = tmp_path / "empty-dir"
    empty.mkdir()
    ckpt_ok(["restore", str(remote), str(empty)], cwd=tmp_path)
    assert read_tree(empty) == {k: v.encode() for k, v in V2.items()}


def test_restore_from_an_empty_or_missing_remote(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _write(out, {"mine.txt": "local work"})
    res = ckpt_ok(["restore", str(tmp_path / "nothing-yet"), str(out)], cwd=tmp_path)
    assert "empty" in res.stderr and read_tree(out) == {"mine.txt": b"local work"}
    missing = tmp_path / "gone" / "remote"
    res = run_ckpt(["restore", str(missing), str(tmp_path / "o2")], cwd=tmp_path)
    _one_error(res, ExitCode.UNAVAILABLE, str(missing), "does not exist")


# ---------------------------------------------------------------- verify


def test_verify_of_a_sound_repository(
    tmp_path: Path, remote: Path, two: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    res = ckpt_ok(["verify", str(remote)], cwd=tmp_path)
    assert "verified 2 snapshots" in res.stderr and "all complete" in res.stderr
    doc = _json(["verify", str(remote), "--full"], tmp_path)
    assert doc["ok"] is True and doc["full"] is True
    assert [s["ok"] for s in doc["snapshots"]] == [True, True]
    assert doc["chunks"]["hashed"] == len(stored_chunks(remote))
    assert doc["chunks"]["bytes_hashed"] > 3000
    empty = ckpt_ok(["verify", str(tmp_path / "empty")], cwd=tmp_path)
    assert "nothing to verify" in empty.stderr


def test_verify_lists_missing_corrupt_and_unparsable(
    tmp_path: Path, remote: Path, two: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    m1, m2 = two
    # A chunk of the first snapshot only, rewritten with garbage of its own length:
    # the listing cannot tell; the format check, which reads a file's first and
    # last chunk (here its only one) and verifies what it reads by its hash,
    # finds it, and so does --full (re-hashing every chunk).
    corrupt = _chunks_only_in(m1, m2)[0]
    path = chunk_path(remote, corrupt)
    path.write_bytes(b"x" * path.stat().st_size)
    res = run_ckpt(["verify", str(remote)], cwd=tmp_path)
    _one_error(res, ExitCode.DAMAGED, "1 of 2 snapshots", m1["id"], str(remote))
    assert corrupt[:12] in res.stdout
    res = run_ckpt(["verify", str(remote), "--full"], cwd=tmp_path)
    _one_error(res, ExitCode.DAMAGED, "1 of 2 snapshots", m1["id"], str(remote))
    assert m1["id"] in res.stdout and "corrupt" in res.stdout and corrupt[:12] in res.stdout

    missing = _chunks_only_in(m2, m1)[0]
    chunk_path(remote, missing).unlink()
    doc = _json(["verify", str(remote), "--full"], tmp_path, code=ExitCode.DAMAGED)
    assert doc["ok"] is False
    problems = {s["id"]: s["problems"] for s in doc["snapshots"]}
    assert problems[m2["id"]] == [
        {"kind": "missing_chunk", "chunk": missing, "detail": f"chunk {missing} is missing"}
    ]
    assert [(p["kind"], p["chunk"]) for p in problems[m1["id"]]] == [("corrupt_chunk", corrupt)]

    only = _json(["verify", str(remote), "--snapshot", m2["id"]], tmp_path, code=65)
    assert [s["id"] for s in only["snapshots"]] == [m2["id"]]

    manifest_paths(remote)[-1].write_text("[]")
    res = run_ckpt(["verify", str(remote)], cwd=tmp_path)
    _one_error(res, ExitCode.DAMAGED, m2["id"])
    assert "manifest is not a JSON object" in res.stdout


def test_verify_of_an_unknown_snapshot_is_78(
    tmp_path: Path, remote: Path, two: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    res = run_ckpt(["verify", str(remote), "--snapshot", "12"], cwd=tmp_path)
    _one_error(res, ExitCode.CONFIG, "'12'", "ckpt ls")


# ---------------------------------------------------------------- gc


def _objects(remote: Path) -> dict[str, bytes]:
    return {
        p.relative_to(remote).as_posix(): p.read_bytes()
        for p in sorted(remote.rglob("*"))
        if p.is_file()
    }


def test_gc_dry_run_changes_nothing_and_gc_frees_it(tmp_path: Path, remote: Path) -> None:
    src = tmp_path / "src"
    made = []
    for i in range(4):
        if i:
            (src / f"epoch-{i - 1}.bin").unlink()
        _write(src, {"state.txt": f"step {i}\n", f"epoch-{i}.bin": str(i) * 5000})
        made.append(_push(src, remote, tmp_path))
    orphan = "ab" + "0" * 62
    chunk_path(remote, orphan).parent.mkdir(parents=True, exist_ok=True)
    chunk_path(remote, orphan).write_bytes(b"from a killed upload")
    (remote / "chunks" / "ab" / f".{orphan}.tmp-1234abcd").write_bytes(b"half")
    (remote / "snapshots" / ".0000000009-aaaaaaaa.json.tmp-5678abcd").write_bytes(b"half")
    (remote / "runs").mkdir()
    (remote / "runs" / "r1.json").write_text("{}")
    before = _objects(remote)

    plan = _json(["gc", str(remote), "--keep", "2", "--dry-run"], tmp_path)
    assert _objects(remote) == before
    assert plan["dry_run"] is True
    assert [d["id"] for d in plan["dropped"]] == [made[1]["id"], made[0]["id"]]
    assert [k["id"] for k in plan["kept"]] == [made[3]["id"], made[2]["id"]]
    # epoch-0 and epoch-1 (5000 bytes each), state.txt twice (7 bytes), the orphan
    assert plan["chunks"] == 5 and plan["unsized_chunks"] == 1
    assert plan["bytes"] == 2 * 5000 + 2 * 7
    assert plan["temp_objects"] == 2
    text = ckpt_ok(["gc", str(remote), "--keep", "2", "--dry-run"], cwd=tmp_path)
    assert "would drop 2 snapshots" in text.stderr and made[0]["id"] in text.stderr

    res = ckpt_ok(["gc", str(remote), "--keep", "2"], cwd=tmp_path)
    assert "dropped 2 snapshots" in res.stderr and "deleted 5 chunks" in res.stderr
    assert [r["id"] for r in ls_json(remote, cwd=tmp_path)["snapshots"]] == [
        made[3]["id"],
        made[2]["id"],
    ]
    assert not [p for p in remote.rglob(".*") if p.is_file()], "temp objects left"
    assert (remote / "runs" / "r1.json").exists(), "gc deleted the run history"
    assert not (remote / "lease.json").exists(), "gc left its lease behind"
    ckpt_ok(["verify", str(remote), "--full"], cwd=tmp_path)
    again = _json(["gc", str(remote), "--keep", "2"], tmp_path)
    assert again["dropped"] == [] and again["chunks"] == 0


def test_gc_needs_keep_and_is_fine_on_an_empty_remote(tmp_path: Path) -> None:
    res = run_ckpt(["gc", str(tmp_path / "r")], cwd=tmp_path)
    _one_error(res, ExitCode.USAGE, "--keep")
    res = ckpt_ok(["gc", str(tmp_path / "r"), "--keep", "1"], cwd=tmp_path)
    assert "empty" in res.stderr and not (tmp_path / "r").exists()


WAIT_FOR_FILE = """
    import sys, time
    from pathlib import Path
    stop = Path(sys.argv[1])
    while not stop.exists():
        time.sleep(0.05)
"""


def test_gc_is_refused_while_a_run_holds_the_lease(
    tmp_path: Path, remote: Path, two: Any, spawn: Any
) -> None:
    stop = tmp_path / "stop"
    child = [*script(tmp_path, "wait.py", WAIT_FOR_FILE), str(stop)]
    ck = tmp_path / "ck"
    run = spawn(["run", "--dir", str(ck), "--remote", str(remote), "--", *child])
    wait_for((remote / "lease.json").exists, what="the run's lease", proc=run)
    before = _objects(remote)
    res = run_ckpt(["gc", str(remote), "--keep", "1"], cwd=tmp_path)
    _one_error(res, ExitCode.UNAVAILABLE, str(remote), "in use by ckpt", f"pid {run.pid}")

    def data(objects: dict[str, bytes]) -> dict[str, bytes]:  # not the lease, the history
        return {k: v for k, v in objects.items() if k.startswith(("chunks/", "snapshots/"))}

    assert data(_objects(remote)) == data(before)
    dry = _json(["gc", str(remote), "--keep", "1", "--dry-run"], tmp_path)
    assert len(dry["dropped"]) == 1
    stop.write_text("")
    assert run.wait() == 0, run.stderr()
    ckpt_ok(["gc", str(remote), "--keep", "1"], cwd=tmp_path)
    assert len(ls_json(remote, cwd=tmp_path)["snapshots"]) == 1


# ---------------------------------------------------------------- on S3


def test_operating_commands_on_s3(store_of: Any, tmp_path: Path) -> None:
    store = store_of("s3-moto")
    env = {**store.env, "CKPT_IO_TIMEOUT": "30"}

    def ckpt(*args: str, code: int = 0) -> Any:
        res = run_ckpt(list(args), cwd=tmp_path, env=env, timeout=180)
        assert res.returncode == code, f"ckpt {args[0]}: {res.returncode}\n{res.stderr}"
        return res

    empty = ckpt("ls", store.url, "--json")
    assert json.loads(empty.stdout)["snapshots"] == []
    bucket = store.url.split("://", 1)[1].split("/", 1)[0]
    missing = store.url.replace(bucket, f"no-such-bucket-{uuid.uuid4().hex[:12]}", 1)
    res = ckpt("ls", missing, code=ExitCode.UNAVAILABLE)
    _one_error(res, ExitCode.UNAVAILABLE, "does not exist", "bucket")

    src = tmp_path / "src"
    _write(src, V1)
    ckpt("push", str(src), store.url)
    _write(src, V2)
    ckpt("push", str(src), store.url)
    rows = json.loads(ckpt("ls", store.url, "--json").stdout)["snapshots"]
    assert [r["state"] for r in rows] == ["newest", "complete"]
    shown = json.loads(ckpt("show", store.url, "--json").stdout)
    assert {e["path"] for e in shown["entries"]} >= {"state.txt", "new.txt", "keep.txt"}
    diffed = json.loads(ckpt("diff", store.url, "1", "2", "--json").stdout)
    assert [c["path"] for c in diffed["changed"]] == ["state.txt"]
    assert [e["path"] for e in diffed["added"]] == ["new.txt"]
    verified = json.loads(ckpt("verify", store.url, "--full", "--json").stdout)
    assert verified["ok"] and verified["chunks"]["hashed"] >= 4
    collected = json.loads(ckpt("gc", store.url, "--keep", "1", "--json").stdout)
    assert [d["generation"] for d in collected["dropped"]] == [1]
    listed = json.loads(ckpt("ls", store.url, "--json").stdout)["snapshots"]
    assert [r["generation"] for r in listed] == [2]
    ckpt("verify", store.url, "--full")
    out = tmp_path / "out"
    ckpt("restore", store.url, str(out))
    assert read_tree(out) == {k: v.encode() for k, v in {**V1, **V2}.items()}
