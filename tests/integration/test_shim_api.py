"""`import ckpt` inside a child of the real `ckpt run`: read/write, resume after
RecoverableError, commit (durable or pinned), a pinned file torn in place,
--snapshots auto|commit, save/load of bytes, files and directories (sync and
async), and the checkpoint signal sent with `ckpt signal`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ._util import (
    CKPT,
    PY,
    Running,
    entry,
    error_lines,
    ls_json,
    manifests,
    newest_manifest,
    pid_gone,
    read_tree,
    restore_into,
    run_args,
    run_ckpt,
    script,
    wait_for,
)

pytestmark = pytest.mark.timeout(180)

#: Put in front of every child below: argv[1] is a JSON-lines log outside the
#: checkpoint dir (report(...) appends one line); gate(name) waits until the
#: test creates <log dir>/gates/<name>.
PRELUDE = """
    import json, os, sys, time
    from pathlib import Path
    LOG = Path(sys.argv[1])
    GATES = LOG.parent / "gates"

    def report(**fields):
        with open(LOG, "a") as f:
            f.write(json.dumps(fields) + "\\n")

    def gate(name):
        while not (GATES / name).exists():
            time.sleep(0.02)
"""


def _child(tmp_path: Path, name: str, body: str) -> tuple[list[str], Path]:
    """A child script (PRELUDE + body) and the log it reports to."""
    log = tmp_path / "child.log"
    src = textwrap.dedent(PRELUDE) + textwrap.dedent(body)
    return [*script(tmp_path, name, src), str(log)], log


def _reports(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def _open_gate(tmp_path: Path, name: str) -> None:
    gates = tmp_path / "gates"
    gates.mkdir(exist_ok=True)
    (gates / name).touch()


def _reported(log: Path, key: str) -> Callable[[], dict[str, Any] | None]:
    """A predicate for wait_for: the first report carrying `key`."""

    def find() -> dict[str, Any] | None:
        return next((r for r in _reports(log) if key in r), None)

    return find


def _await_report(log: Path, key: str, ckpt: Running, what: str) -> dict[str, Any]:
    found = wait_for(_reported(log, key), what=what, proc=ckpt)
    assert found is not None
    return found


def _ok(res: subprocess.CompletedProcess[str]) -> None:
    assert res.returncode == 0, f"ckpt exited {res.returncode}\nstderr:\n{res.stderr}"


# ---------------------------------------------------------------- read / write / resume

ROUND_TRIP = """
    import ckpt
    cp = ckpt.checkpoint()
    if cp.attempt == 1:
        report(attempt=1, prev=cp.prev_exists(), before=repr(cp.read()))
        cp.write(b"first")
        first = cp.read()
        cp.write(b"second\\x00bytes")
        report(round_trip=repr(first), again=repr(cp.read()))
        raise ckpt.RecoverableError("a flaky data node")
    report(attempt=cp.attempt, prev=cp.prev_exists(), before=repr(cp.read()),
           restored=cp.restored)
    cp.write(b"third")
"""


def test_write_read_round_trip_and_resume_after_recoverable_error(
    tmp_path: Path, remote: Path, ckpt_dir: Path
) -> None:
    cmd, log = _child(tmp_path, "round_trip.py", ROUND_TRIP)

    res = run_ckpt([*run_args(ckpt_dir, remote), *cmd], cwd=tmp_path)

    _ok(res)
    assert "RecoverableError: a flaky data node" in res.stderr, "the traceback is still shown"
    assert "attempt 1: exit code 75" in res.stderr
    first, trip, second = _reports(log)
    assert first == {"attempt": 1, "prev": False, "before": "None"}
    assert trip == {"round_trip": "b'first'", "again": "b'second\\x00bytes'"}
    assert second["attempt"] == 2
    assert second["prev"] is True
    assert second["before"] == "b'second\\x00bytes'", "attempt 2 reads what attempt 1 wrote last"
    assert second["restored"], "attempt 2 descends from a durable snapshot"
    assert second["restored"] in {s["id"] for s in ls_json(remote, cwd=tmp_path)["snapshots"]}
    fresh = tmp_path / "fresh"
    restore_into(remote, fresh, cwd=tmp_path)
    assert read_tree(fresh) == {"payload": b"third"}


# ---------------------------------------------------------------- commit(wait=True)

COMMIT_WAIT = """
    import ckpt
    cp = ckpt.checkpoint()
    d = cp.path
    d.mkdir(parents=True, exist_ok=True)
    (d / "a.txt").write_text("a v1")
    (d / "sub").mkdir()
    (d / "sub" / "b.txt").write_text("b v1")
    first = ckpt.commit()
    # After the commit: replace a.txt, add c.txt, delete sub/b.txt.
    (d / "a.txt.tmp").write_text("a v2")
    os.replace(d / "a.txt.tmp", d / "a.txt")
    (d / "c.txt").write_text("c v1")
    (d / "sub" / "b.txt").unlink()
    second = cp.commit(wait=True)
    report(first=first, second=second)
"""


def test_commit_wait_returns_a_listed_snapshot_of_the_dir_at_the_call(
    tmp_path: Path, remote: Path, ckpt_dir: Path
) -> None:
    cmd, log = _child(tmp_path, "commit_wait.py", COMMIT_WAIT)

    res = run_ckpt([*run_args(ckpt_dir, remote, "--keep", "20"), *cmd], cwd=tmp_path)

    _ok(res)
    [ids] = _reports(log)
    first, second = ids["first"], ids["second"]
    assert isinstance(first, str) and isinstance(second, str) and first != second
    listed = {s["id"]: s for s in ls_json(remote, cwd=tmp_path)["snapshots"]}
    assert first in listed and second in listed
    assert listed[first]["reason"] == "commit"
    out1, out2 = tmp_path / "at-first", tmp_path / "at-second"
    restore_into(remote, out1, cwd=tmp_path, snapshot=first)
    restore_into(remote, out2, cwd=tmp_path, snapshot=second)
    assert read_tree(out1) == {"a.txt": b"a v1", "sub/b.txt": b"b v1"}
    assert read_tree(out2) == {"a.txt": b"a v2", "c.txt": b"c v1"}


BROKEN_REMOTE = """
    import shutil
    import ckpt
    remote = Path(sys.argv[2])
    shutil.rmtree(remote / "snapshots", ignore_errors=True)
    (remote / "snapshots").write_text("not a directory any more")
    cp = ckpt.checkpoint()
    try:
        cp.write(b"cannot be made durable")
    except ckpt.CommitError as exc:
        report(error=str(exc), read=cp.read().decode())
    else:
        report(error=None)
"""


def test_commit_that_cannot_be_made_durable_raises_commit_error(
    tmp_path: Path, remote: Path, ckpt_dir: Path
) -> None:
    cmd, log = _child(tmp_path, "broken_remote.py", BROKEN_REMOTE)

    run_ckpt([*run_args(ckpt_dir, remote, "--flush-timeout", "2"), *cmd, str(remote)], cwd=tmp_path)

    [seen] = _reports(log)
    assert seen["error"], "write() returned although its commit failed"
    assert seen["read"] == "cannot be made durable", "the local save happened all the same"


def test_run_whose_last_commit_failed_to_upload_does_not_exit_0(
    tmp_path: Path, remote: Path, ckpt_dir: Path
) -> None:
    """The child succeeded but the state it committed is not in the (broken)
    remote: exit 0 would claim it durable (README: 69 then)."""
    cmd, log = _child(tmp_path, "broken_remote.py", BROKEN_REMOTE)

    res = run_ckpt(
        [*run_args(ckpt_dir, remote, "--flush-timeout", "2"), *cmd, str(remote)], cwd=tmp_path
    )

    assert _reports(log)[0]["error"]
    assert res.returncode == 69, f"exit {res.returncode} with nothing durable\n{res.stderr}"


# ---------------------------------------------------------------- commit(wait=False): pinned

COMMIT_PINNED = """
    import ckpt
    cp = ckpt.checkpoint()
    d = cp.path
    d.mkdir(parents=True, exist_ok=True)
    # A big file that sorts first keeps the snapshot busy before state.txt is read.
    (d / "a.bin.tmp").write_bytes(os.urandom(32 * 1024 * 1024))
    os.replace(d / "a.bin.tmp", d / "a.bin")
    (d / "state.txt.tmp").write_text("old state")
    os.replace(d / "state.txt.tmp", d / "state.txt")
    returned = cp.commit(wait=False)
    (d / "state.txt.tmp").write_text("new state, written after the commit returned")
    os.replace(d / "state.txt.tmp", d / "state.txt")
    report(returned=returned)
"""


@pytest.mark.slow
def test_commit_no_wait_returns_once_pinned_and_a_later_rename_does_not_change_it(
    tmp_path: Path, remote: Path, ckpt_dir: Path
) -> None:
    cmd, log = _child(tmp_path, "commit_pinned.py", COMMIT_PINNED)

    res = run_ckpt(
        [*run_args(ckpt_dir, remote, "--snapshots", "commit", "--concurrency", "1"), *cmd],
        cwd=tmp_path,
    )

    _ok(res)
    assert _reports(log) == [{"returned": None}], "wait=False has no snapshot id to return"
    assert (ckpt_dir / "state.txt").read_text().startswith("new state")
    [m] = manifests(remote)
    assert m["reason"] == "commit"
    state = entry(m, "state.txt")
    assert state is not None and state["size"] == len("old state")
    fresh = tmp_path / "fresh"
    restore_into(remote, fresh, cwd=tmp_path)
    assert (fresh / "state.txt").read_text() == "old state"
    assert (fresh / "a.bin").read_bytes() == (ckpt_dir / "a.bin").read_bytes()


# ---------------------------------------------------------------- a pinned file torn in place

#: argv[2] = "recommit": commit again once the in-place write is finished.
TORN = """
    import ckpt
    cp = ckpt.checkpoint()
    d = cp.path
    d.mkdir(parents=True, exist_ok=True)
    size = 48 * 1024 * 1024  # six 8 MiB chunks to read before the file is checked
    (d / "big.bin.tmp").write_bytes(os.urandom(size))
    os.replace(d / "big.bin.tmp", d / "big.bin")
    cp.commit(wait=False)
    with open(d / "big.bin", "r+b") as f:  # in place: the pinned inode itself
        f.seek(-4096, os.SEEK_END)
        f.write(b"\\xff" * 4096)
        f.write(b"garbage appended at the end")
        f.flush()
    report(torn=True)
    if sys.argv[2:] == ["recommit"]:
        report(second=cp.commit(wait=True))
"""


@pytest.mark.slow
def test_pinned_file_changed_in_place_fails_that_commit_loudly(
    tmp_path: Path, remote: Path, ckpt_dir: Path
) -> None:
    cmd, log = _child(tmp_path, "torn.py", TORN)

    res = run_ckpt(
        [
            *run_args(ckpt_dir, remote, "--snapshots", "commit", "--concurrency", "1"),
            *cmd,
            "recommit",
        ],
        cwd=tmp_path,
    )

    _ok(res)
    errors = error_lines(res.stderr)
    assert any("big.bin" in e and "changed in place" in e for e in errors), res.stderr
    second = _reports(log)[-1]["second"]
    # The torn commit wrote nothing; the one after the write finished holds it whole.
    [m] = manifests(remote)
    assert m["id"] == second
    big = entry(m, "big.bin")
    assert big is not None
    assert big["size"] == 48 * 1024 * 1024 + len("garbage appended at the end")
    fresh = tmp_path / "fresh"
    restore_into(remote, fresh, cwd=tmp_path)
    assert (fresh / "big.bin").read_bytes() == (ckpt_dir / "big.bin").read_bytes()


@pytest.mark.slow
def test_run_whose_only_commit_was_torn_does_not_claim_durable_success(
    tmp_path: Path, remote: Path, ckpt_dir: Path
) -> None:
    """The child succeeded, but the state it committed never became durable:
    exit 0 means "final state durable" (README), so the run must not exit 0."""
    cmd, log = _child(tmp_path, "torn.py", TORN)

    res = run_ckpt(
        [*run_args(ckpt_dir, remote, "--snapshots", "commit", "--concurrency", "1"), *cmd],
        cwd=tmp_path,
    )

    assert _reports(log) == [{"torn": True}]
    assert any("changed in place" in e for e in error_lines(res.stderr)), res.stderr
    assert manifests(remote) == []
    assert res.returncode == 69, (
        f"exit {res.returncode} although nothing the child committed is durable\n{res.stderr}"
    )


# ---------------------------------------------------------------- --snapshots auto | commit

#: Writes files as the test opens gates; commits when told; reports commit ids.
STAGED = """
    import ckpt
    cp = ckpt.checkpoint()
    d = cp.path
    d.mkdir(parents=True, exist_ok=True)

    def put(name, text):
        (d / (name + ".tmp")).write_text(text)
        os.replace(d / (name + ".tmp"), d / name)

    put("early.txt", "written before any commit")
    report(wrote="early.txt")
    gate("commit-1")
    report(commit1=ckpt.commit())
    put("late.txt", "written after the first commit")
    report(wrote="late.txt")
    gate("commit-2")
    report(commit2=ckpt.commit())
    put("final.txt", "written after the last commit")
    report(wrote="final.txt")
"""

#: Long enough for the supervisor to snapshot a quiet directory many times over
#: in auto mode before the first commit (10 x --debounce, 2 x --rescan).
QUIET = 2.0


def _snapshot_with(remote: Path, name: str) -> Callable[[], dict[str, Any] | None]:
    def find() -> dict[str, Any] | None:
        return next((m for m in manifests(remote) if entry(m, name) is not None), None)

    return find


def _paths(m: dict[str, Any]) -> set[str]:
    return {e["path"] for e in m["entries"]}


def _settle(ckpt: Running, seconds: float) -> None:
    """Let the supervisor run for a while (nothing may happen: that is the point)."""
    try:
        ckpt.proc.wait(seconds)
    except subprocess.TimeoutExpired:
        return
    raise AssertionError(f"ckpt exited early with {ckpt.proc.returncode}:\n{ckpt.stderr()}")


def test_snapshots_auto_quiet_periods_until_the_first_commit_then_only_commits(
    spawn: Callable[..., Running], tmp_path: Path, remote: Path, ckpt_dir: Path
) -> None:
    cmd, log = _child(tmp_path, "staged.py", STAGED)
    ckpt = spawn([*run_args(ckpt_dir, remote, "--rescan", "1", "--keep", "50"), *cmd])

    # Before any commit, a file left alone is snapshotted on its own.
    early = wait_for(_snapshot_with(remote, "early.txt"), what="an auto snapshot", proc=ckpt)
    assert early is not None
    assert early["reason"] != "commit"

    _open_gate(tmp_path, "commit-1")
    commit1 = _await_report(log, "commit1", ckpt, "the first commit")["commit1"]
    wait_for(lambda: {"wrote": "late.txt"} in _reports(log), what="late.txt", proc=ckpt)
    _settle(ckpt, QUIET)
    assert _snapshot_with(remote, "late.txt")() is None, (
        "after the first commit a quiet period must not snapshot an uncommitted file"
    )
    assert newest_manifest(remote)["id"] == commit1

    _open_gate(tmp_path, "commit-2")
    assert ckpt.wait() == 0, ckpt.stderr()
    commit2 = _reported(log, "commit2")()
    assert commit2 is not None
    newest = newest_manifest(remote)
    assert newest["id"] == commit2["commit2"], "the final flush made no snapshot of its own"
    assert _paths(newest) == {"early.txt", "late.txt"}
    assert (ckpt_dir / "final.txt").exists()
    fresh = tmp_path / "fresh"
    restore_into(remote, fresh, cwd=tmp_path)
    assert set(read_tree(fresh)) == {"early.txt", "late.txt"}


def test_snapshots_commit_takes_no_snapshot_without_a_commit(
    spawn: Callable[..., Running], tmp_path: Path, remote: Path, ckpt_dir: Path
) -> None:
    cmd, log = _child(tmp_path, "staged.py", STAGED)
    ckpt = spawn([*run_args(ckpt_dir, remote, "--snapshots", "commit", "--rescan", "1"), *cmd])

    wait_for(lambda: {"wrote": "early.txt"} in _reports(log), what="early.txt", proc=ckpt)
    _settle(ckpt, QUIET)
    assert manifests(remote) == [], "--snapshots commit: no snapshot before a commit"

    _open_gate(tmp_path, "commit-1")
    commit1 = _await_report(log, "commit1", ckpt, "the first commit")["commit1"]
    [m] = manifests(remote)
    assert m["id"] == commit1 and _paths(m) == {"early.txt"}

    _open_gate(tmp_path, "commit-2")
    assert ckpt.wait() == 0, ckpt.stderr()
    commit2 = _reported(log, "commit2")()
    assert commit2 is not None
    assert [m["id"] for m in manifests(remote)] == [commit1, commit2["commit2"]]
    assert "final.txt" not in _paths(newest_manifest(remote))


# ---------------------------------------------------------------- save / load (flyte 2.x)

SAVE_LOAD = """
    import asyncio, shutil
    import ckpt
    cp = ckpt.checkpoint()
    src = Path(sys.argv[2])

    def rel(p):
        return None if p is None else os.path.relpath(p, cp.path)

    def listing():
        return sorted(p.relative_to(cp.path).as_posix() for p in cp.path.rglob("*"))

    report(step="fresh", load=rel(cp.load_sync()))
    cp.save_sync(str(src / "model.bin"))  # a file, by str path: copied in under its name
    report(step="file", load=rel(cp.load_sync()), files=listing(),
           same=(cp.path / "model.bin").read_bytes() == (src / "model.bin").read_bytes())
    cp.save_sync(b"payload bytes")
    report(step="bytes", load=rel(cp.load_sync()), read=cp.read().decode())
    cp.save_sync(src / "tree")  # a directory: replaces the whole contents
    report(step="dir", load=rel(cp.load_sync()), files=listing())
    asyncio.run(cp.save(b"async bytes"))
    loaded = asyncio.run(cp.load())
    report(step="async", load=rel(loaded), read=loaded.read_bytes().decode(), files=listing())
    try:
        cp.save_sync(src / "missing")
    except FileNotFoundError as exc:
        report(step="missing", error=str(exc))
"""


def test_save_and_load_of_bytes_files_and_directories(
    tmp_path: Path, remote: Path, ckpt_dir: Path
) -> None:
    src = tmp_path / "src"
    (src / "tree" / "sub").mkdir(parents=True)
    (src / "model.bin").write_bytes(os.urandom(100_000))
    (src / "tree" / "x.txt").write_text("x")
    (src / "tree" / "sub" / "y.txt").write_text("y")
    cmd, log = _child(tmp_path, "save_load.py", SAVE_LOAD)

    res = run_ckpt([*run_args(ckpt_dir, remote, "--keep", "20"), *cmd, str(src)], cwd=tmp_path)

    _ok(res)
    steps = {r["step"]: r for r in _reports(log)}
    assert steps["fresh"]["load"] is None
    assert steps["file"] == {
        "step": "file",
        "load": ".",
        "files": ["model.bin"],
        "same": True,
    }
    assert steps["bytes"]["load"] == "payload" and steps["bytes"]["read"] == "payload bytes"
    assert steps["dir"]["load"] == ".", "no payload any more: the directory"
    assert steps["dir"]["files"] == ["sub", "sub/y.txt", "x.txt"], "old files are gone"
    assert steps["async"]["load"] == "payload" and steps["async"]["read"] == "async bytes"
    assert steps["async"]["files"] == ["payload", "sub", "sub/y.txt", "x.txt"]
    assert "missing" in steps["missing"]["error"]
    assert (src / "tree" / "x.txt").exists(), "the source directory is left alone"
    # Every save committed: each state is a snapshot, the last one holds the end state.
    reasons = [m["reason"] for m in manifests(remote)]
    assert reasons.count("commit") >= 4, reasons
    fresh = tmp_path / "fresh"
    restore_into(remote, fresh, cwd=tmp_path)
    assert read_tree(fresh) == {"payload": b"async bytes", "sub/y.txt": b"y", "x.txt": b"x"}


# ---------------------------------------------------------------- the checkpoint signal

PREEMPTIBLE = """
    import signal
    import ckpt
    calls = []
    ckpt.on_preemption(lambda: calls.append(time.time()))
    report(ready=True, socket=os.environ["CKPT_SOCKET"], pid=os.getpid(),
           signal=os.environ.get("CKPT_CHECKPOINT_SIGNAL"),
           requested=ckpt.preemption_requested())
    while not ckpt.preemption_requested():
        time.sleep(0.02)
    cp = ckpt.checkpoint()
    cp.write(b"saved on preemption")
    report(callbacks=len(calls), requested=ckpt.preemption_requested(),
           committed=cp.commit())
"""


@pytest.mark.parametrize("sig", ["default", "SIGUSR2"])
def test_ckpt_signal_runs_the_preemption_callback_and_the_child_saves(
    spawn: Callable[..., Running], tmp_path: Path, remote: Path, ckpt_dir: Path, sig: str
) -> None:
    extra = [] if sig == "default" else ["--checkpoint-signal", sig]
    cmd, log = _child(tmp_path, "preemptible.py", PREEMPTIBLE)
    ckpt = spawn([*run_args(ckpt_dir, remote, *extra), *cmd])
    ready = _await_report(log, "ready", ckpt, "the child to start")
    ckpt.extra_pids.append(ready["pid"])
    assert ready["signal"] == ("SIGUSR1" if sig == "default" else sig)
    assert ready["requested"] is False

    sent = run_ckpt(["signal", "--socket", ready["socket"]], cwd=tmp_path, timeout=60)

    assert sent.returncode == 0, sent.stderr
    assert f"checkpoint signal sent to pid {ready['pid']}\n" in sent.stderr
    assert ckpt.wait() == 0, ckpt.stderr()
    done = _reports(log)[-1]
    assert done["callbacks"] == 1 and done["requested"] is True
    assert done["committed"] in {s["id"] for s in ls_json(remote, cwd=tmp_path)["snapshots"]}
    assert "attempt 2" not in ckpt.stderr()
    fresh = tmp_path / "fresh"
    restore_into(remote, fresh, cwd=tmp_path)
    assert read_tree(fresh) == {"payload": b"saved on preemption"}


#: Never imports ckpt: SIGUSR1 would kill it (default action).
UNPREPARED = """
    report(ready=True, socket=os.environ["CKPT_SOCKET"], pid=os.getpid())
    gate("finish")
    report(finished=True)
"""


def test_ckpt_signal_refuses_a_child_without_a_handler_and_leaves_it_running(
    spawn: Callable[..., Running], tmp_path: Path, remote: Path, ckpt_dir: Path
) -> None:
    cmd, log = _child(tmp_path, "unprepared.py", UNPREPARED)
    ckpt = spawn([*run_args(ckpt_dir, remote), *cmd])
    ready = _await_report(log, "ready", ckpt, "the child to start")
    ckpt.extra_pids.append(ready["pid"])

    env = {"CKPT_SOCKET": ready["socket"]}  # the --socket default
    res = run_ckpt(["signal"], cwd=tmp_path, timeout=60, env=env)

    assert res.returncode != 0
    [line] = error_lines(res.stderr)
    assert "handler" in line and "not sent" in line, line
    assert not pid_gone(ready["pid"]), "the unprepared child must not be signalled"
    _open_gate(tmp_path, "finish")
    assert ckpt.wait() == 0, ckpt.stderr()
    assert _reports(log)[-1] == {"finished": True}
    assert "attempt 2" not in ckpt.stderr()
    assert f"killed by {signal.Signals.SIGUSR1.name}" not in ckpt.stderr()


def test_ckpt_signal_with_no_supervisor_running_is_one_line(tmp_path: Path) -> None:
    res = run_ckpt(["signal"], cwd=tmp_path, timeout=60)
    assert res.returncode == 69  # nothing to signal: no ckpt run of this user runs here
    [line] = error_lines(res.stderr)
    assert "CKPT_SOCKET" in line and "--socket" in line, line


# ---------------------------------------------------------------- commit(step=)

STEP_COMMITS = """
    import ckpt
    cp = ckpt.checkpoint()
    report(restored_step=cp.restored_step, rank=cp.rank, world_size=cp.world_size,
           env_step=os.environ["CKPT_RESTORED_STEP"])
    if cp.restored_step is None:
        (cp.path / "w.txt").write_text("step 100")
        a = ckpt.commit(step=100)
        b = ckpt.commit(step=200)  # nothing changed, but a new step is a new snapshot
        c = ckpt.commit(step=200)  # nothing changed, same step: the same snapshot
        try:
            ckpt.commit(step=-1)
        except ValueError as exc:
            bad = str(exc)
        try:
            ckpt.commit(step=2**63 - 1)
        except ValueError as exc:
            big = str(exc)
        report(ids=[a, b, c], bad=bad, big=big)
"""


def test_commit_with_a_step_is_recorded_and_restored_with_it(
    tmp_path: Path, remote: Path, ckpt_dir: Path
) -> None:
    cmd, log = _child(tmp_path, "steps.py", STEP_COMMITS)
    _ok(run_ckpt([*run_args(ckpt_dir, remote, "--keep", "20"), *cmd], cwd=tmp_path))
    first, ids = _reports(log)
    assert first == {"restored_step": None, "rank": 0, "world_size": 1, "env_step": ""}
    a, b, c = ids["ids"]
    assert a != b and b == c, "a new step makes a snapshot; the same step again does not"
    assert "whole number" in ids["bad"]
    assert "from 0 to 4611686018427387903" in ids["big"], ids["big"]
    steps = {s["id"]: s["step"] for s in ls_json(remote, cwd=tmp_path)["snapshots"]}
    assert (steps[a], steps[b]) == (100, 200)
    assert not (remote / "ranks").exists(), "a single node keeps the single-node layout"

    import shutil

    shutil.rmtree(ckpt_dir)
    log.unlink()
    _ok(run_ckpt([*run_args(ckpt_dir, remote), *cmd], cwd=tmp_path))
    [again] = _reports(log)
    assert again["restored_step"] == 200 and again["env_step"] == "200"


def test_a_commit_of_more_files_than_the_soft_open_file_limit(tmp_path: Path) -> None:
    """A commit holds every file of --dir open at the moment it pins. Under
    the soft open-file limit most systems start processes with (1024; here
    256) and a --dir of 600 files, `ckpt commit` failed with "Too many open
    files" (exit 69, which no retry mends): the supervisor raises its own
    soft limit toward the hard one for the pin."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"the hard open-file limit is {hard}: no room to raise the soft one")
    script = (
        'for i in $(seq 1 600); do echo "$i" > "$CKPT_DIR/f$i"; done; '
        '"$0" commit --step 1 && echo COMMITTED'
    )

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    res = subprocess.run(
        [str(CKPT), "run", "--dir", str(tmp_path / "ck"), "--remote", str(tmp_path / "remote"),
         "--snapshots", "commit", "--", "sh", "-c", script, str(CKPT)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, preexec_fn=low_limit,
        stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "COMMITTED" in res.stdout, res.stderr
    assert "Too many open files" not in res.stderr
    [m] = manifests(tmp_path / "remote")
    assert sum(1 for e in m["entries"] if e["type"] == "file") == 600


def test_a_save_of_a_directory_keeps_the_kept_dirs_inside_dir(tmp_path: Path) -> None:
    """--dir holds a kept dir of ckpt's (`.ckpt-kept-*`: what a repair or a
    restore in place moved aside, maybe the only copy of a file); the child
    replaces the checkpoint with `cp.save_sync(other_dir)`. The kept dir is
    still there, byte for byte: the save replaced the whole --dir, kept dir
    and all."""
    ck = tmp_path / "ck"
    kept = ck / ".ckpt-kept-20261208T000000-abcd"
    kept.mkdir(parents=True)
    (kept / "model.pt").write_bytes(b"the only copy")
    (ck / "old.txt").write_bytes(b"old")
    new = tmp_path / "new"
    new.mkdir()
    (new / "x.txt").write_bytes(b"new")
    child = (
        "import ckpt, os, sys; cp = ckpt.checkpoint(); cp.save_sync(sys.argv[1]); "
        "print(sorted(os.listdir(cp.path)))"
    )
    res = run_ckpt(
        ["run", "--no-restore", "--dir", str(ck), "--remote", str(tmp_path / "remote"),
         "--", PY, "-c", child, str(new)],
        cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert (kept / "model.pt").read_bytes() == b"the only copy"
    assert (ck / "x.txt").read_bytes() == b"new" and not (ck / "old.txt").exists()
