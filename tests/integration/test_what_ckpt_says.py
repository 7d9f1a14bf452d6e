"""What ckpt says is true (issue 20, item 5), through the real binary: each
claim of the README that a check against the binary found wrong, kept
true where a test can see it. `ckpt signal` from another shell, the words
of a second stop signal, `CKPT_RESTORED` over a newer local directory, the
"newest" of `ckpt ls` beside a corrupt chunk, `show`/`diff` on damaged
snapshots, a multi-node remote's `ckpt ls`, and counts in English."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ckpt._contract import ExitCode
from ckpt_cli.run.signals import ECHO_WINDOW

from ._util import (
    PY,
    Running,
    chunk_path,
    ckpt_ok,
    error_lines,
    ls_json,
    manifest_paths,
    run_args,
    run_ckpt,
    wait_for,
    write_script,
)

pytestmark = pytest.mark.timeout(240)

# ---------------------------------------------------------------- ckpt signal

#: Installs the shim's checkpoint-signal handler, says so in argv[1], and
#: exits 0 once the signal came (writing got.txt into its directory).
WAITS_FOR_SIGNAL = """
    import json, os, sys, time
    from pathlib import Path
    import ckpt
    ckpt.on_preemption(lambda: None)
    ready = Path(sys.argv[1])
    tmp = ready.with_name(ready.name + ".part")
    tmp.write_text(json.dumps({"pid": os.getpid()}))
    os.replace(tmp, ready)
    while not ckpt.preemption_requested():
        time.sleep(0.02)
    (Path(os.environ["CKPT_DIR"]) / "got.txt").write_text("signalled")
"""


def _waiting_run(spawn: Callable[..., Running], tmp_path: Path, name: str) -> Running:
    child = write_script(tmp_path / "waits.py", WAITS_FOR_SIGNAL)
    ready = tmp_path / f"{name}.ready"
    run = spawn(
        [*run_args(tmp_path / name, tmp_path / f"{name}-remote"), PY, str(child), str(ready)],
        name=name,
    )
    wait_for(ready.exists, what=f"the child of {name} to start", proc=run)
    run.extra_pids.append(json.loads(ready.read_text())["pid"])
    return run


def test_ckpt_signal_from_another_shell_finds_the_running_supervisor(
    spawn: Callable[..., Running], tmp_path: Path
) -> None:
    """No CKPT_SOCKET in another shell: `ckpt signal` finds the running `ckpt
    run` of this user as `ckpt status` does. One: that one; several: --dir
    says which (a bare `ckpt signal` is refused, naming them); none: one line."""
    one = _waiting_run(spawn, tmp_path, "one")
    two = _waiting_run(spawn, tmp_path, "two")
    assert "CKPT_SOCKET" not in os.environ

    both = run_ckpt(["signal"], cwd=tmp_path, timeout=60)
    assert both.returncode == ExitCode.CONFIG, both.stderr
    (line,) = error_lines(both.stderr)
    assert "--dir" in line and str(tmp_path / "one") in line and str(tmp_path / "two") in line

    sent = run_ckpt(["signal", "--dir", "one"], cwd=tmp_path, timeout=60)
    assert sent.returncode == 0, sent.stderr
    assert "checkpoint signal sent to pid" in sent.stderr
    assert one.wait() == 0, one.stderr()
    assert (tmp_path / "one" / "got.txt").read_text() == "signalled"
    assert two.proc.poll() is None, "only the run of --dir one was signalled"

    alone = run_ckpt(["signal"], cwd=tmp_path, timeout=60)  # one running: that one
    assert alone.returncode == 0, alone.stderr
    assert two.wait() == 0, two.stderr()

    none = run_ckpt(["signal"], cwd=tmp_path, timeout=60)
    assert none.returncode == ExitCode.UNAVAILABLE, none.stderr
    assert len(error_lines(none.stderr)) == 1 and "Traceback" not in none.stderr
    gone = run_ckpt(["signal", "--dir", "one"], cwd=tmp_path, timeout=60)
    assert gone.returncode == ExitCode.UNAVAILABLE, gone.stderr
    assert str(tmp_path / "one") in error_lines(gone.stderr)[0]


# ---------------------------------------------------------------- CKPT_RESTORED

#: Writes state.txt (argv[2]) into its directory and records what it was told.
TELLS = """
    import json, os, sys
    from pathlib import Path
    Path(sys.argv[1]).write_text(json.dumps({
        k: os.environ.get(k) for k in ("CKPT_RESTORED", "CKPT_RESTORED_STEP", "CKPT_ATTEMPT")
    }))
    d = Path(os.environ["CKPT_DIR"])
    seen = (d / "state.txt").read_text() if (d / "state.txt").exists() else None
    (d / "seen.txt").write_text(str(seen))
    (d / "state.txt").write_text(sys.argv[2])
"""


def test_ckpt_restored_names_what_a_kept_newer_dir_descends_from(tmp_path: Path) -> None:
    """A --dir modified after the newest snapshot is kept (it is newer) and
    becomes the next snapshot, whose parent is that snapshot: the child is
    told it descends from it, as after a relaunch, not "nothing restored"."""
    child = write_script(tmp_path / "tells.py", TELLS)
    ck, remote, told = tmp_path / "ck", tmp_path / "remote", tmp_path / "told.json"
    ckpt_ok([*run_args(ck, remote), PY, str(child), str(told), "first"], cwd=tmp_path)
    (first,) = [s["id"] for s in ls_json(remote, cwd=tmp_path)["snapshots"]]
    (ck / "state.txt").write_text("edited here after the upload")  # newer than the snapshot

    res = ckpt_ok([*run_args(ck, remote), PY, str(child), str(told), "second"], cwd=tmp_path)

    assert "keeping the local state" in res.stderr, res.stderr
    assert (ck / "seen.txt").read_text() == "edited here after the upload", "kept, not restored"
    env = json.loads(told.read_text())
    assert env["CKPT_RESTORED"] == first, env
    assert env["CKPT_ATTEMPT"] == "2"
    newest = json.loads(manifest_paths(remote)[-1].read_bytes())
    assert newest["parent"] == first, "the next snapshot names the same parent"

    # --no-restore: ckpt was told to start from --dir as it is, descent unknown.
    ckpt_ok(
        [*run_args(ck, remote, "--no-restore"), PY, str(child), str(told), "third"],
        cwd=tmp_path,
    )
    assert json.loads(told.read_text())["CKPT_RESTORED"] == ""


# ---------------------------------------------------------------- a second stop signal

#: Writes nothing until SIGTERM, then final.txt, and exits 0.
SAVES_ON_TERM = """
    import os, signal, sys, time
    from pathlib import Path
    def on_term(signum, frame):
        (Path(os.environ["CKPT_DIR"]) / "final.txt").write_text("saved on SIGTERM")
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    Path(sys.argv[1]).write_text(str(os.getpid()))
    while True:
        time.sleep(0.05)
"""


FLUSH_WAITS = "waiting for the final snapshot to be durable, at most 120s (--flush-timeout)"


def test_a_second_stop_during_the_flush_tells_one_story(
    store_of: Any, spawn: Callable[..., Running], tmp_path: Path
) -> None:
    """The final snapshot's upload is under way (the S3 server stalls), which
    the console says off a terminal, when a second SIGTERM abandons the
    flush: the upload still finishes once the server answers, and the
    console says so once, truthfully (not "nothing is durable yet" and then
    a durable snapshot a line later)."""
    store = store_of("s3-moto")
    assert store.server is not None
    child = write_script(tmp_path / "saves.py", SAVES_ON_TERM)
    ready = tmp_path / "ready"
    env = {**store.env, "CKPT_IO_TIMEOUT": "120"}
    # No snapshot before the stop: nothing is written until SIGTERM, no rescan.
    args = run_args(tmp_path / "ck", store.url, "--rescan", "3600", debounce="3600")
    run = spawn([*args, PY, str(child), str(ready)], env=env)
    wait_for(ready.exists, what="the child to start", proc=run)
    run.extra_pids.append(int(ready.read_text()))
    store.server.pause()
    try:
        run.signal(signal.SIGTERM)
        first = time.monotonic()
        # A long wait says so off a terminal (one line; on one, a bar).
        wait_for(lambda: FLUSH_WAITS in run.stderr(), what="the flush's wait said", proc=run)
        time.sleep(max(0.0, first + ECHO_WINDOW + 0.2 - time.monotonic()))  # not an echo
        run.signal(signal.SIGTERM)
        wait_for(lambda: "abandon" in run.stderr(), what="the flush abandoned", proc=run)
    finally:
        store.server.resume()
    assert run.wait() == 128 + signal.SIGTERM, run.stderr()
    err = run.stderr()
    assert "nothing is durable yet" not in err, err
    listed = run_ckpt(["ls", store.url, "--json"], cwd=tmp_path, env=store.env)
    (newest,) = [s["id"] for s in json.loads(listed.stdout)["snapshots"]]
    assert f"final state is durable as snapshot {newest}" in err, err
    assert f"newest durable snapshot: {newest}" in err
    out = tmp_path / "out"
    restored = run_ckpt(["restore", store.url, str(out)], cwd=tmp_path, env=store.env)
    assert restored.returncode == 0, restored.stderr
    assert (out / "final.txt").read_text() == "saved on SIGTERM"


# ---------------------------------------------------------------- ls, show, diff


def _two_pushes(tmp_path: Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    remote, src = tmp_path / "remote", tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("first")
    ckpt_ok(["push", str(src), str(remote)], cwd=tmp_path)
    (src / "a.txt").write_text("second, longer")
    ckpt_ok(["push", str(src), str(remote)], cwd=tmp_path)
    first, second = (json.loads(p.read_bytes()) for p in manifest_paths(remote))
    return remote, first, second


def _chunk_of(manifest: dict[str, Any]) -> str:
    (entry,) = [e for e in manifest["entries"] if e["type"] == "file"]
    digest: str = entry["chunks"][0]
    return digest


def test_ls_says_newest_is_not_re_hashed_where_restore_skips_a_corrupt_chunk(
    tmp_path: Path,
) -> None:
    """A chunk of the newest snapshot corrupt in place (same size): the one
    listing `ckpt ls` makes sees it present and calls the snapshot "newest";
    a restore re-hashes, falls back and marks it suspect, which the next ls
    shows. ls says what its "newest" rests on, and `verify --full` finds it."""
    remote, _first, second = _two_pushes(tmp_path)
    chunk = chunk_path(remote, _chunk_of(second))
    chunk.write_bytes(b"x" * chunk.stat().st_size)

    listed = run_ckpt(["ls", str(remote)], cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "newest" in listed.stdout.splitlines()[1]
    assert "none was re-hashed" in listed.stderr and "verify --full" in listed.stderr
    doc = ls_json(remote, cwd=tmp_path)
    assert doc["rehashed"] is False and doc["snapshots"][0]["state"] == "newest"

    out = tmp_path / "out"
    restored = run_ckpt(["restore", str(remote), str(out)], cwd=tmp_path)
    assert restored.returncode == 0, restored.stderr
    assert (out / "a.txt").read_text() == "first", "restore skips the corrupt one"
    assert "marks it suspect" in listed.stderr
    after = ls_json(remote, cwd=tmp_path)["snapshots"]
    assert [s["state"] for s in after] == ["suspect", "newest"], after
    full = run_ckpt(["verify", str(remote), "--full"], cwd=tmp_path)
    assert full.returncode == ExitCode.DAMAGED and second["id"] in full.stderr, full.stderr


def test_show_and_diff_exit_65_only_for_a_manifest_that_does_not_parse(tmp_path: Path) -> None:
    """show and diff read manifests, not chunks: a snapshot missing a chunk
    is still shown (exit 0; `ckpt verify` is what checks chunks); one whose
    manifest does not parse is 65."""
    remote, _first, second = _two_pushes(tmp_path)
    chunk_path(remote, _chunk_of(second)).unlink()
    shown = run_ckpt(["show", str(remote), second["id"], "--json"], cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert [e["path"] for e in json.loads(shown.stdout)["entries"]] == ["a.txt"]
    assert run_ckpt(["diff", str(remote), "1", "2"], cwd=tmp_path).returncode == 0
    assert run_ckpt(["verify", str(remote)], cwd=tmp_path).returncode == ExitCode.DAMAGED

    manifest_paths(remote)[0].write_text("{not json")
    for args in (["show", str(remote), "1"], ["diff", str(remote), "1", "2"]):
        res = run_ckpt(args, cwd=tmp_path)
        assert res.returncode == ExitCode.DAMAGED, f"{args}: {res.stderr}"
        assert len(error_lines(res.stderr)) == 1


#: Writes its rank's shard and commits it as step argv[1] (or, with argv[2]
#: "auto", leaves it to the automatic snapshot).
RANK_WRITER = """
    import os, sys
    from pathlib import Path
    import ckpt
    d = Path(os.environ["CKPT_DIR"])
    (d / f"shard-{os.environ['CKPT_RANK']}.txt").write_text(sys.argv[1])
    if sys.argv[2:] != ["auto"]:
        ckpt.commit(step=int(sys.argv[1]))
"""


def test_ls_of_a_multi_node_remote_prints_a_table(tmp_path: Path) -> None:
    """Two ranks of a world of 2 on one remote: `ckpt ls` prints a table on
    stdout (the steps complete on all ranks, the newest marked; with no
    step-tagged commits, each rank's newest snapshot), not only two lines
    on stderr."""
    child = write_script(tmp_path / "rank.py", RANK_WRITER)
    for name, mode in (("steps", []), ("auto", ["auto"])):
        remote = tmp_path / f"remote-{name}"
        for rank, step in ((0, "100"), (1, "100"), (0, "200")):
            ck = tmp_path / f"{name}-ck{rank}"
            args = run_args(ck, remote, "--rank", str(rank), "--world-size", "2")
            ckpt_ok([*args, PY, str(child), step, *mode], cwd=tmp_path)
        res = run_ckpt(["ls", str(remote)], cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        lines = res.stdout.splitlines()
        if name == "steps":
            assert lines[0].split()[:2] == ["step", "ranks"], res.stdout
            rows = [line.split() for line in lines[1:]]
            assert [r[0] for r in rows] == ["100"], "step 200 is not on every rank"
            assert rows[0][-1] == "newest"
        else:
            assert lines[0].split()[:3] == ["rank", "snapshots", "newest"], res.stdout
            assert [line.split()[0] for line in lines[1:]] == ["0", "1"]


# ---------------------------------------------------------------- counts


def test_counts_read_as_english(tmp_path: Path) -> None:
    """One file is "1 file", one attempt "1 attempt": no "1 files", no
    "attempt(s)", in what run, push, restore and verify say."""
    child = write_script(tmp_path / "one.py", TELLS)
    ck, remote = tmp_path / "ck", tmp_path / "remote"
    run = ckpt_ok(
        [*run_args(ck, remote), PY, str(child), str(tmp_path / "t.json"), "x"], cwd=tmp_path
    )
    src = tmp_path / "src"
    src.mkdir()
    (src / "only.txt").write_text("one")
    pushed = ckpt_ok(["push", str(src), str(tmp_path / "r2")], cwd=tmp_path)
    restored = ckpt_ok(["restore", str(tmp_path / "r2"), str(tmp_path / "out")], cwd=tmp_path)
    verified = ckpt_ok(["verify", str(tmp_path / "r2")], cwd=tmp_path)
    said = run.stderr + pushed.stderr + restored.stderr + verified.stderr
    for wrong in ("(s)", "(es)", " 1 files", " 1 snapshots", " 1 attempts", " 1 chunks"):
        assert wrong not in said, f"{wrong!r} in:\n{said}"
    assert "done: 1 attempt (exit code 0); 1 snapshot," in run.stderr, run.stderr
    assert "2 files," in run.stderr  # state.txt and seen.txt
    assert ": 1 file, 3 B" in pushed.stderr and "1 file, 3 B" in restored.stderr
    assert "verified 1 snapshot in" in verified.stderr


def test_a_restore_off_a_terminal_says_when_it_starts(tmp_path: Path) -> None:
    """A long wait off a terminal is one line per state change: the restore
    says it begins, and then what it restored."""
    remote, _first, second = _two_pushes(tmp_path)
    out = tmp_path / "out"
    res = ckpt_ok(["restore", str(remote), str(out)], cwd=tmp_path)
    lines = res.stderr.splitlines()
    assert lines[0] == f"ckpt: restoring into {out}", res.stderr
    assert lines[-1].startswith(f"ckpt: restored snapshot {second['id']}"), res.stderr


def test_writers_create_a_missing_local_remote_and_readers_create_nothing(
    tmp_path: Path,
) -> None:
    """As the README decides it: `ckpt ls` / `restore` of a local path whose
    parent is missing too is one line, 69, and creates nothing; `ckpt push`
    (like `ckpt run`) makes the path, the repository 0700."""
    remote = tmp_path / "a" / "b" / "remote"
    for args in (["ls", str(remote)], ["restore", str(remote), str(tmp_path / "out")]):
        res = run_ckpt(args, cwd=tmp_path)
        assert res.returncode == ExitCode.UNAVAILABLE, f"{args}: {res.stderr}"
        assert len(error_lines(res.stderr)) == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "out").exists()
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.txt").write_text("x")
    ckpt_ok(["push", str(src), str(remote)], cwd=tmp_path)
    assert (remote.stat().st_mode & 0o777) == 0o700
    assert len(ls_json(remote, cwd=tmp_path)["snapshots"]) == 1


# ---------------------------------------------------------------- kept at start

#: Writes its pid to argv[1], then sleeps: it never touches --dir.
SLEEPS = """
    import os, sys, time
    from pathlib import Path
    Path(sys.argv[1]).write_text(str(os.getpid()))
    time.sleep(600)
"""


@pytest.mark.parametrize("history", ["empty remote", "older snapshot"])
def test_a_dir_kept_at_start_is_uploaded_before_the_first_rescan(
    history: str, spawn: Callable[..., Running], tmp_path: Path
) -> None:
    """--dir holds data no snapshot has: the remote is empty ("is uploaded as
    the first"), or --dir was modified after the newest snapshot ("becomes
    the next snapshot"). The child never writes, so no file event comes, and
    --rescan 3600 puts the safety net out of reach: the upload the console
    promised must come on its own, one --debounce after the start. Then the
    machine dies (kill -9) and a new machine restores exactly that state."""
    ck, remote = tmp_path / "ck", tmp_path / "remote"
    ck.mkdir()
    (ck / "model.pt").write_bytes(os.urandom(300_000))
    if history == "older snapshot":
        ckpt_ok(["push", str(ck), str(remote)], cwd=tmp_path)
        os.utime(ck / "model.pt", (time.time() + 5, time.time() + 5))  # edited after it
        (ck / "model.pt").write_bytes(os.urandom(300_000))
    before = ls_json(remote, cwd=tmp_path)["snapshots"] if remote.exists() else []
    kept = {p.name: p.read_bytes() for p in ck.iterdir()}
    child = write_script(tmp_path / "sleeps.py", SLEEPS)
    pid_file = tmp_path / "child.pid"
    run = spawn([*run_args(ck, remote, "--rescan", "3600"), PY, str(child), str(pid_file)])
    started = wait_for(lambda: pid_file.exists() and pid_file.read_text(), what="child", proc=run)
    run.extra_pids.append(int(started))
    promise = "is uploaded as the first" if not before else "becomes the next snapshot"
    wait_for(lambda: promise in run.stderr(), what="the plan's line", proc=run)

    def uploaded() -> bool:
        return len(ls_json(remote, cwd=tmp_path)["snapshots"]) > len(before)

    wait_for(uploaded, what="the kept --dir's upload", proc=run, interval=0.3)
    run.signal(signal.SIGKILL)
    run.wait()
    fresh = tmp_path / "new-machine"
    ckpt_ok(["restore", str(remote), str(fresh)], cwd=tmp_path)
    assert {p.name: p.read_bytes() for p in fresh.iterdir()} == kept
