"""The single-writer lease: a second writer is refused, a dead writer's lease
is taken over at once on the same host, and readers never need the lease."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from ._util import (
    Running,
    error_lines,
    has_snapshot_with,
    ls_json,
    pid_gone,
    read_tree,
    reporter,
    restore_into,
    run_args,
    run_ckpt,
    script,
    wait_for,
    writer,
)

pytestmark = pytest.mark.timeout(180)

#: Saves state, announces itself in argv[1] (outside the dir), then waits.
SLEEPER = """
    import json, os, sys, time
    from pathlib import Path
    d = Path(os.environ["CKPT_DIR"])
    tmp = d / "state.txt.tmp"
    tmp.write_text(sys.argv[2])
    os.replace(tmp, d / "state.txt")
    ready = Path(sys.argv[1])
    part = ready.with_name(ready.name + ".part")
    part.write_text(json.dumps({"pid": os.getpid()}))
    os.replace(part, ready)
    while True:
        time.sleep(0.05)
"""


def _start_writer(
    spawn: Callable[..., Running], tmp_path: Path, ckpt_dir: Path, remote: Path, content: str
) -> tuple[Running, int]:
    ready = tmp_path / "ready.json"
    cmd = [*script(tmp_path, "sleeper.py", SLEEPER), str(ready), content]
    # A long lease timeout: a takeover can only come from the dead-pid rule.
    ckpt = spawn([*run_args(ckpt_dir, remote, "--lease-timeout", "600"), *cmd])
    wait_for(ready.exists, what="the first run's child to start", proc=ckpt)
    pid = json.loads(ready.read_text())["pid"]
    ckpt.extra_pids.append(pid)
    return ckpt, pid


def test_second_writer_is_refused_and_dead_writer_is_taken_over(
    spawn: Callable[..., Running], tmp_path: Path, ckpt_dir: Path, remote: Path
) -> None:
    first, first_child = _start_writer(spawn, tmp_path, ckpt_dir, remote, "first")
    assert (remote / "lease.json").exists()

    marker = tmp_path / "second-child-ran.json"
    res = run_ckpt(
        [*run_args(tmp_path / "other", remote), *reporter(tmp_path, marker)],
        cwd=tmp_path,
        timeout=30,
    )
    assert res.returncode == 69, res.stderr
    errors = error_lines(res.stderr)
    assert len(errors) == 1, res.stderr
    assert "in use" in errors[0] or "lease" in errors[0], errors
    assert not marker.exists()
    assert first.proc.poll() is None, "the refused run must not disturb the first"

    first.signal(signal.SIGKILL)
    first.wait()  # reaped: its pid is really gone, as after a crash
    wait_for(lambda: pid_gone(first_child), what="the first run's child to be gone")
    assert (remote / "lease.json").exists(), "a SIGKILLed writer cannot release its lease"

    res = run_ckpt(
        [
            *run_args(ckpt_dir, remote, "--lease-timeout", "600"),
            *writer(tmp_path, {"state.txt": "second"}),
        ],
        cwd=tmp_path,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert "took over the lease" in res.stderr
    assert str(first.pid) in res.stderr
    assert not (remote / "lease.json").exists(), "released at the end of the run"
    out = tmp_path / "fresh"
    restore_into(remote, out, cwd=tmp_path)
    assert read_tree(out) == {"state.txt": b"second"}


def test_push_is_refused_while_a_run_holds_the_lease(
    spawn: Callable[..., Running], tmp_path: Path, ckpt_dir: Path, remote: Path
) -> None:
    first, _child = _start_writer(spawn, tmp_path, ckpt_dir, remote, "first")
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.txt").write_text("x")
    before = sorted(p.name for p in (remote / "snapshots").glob("*.json"))
    res = run_ckpt(["push", str(src), str(remote)], cwd=tmp_path, timeout=30)
    assert res.returncode == 69, res.stderr
    assert len(error_lines(res.stderr)) == 1, res.stderr
    assert not [
        m
        for m in (remote / "snapshots").glob("*.json")
        if m.name not in before and "x.txt" in m.read_text()
    ]
    first.signal(signal.SIGTERM)
    assert first.wait() == 143, first.stderr()


def test_ls_and_restore_work_while_a_writer_holds_the_lease(
    spawn: Callable[..., Running], tmp_path: Path, ckpt_dir: Path, remote: Path
) -> None:
    first, _child = _start_writer(spawn, tmp_path, ckpt_dir, remote, "during the run")
    snap = wait_for(
        lambda: has_snapshot_with(remote, "state.txt"), what="a snapshot of state.txt", proc=first
    )
    assert snap is not None and (remote / "lease.json").exists()

    listed = ls_json(remote, cwd=tmp_path)["snapshots"]
    assert snap["id"] in [s["id"] for s in listed]
    out = tmp_path / "fresh"
    restore_into(remote, out, cwd=tmp_path)
    assert read_tree(out) == {"state.txt": b"during the run"}

    assert first.proc.poll() is None, "readers must not disturb the writer"
    assert (remote / "lease.json").exists()
    first.signal(signal.SIGTERM)
    assert first.wait() == 143, first.stderr()
    assert not (remote / "lease.json").exists()


#: Notes its launch in argv[1], then holds on until argv[2] exists.
HOLDER = """
    import os, sys, time
    from pathlib import Path
    with open(sys.argv[1], "a") as f:
        f.write(os.environ["CKPT_RUN"] + "\\n")
    while not Path(sys.argv[2]).exists():
        time.sleep(0.05)
"""


def test_simultaneous_writers_on_a_fresh_remote_exactly_one_wins(
    spawn: Callable[..., Running], tmp_path: Path, remote: Path
) -> None:
    launches, go = tmp_path / "launches.log", tmp_path / "go"
    cmd = [*script(tmp_path, "holder.py", HOLDER), str(launches), str(go)]
    runs = [spawn([*run_args(tmp_path / f"ck{i}", remote), *cmd]) for i in range(3)]

    def losers() -> list[Running]:
        done = [r for r in runs if r.proc.poll() is not None]
        return done if len(done) >= 2 else []

    lost = wait_for(losers, what="two of the three runs to give up")
    for r in lost:
        assert r.proc.returncode == 69, r.stderr()
    wait_for(launches.exists, what="the winner's child to start")
    go.touch()
    (winner,) = [r for r in runs if r not in lost]
    assert winner.wait() == 0, winner.stderr()
    assert len(launches.read_text().split()) == 1
