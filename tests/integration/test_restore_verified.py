"""Which snapshot comes back (issue 16, items 4 to 6), through the real binary
and a file remote:

- restore prefers verified: `ckpt restore` and `ckpt run` skip a snapshot
  taken while files were in progress (its manifest says `"verified": false`)
  for the newest verified one, and say so; `--snapshot` restores exactly
  what it names; an unverified one alone is still restored, with a warning
  naming its files; manifests written before checks are read as always;
- `ckpt ls` shows checks and what a restore uses, `ckpt verify` re-runs the
  format checks on stored files, reading only the chunks a check needs;
- the crash-loop guard: a snapshot whose file loads as garbage makes the
  child fail twice, the third attempt runs on the snapshot before it, the
  mark is shown by `ckpt ls` and cleared by `ckpt unsuspect`; retention
  never counts a suspect snapshot;
- a torn checkpoint directory left by a crash is put back or moved aside
  at the next start.

Snapshots taken while a file was in progress are made by rewriting a
manifest of a local repository the way the snapshot side writes them (the
schema of manifest.py): manifests are plain JSON under snapshots/.
"""

from __future__ import annotations

import io
import json
import os
import struct
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

from ._util import (
    chunk_path,
    ckpt_ok,
    error_lines,
    ls_json,
    manifest_paths,
    manifests,
    read_report,
    reporter,
    run_args,
    run_ckpt,
    script,
)

# ---------------------------------------------------------------- helpers


def _push(src: Path, remote: Path, cwd: Path, files: dict[str, bytes]) -> dict[str, Any]:
    """Write files into src (by rename) and push it: the new manifest. The
    push checks nothing (--no-format-checks), so a torn file goes in as it
    is and the manifest says `verified: null`, as one written before ckpt
    checked files: the tests rewrite it into the state they need."""
    for rel, data in files.items():
        p = src / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, p)
    before = {m["id"] for m in manifests(remote)}
    ckpt_ok(["push", str(src), str(remote), "--keep", "100", "--no-format-checks"], cwd=cwd)
    new = [m for m in manifests(remote) if m["id"] not in before]
    assert len(new) == 1
    time.sleep(0.01)  # the next version's mtime differs
    return new[0]


def _rewrite(remote: Path, snapshot_id: str, **fields: Any) -> None:
    """Rewrite a manifest's fields as the snapshot side writes them."""
    (path,) = [p for p in manifest_paths(remote) if p.stem.endswith(snapshot_id)]
    doc = json.loads(path.read_bytes())
    doc.update(fields)
    path.write_text(json.dumps(doc))


def _unverified(remote: Path, snapshot_id: str, *files: tuple[str, str]) -> None:
    _rewrite(
        remote,
        snapshot_id,
        verified=False,
        unverified=[{"path": p, "reason": why} for p, why in files],
    )


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


def _ls_rows(remote: Path, cwd: Path) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in ls_json(remote, cwd=cwd)["snapshots"]}


def _events(path: Path, kind: str) -> list[dict[str, Any]]:
    found = [json.loads(line) for line in path.read_text().splitlines()]
    return [e for e in found if e["event"] == kind]


def _safetensors(n: int) -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}})
    return struct.pack("<Q", len(header)) + header.encode() + bytes(4 * n)


WHOLE_1 = _zip({"archive/data.pkl": b"one" * 100})
WHOLE_2 = _zip({"archive/data.pkl": b"two" * 100})
IN_PROGRESS = "open for writing by pid 4242 (python)"


# ---------------------------------------------------------------- restore prefers verified


def test_restore_skips_an_unverified_snapshot_and_says_why(tmp_path: Path, remote: Path) -> None:
    """The newest snapshot was taken while model.pt was being written: `ckpt
    restore` restores the one before it and names the skipped one, its file
    and why (the old binary restored the newest, the torn file with it)."""
    src = tmp_path / "src"
    m1 = _push(src, remote, tmp_path, {"model.pt": WHOLE_1, "log.txt": b"a\n"})
    m2 = _push(src, remote, tmp_path, {"model.pt": WHOLE_2[:200], "log.txt": b"a\nb\n"})
    _unverified(remote, m2["id"], ("model.pt", IN_PROGRESS))

    dest = tmp_path / "dest"
    res = ckpt_ok(["restore", str(remote), str(dest)], cwd=tmp_path)
    assert (dest / "model.pt").read_bytes() == WHOLE_1
    assert f"restored snapshot {m1['id']}" in res.stderr
    skipped = [line for line in res.stderr.splitlines() if m2["id"] in line]
    assert skipped and "unverified" in skipped[0] and "model.pt" in skipped[0]
    assert IN_PROGRESS in skipped[0]

    # --snapshot restores exactly what it names, with a warning.
    exact = tmp_path / "exact"
    res = ckpt_ok(["restore", str(remote), str(exact), "--snapshot", m2["id"]], cwd=tmp_path)
    assert (exact / "model.pt").read_bytes() == WHOLE_2[:200]
    assert "unverified" in res.stderr and "as asked" in res.stderr

    # ls shows the state, and which one a restore uses.
    rows = _ls_rows(remote, tmp_path)
    assert rows[m2["id"]]["checks"] == "unverified" and rows[m2["id"]]["state"] == "unverified"
    assert rows[m2["id"]]["unverified"] == [{"path": "model.pt", "reason": IN_PROGRESS}]
    assert rows[m1["id"]]["restore"] is True and rows[m1["id"]]["state"] == "newest"
    assert rows[m1["id"]]["checks"] == "unchecked"  # written before checks: read as always
    table = ckpt_ok(["ls", str(remote)], cwd=tmp_path).stdout
    line2 = next(line for line in table.splitlines() if line.startswith(m2["id"]))
    line1 = next(line for line in table.splitlines() if line.startswith(m1["id"]))
    assert "unverified" in line2 and "newest" in line1 and "newest" not in line2


def test_an_unverified_snapshot_alone_is_still_restored_with_a_warning(
    tmp_path: Path, remote: Path
) -> None:
    """Nothing else exists: the unverified snapshot is restored (skipped, not
    damaged), the warning naming its unverified files."""
    src = tmp_path / "src"
    m1 = _push(src, remote, tmp_path, {"model.pt": WHOLE_1})
    _unverified(remote, m1["id"], ("model.pt", "fails the zip check: cut short"))
    dest = tmp_path / "dest"
    res = ckpt_ok(["restore", str(remote), str(dest)], cwd=tmp_path)
    assert (dest / "model.pt").read_bytes() == WHOLE_1
    warned = [line for line in res.stderr.splitlines() if "warning" in line]
    assert any("model.pt" in w and "fails the zip check" in w for w in warned), res.stderr
    assert not error_lines(res.stderr)


def test_run_starts_from_the_newest_verified_snapshot(tmp_path: Path, remote: Path) -> None:
    """`ckpt run` on an empty --dir picks what `ckpt restore` and `ckpt ls`
    pick; a --dir that holds the unverified snapshot exactly is replaced by
    it (nothing lost: the unverified one stays in the remote)."""
    src = tmp_path / "src"
    m1 = _push(src, remote, tmp_path, {"model.pt": WHOLE_1, "log.txt": b"a\n"})
    m2 = _push(src, remote, tmp_path, {"model.pt": WHOLE_2[:300], "log.txt": b"a\nb\n"})
    _unverified(remote, m2["id"], ("model.pt", IN_PROGRESS))
    report = tmp_path / "report.json"
    ck = tmp_path / "ck"
    res = ckpt_ok([*run_args(ck, remote), *reporter(tmp_path, report)], cwd=tmp_path)
    got = read_report(report)
    assert got["CKPT_RESTORED"] == m1["id"], res.stderr
    assert m2["id"] in res.stderr and "unverified" in res.stderr

    # --dir holding the unverified snapshot exactly (a copy made with --snapshot).
    held = tmp_path / "held"
    ckpt_ok(["restore", str(remote), str(held), "--snapshot", m2["id"]], cwd=tmp_path)
    res = ckpt_ok([*run_args(held, remote), *reporter(tmp_path, report)], cwd=tmp_path)
    assert read_report(report)["CKPT_RESTORED"] == m1["id"], res.stderr
    assert (held / "model.pt").read_bytes() == WHOLE_1


def test_ls_and_restore_agree_with_verified_manifests(tmp_path: Path, remote: Path) -> None:
    """Manifests that say verified: the newest is what a restore uses."""
    src = tmp_path / "src"
    m1 = _push(src, remote, tmp_path, {"model.pt": WHOLE_1})
    m2 = _push(src, remote, tmp_path, {"model.pt": WHOLE_2})
    for m in (m1, m2):
        _rewrite(remote, m["id"], verified=True)
    rows = _ls_rows(remote, tmp_path)
    assert rows[m2["id"]]["checks"] == "verified" and rows[m2["id"]]["restore"] is True
    assert rows[m1["id"]]["restore"] is False and rows[m1["id"]]["state"] == "complete"
    dest = tmp_path / "dest"
    ckpt_ok(["restore", str(remote), str(dest)], cwd=tmp_path)
    assert (dest / "model.pt").read_bytes() == WHOLE_2


# ---------------------------------------------------------------- push checks what it pushes


@pytest.mark.parametrize("fmt", ["zip", "safetensors"])
def test_a_push_of_a_torn_file_is_refused_and_the_whole_one_stays(
    tmp_path: Path, remote: Path, fmt: str
) -> None:
    """A file torn in place (cut short) in DIR: `ckpt push --keep 1` wrote it
    unchecked (`verified: null`, what a restore prefers), retention deleted
    the whole snapshot and a restore gave the torn file, exit 0 (the old
    binary). Asserted: the push is refused as a commit is (65), one line
    naming the file, its check and --no-format-checks; no snapshot is
    written and the whole one still restores byte for byte; a whole file is
    pushed `verified` with the check it passed; --no-format-checks pushes
    the torn file as it is."""
    name, whole = ("model.pt", WHOLE_1) if fmt == "zip" else ("w.safetensors", _safetensors(64))
    src = tmp_path / "src"
    src.mkdir()
    (src / name).write_bytes(whole)
    ckpt_ok(["push", str(src), str(remote)], cwd=tmp_path)
    (m1,) = manifests(remote)
    assert m1.get("verified") is True, m1
    assert [e.get("check") for e in m1["entries"]] == [fmt]

    os.truncate(src / name, len(whole) // 2)  # in place, as a writer killed half-way leaves it
    res = run_ckpt(["push", str(src), str(remote), "--keep", "1"], cwd=tmp_path)
    assert res.returncode == 65, res.stderr
    (line,) = error_lines(res.stderr)
    assert name in line and f"{fmt} check" in line and "--no-format-checks" in line, line
    assert [m["id"] for m in manifests(remote)] == [m1["id"]]
    dest = tmp_path / "dest"
    ckpt_ok(["restore", str(remote), str(dest)], cwd=tmp_path)
    assert (dest / name).read_bytes() == whole

    ckpt_ok(["push", str(src), str(remote), "--keep", "1", "--no-format-checks"], cwd=tmp_path)
    (m2,) = manifests(remote)
    assert m2["id"] != m1["id"] and m2.get("verified") is None, m2


# ---------------------------------------------------------------- verify


def test_verify_reports_a_stored_file_that_fails_its_format_check(
    tmp_path: Path, remote: Path
) -> None:
    """A snapshot holding a torn torch file (a zip cut short) is damaged to
    `ckpt verify` (65), naming the file and the check; a whole one is not
    (the old binary checked chunks only: exit 0)."""
    src = tmp_path / "src"
    m1 = _push(src, remote, tmp_path, {"model.pt": WHOLE_1})
    m2 = _push(src, remote, tmp_path, {"model.pt": WHOLE_2[: len(WHOLE_2) // 2]})
    res = run_ckpt(["verify", str(remote)], cwd=tmp_path)
    assert res.returncode == 65, res.stderr
    (line,) = error_lines(res.stderr)
    assert m2["id"] in line and m1["id"] not in line
    assert "model.pt" in res.stdout and "zip" in res.stdout
    doc = json.loads(run_ckpt(["verify", str(remote), "--json"], cwd=tmp_path).stdout)
    problems = {s["id"]: s["problems"] for s in doc["snapshots"]}
    assert problems[m1["id"]] == []
    assert [(p["kind"], p["path"]) for p in problems[m2["id"]]] == [("format", "model.pt")]
    assert "zip" in problems[m2["id"]][0]["detail"]
    ok = run_ckpt(["verify", str(remote), "--snapshot", m1["id"]], cwd=tmp_path)
    assert ok.returncode == 0 and "no file fails its format check" in ok.stderr


def test_verify_reads_only_the_chunks_a_check_needs(tmp_path: Path, remote: Path) -> None:
    """A 1 MiB zip in 64 KiB chunks: the zip check reads the first and the
    last chunks (local header, central directory, end record), verifying
    each by its hash: a corrupt middle chunk goes unread (only --full
    finds it), a corrupt last chunk is found."""
    remote.mkdir()
    config = {"format": "ckpt", "version": 1, "chunk_size": 65536, "hash": "blake3"}
    (remote / "ckpt.json").write_text(json.dumps(config))
    data = _zip({"archive/data/0": os.urandom(1 << 20)})
    m = _push(tmp_path / "src", remote, tmp_path, {"model.pt": data})
    (e,) = [x for x in m["entries"] if x["path"] == "model.pt"]
    chunks = e["chunks"]
    assert len(chunks) == 17
    doc = json.loads(run_ckpt(["verify", str(remote), "--json"], cwd=tmp_path).stdout)
    assert doc["ok"] is True and doc["files_checked"] == 1
    assert 1 <= doc["chunks"]["read_for_format_checks"] <= 3

    middle = chunk_path(remote, chunks[8])
    middle.write_bytes(b"x" * middle.stat().st_size)
    assert run_ckpt(["verify", str(remote)], cwd=tmp_path).returncode == 0
    full = run_ckpt(["verify", str(remote), "--full"], cwd=tmp_path)
    assert full.returncode == 65 and chunks[8][:12] in full.stdout

    last = chunk_path(remote, chunks[-1])
    last.write_bytes(b"y" * last.stat().st_size)
    res = run_ckpt(["verify", str(remote), "--json"], cwd=tmp_path)
    assert res.returncode == 65
    kinds = [(p["kind"], p["chunk"]) for p in json.loads(res.stdout)["snapshots"][0]["problems"]]
    assert ("corrupt_chunk", chunks[-1]) in kinds


# ---------------------------------------------------------------- crash-loop guard

#: Reads state.json; garbage (it parses, but is not a state) fails with 75.
LOADER = """
    import json, os, sys
    d = os.environ["CKPT_DIR"]
    state = json.load(open(os.path.join(d, "state.json")))
    with open(sys.argv[1], "a") as f:
        f.write(json.dumps({"attempt": os.environ["CKPT_ATTEMPT"],
                            "restored": os.environ["CKPT_RESTORED"], "state": state}) + "\\n")
    if "step" not in state:
        if len(sys.argv) > 2:  # what a failing script leaves: a line in a log of --dir
            with open(os.path.join(d, "train.log"), "a") as f:
                f.write("attempt %s failed\\n" % os.environ["CKPT_ATTEMPT"])
        sys.exit(75)
    state["step"] += 1
    tmp = os.path.join(d, "state.json.tmp")
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, os.path.join(d, "state.json"))
"""


@pytest.mark.parametrize("leaves", [False, True], ids=["quiet", "leaves-a-log"])
def test_crash_loop_rolls_back_to_the_previous_snapshot(
    tmp_path: Path, remote: Path, leaves: bool
) -> None:
    """The newest snapshot's state.json loads as garbage: attempts 1 and 2
    fail right after its restore, the guard marks it suspect and attempt 3
    runs on the snapshot before it (the old binary relaunched on the
    garbage until the retries were spent, 75). ls shows the mark, the event
    log has the rollback, `ckpt unsuspect` clears it. A script that leaves a
    line in a log of --dir before it fails makes a snapshot after each exit:
    those are marked too (garbage and all), and are no progress."""
    src = tmp_path / "src"
    good = _push(src, remote, tmp_path, {"state.json": b'{"step": 1}'})
    bad = _push(src, remote, tmp_path, {"state.json": b'{"garbage": [1, 2, 3]}'})
    log, events = tmp_path / "attempts.log", tmp_path / "events.jsonl"
    args = run_args(tmp_path / "ck", remote, "--log-json", str(events), "--keep", "100")
    loader = [*script(tmp_path, "loader.py", LOADER), str(log), *(["leave"] if leaves else [])]
    res = run_ckpt([*args, *loader], cwd=tmp_path)
    attempts = [json.loads(line) for line in log.read_text().splitlines()]
    assert attempts[0]["restored"] == bad["id"], attempts
    assert [a["state"] for a in attempts[:2]] == [{"garbage": [1, 2, 3]}] * 2, attempts
    assert len(attempts) == 3, (attempts, res.stderr)
    assert attempts[2]["restored"] == good["id"] and attempts[2]["state"] == {"step": 1}
    assert res.returncode == 0, res.stderr
    loud = [line for line in res.stderr.splitlines() if "CRASH LOOP" in line]
    assert len(loud) == 1 and bad["id"] in loud[0] and good["id"] in loud[0], res.stderr
    (rollback,) = _events(events, "rollback")
    assert (rollback["snapshot"], rollback["to"]) == (bad["id"], good["id"])
    assert rollback["marked"][0] == bad["id"] and rollback["attempts"] == [1, 2]
    # Every snapshot of what the failures left (one per exit: the garbage and
    # the log) is marked; the last snapshot is attempt 3's own, not marked.
    after = [m["id"] for m in manifests(remote) if m["generation"] > bad["generation"]]
    assert rollback["marked"][1:] == after[:-1] and len(after) == (3 if leaves else 1)

    rows = _ls_rows(remote, tmp_path)
    assert rows[bad["id"]]["state"] == "suspect", rows
    assert "crash loop" in rows[bad["id"]]["suspect"]["why"]
    assert rows[good["id"]]["suspect"] is None
    table = ckpt_ok(["ls", str(remote)], cwd=tmp_path).stdout
    assert "suspect: crash loop" in next(ln for ln in table.splitlines() if bad["id"] in ln)

    # A restore skips it while it is marked; `ckpt unsuspect` clears the mark.
    only_two = tmp_path / "only-two"
    res = ckpt_ok(["restore", str(remote), str(only_two), "--snapshot", bad["id"]], cwd=tmp_path)
    assert "marked suspect" in res.stderr and "as asked" in res.stderr
    res = ckpt_ok(["unsuspect", str(remote), bad["id"]], cwd=tmp_path)
    assert "cleared" in res.stderr
    assert _ls_rows(remote, tmp_path)[bad["id"]]["suspect"] is None
    res = ckpt_ok(["unsuspect", str(remote), bad["id"]], cwd=tmp_path)
    assert "not marked" in res.stderr


def test_crash_loop_guard_off_and_retention_never_counts_a_suspect(
    tmp_path: Path, remote: Path
) -> None:
    """--crash-loop 0: no rollback. A suspect newest snapshot does not count
    for --keep: `ckpt gc --keep 1` keeps the whole one before it (the one a
    rollback needs) and the suspect one (the old binary kept only the
    newest)."""
    src = tmp_path / "src"
    good = _push(src, remote, tmp_path, {"state.json": b'{"step": 1}'})
    bad = _push(src, remote, tmp_path, {"state.json": b'{"garbage": 1}'})
    log = tmp_path / "attempts.log"
    args = run_args(tmp_path / "ck", remote, "--crash-loop", "0", "--retries", "2")
    res = run_ckpt([*args, *script(tmp_path, "loader.py", LOADER), str(log)], cwd=tmp_path)
    assert res.returncode == 75, res.stderr
    attempts = [json.loads(line) for line in log.read_text().splitlines()]
    assert [a["restored"] for a in attempts] == [bad["id"]] * 3
    assert "CRASH LOOP" not in res.stderr

    # The mark, as the guard writes it (its object alone: nothing else changes).
    key = f"snapshots/{bad['generation']:010d}-{bad['id']}.json"
    mark = remote / "suspect" / key
    mark.parent.mkdir(parents=True)
    mark.write_text(json.dumps({"format": "ckpt-suspect", "version": 1, "why": "crash loop"}))
    ckpt_ok(["gc", str(remote), "--keep", "1"], cwd=tmp_path)
    assert {m["id"] for m in manifests(remote)} == {good["id"], bad["id"]}
    dest = tmp_path / "dest"
    ckpt_ok(["restore", str(remote), str(dest)], cwd=tmp_path)
    assert json.loads((dest / "state.json").read_text()) == {"step": 1}


# ---------------------------------------------------------------- torn directories at a start

LISTER = """
    import json, os, sys
    d = os.environ["CKPT_DIR"]
    out = {}
    for root, dirs, files in os.walk(d):
        dirs[:] = [x for x in dirs if not x.startswith(".ckpt-")]
        for name in files:
            p = os.path.join(root, name)
            out[os.path.relpath(p, d)] = os.path.getsize(p)
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
"""

TRAINER_STATE = b'{"global_step": 1}'


def test_a_torn_hf_checkpoint_dir_is_moved_aside_at_the_next_start(
    tmp_path: Path, remote: Path
) -> None:
    """The machine died while the Trainer wrote checkpoint-2/ (weights and
    optimizer, no trainer_state.json yet; get_last_checkpoint would pick it
    and fail). The next `ckpt run` keeps the newer local state but moves the
    torn checkpoint-2/ to a kept dir (no snapshot holds it whole; its
    sibling checkpoint-1/ is whole), so the child sees the last whole one.
    A torn file no snapshot holds whole is left as it is, with a warning.
    (The old binary kept everything as it was.)"""
    ck = tmp_path / "ck"
    one = {
        "checkpoint-1/model.safetensors": _safetensors(2),
        "checkpoint-1/optimizer.pt": WHOLE_1,
        "checkpoint-1/trainer_state.json": TRAINER_STATE,
    }
    _push(ck, remote, tmp_path, one)
    time.sleep(1.1)  # the crash comes later than the snapshot, by this machine's clock
    (ck / "checkpoint-2").mkdir()
    (ck / "checkpoint-2" / "model.safetensors").write_bytes(_safetensors(3))
    (ck / "checkpoint-2" / "optimizer.pt").write_bytes(WHOLE_2[:100])
    (ck / "notes.pt").write_bytes(WHOLE_2[:50])  # torn, and no snapshot ever held it
    out = tmp_path / "seen.json"
    events = tmp_path / "events.jsonl"
    lister = script(tmp_path, "lister.py", LISTER)
    args = run_args(ck, remote, "--log-json", str(events))
    res = ckpt_ok([*args, *lister, str(out)], cwd=tmp_path)
    seen = json.loads(out.read_text())
    assert not any(p.startswith("checkpoint-2/") for p in seen), (seen, res.stderr)
    assert "checkpoint-1/trainer_state.json" in seen and seen["notes.pt"] == 50
    (repair,) = _events(events, "repair")
    assert repair["moved_aside"] == ["checkpoint-2"]
    assert [x["path"] for x in repair["left"]] == ["notes.pt"]
    kept = Path(repair["kept"])
    assert (kept / "checkpoint-2" / "optimizer.pt").read_bytes() == WHOLE_2[:100]
    assert "notes.pt is torn" in res.stderr and "left as it is" in res.stderr


def test_a_torn_dir_a_snapshot_holds_whole_is_put_back(tmp_path: Path, remote: Path) -> None:
    """checkpoint-1/ was whole in a snapshot; a crash left it rewritten in
    place (optimizer.pt again, no new trainer_state.json): the next start
    puts back the snapshot's checkpoint-1/ and keeps the torn one."""
    ck = tmp_path / "ck"
    one = {
        "checkpoint-1/model.safetensors": _safetensors(2),
        "checkpoint-1/optimizer.pt": WHOLE_1,
        "checkpoint-1/trainer_state.json": TRAINER_STATE,
    }
    m = _push(ck, remote, tmp_path, one)
    time.sleep(1.1)
    (ck / "checkpoint-1" / "trainer_state.json").unlink()
    (ck / "checkpoint-1" / "optimizer.pt").write_bytes(WHOLE_2[:100])
    out, events = tmp_path / "seen.json", tmp_path / "events.jsonl"
    args = run_args(ck, remote, "--log-json", str(events))
    res = ckpt_ok([*args, *script(tmp_path, "lister.py", LISTER), str(out)], cwd=tmp_path)
    seen = json.loads(out.read_text())
    assert seen["checkpoint-1/optimizer.pt"] == len(WHOLE_1), res.stderr
    assert "checkpoint-1/trainer_state.json" in seen
    (repair,) = _events(events, "repair")
    assert repair["files"] == [{"path": "checkpoint-1", "snapshot": m["id"], "generation": 1}]
    kept = Path(repair["kept"]) / "checkpoint-1" / "optimizer.pt"
    assert kept.read_bytes() == WHOLE_2[:100]
