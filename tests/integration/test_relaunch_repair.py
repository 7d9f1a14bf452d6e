"""Relaunch onto the last whole state (issue 16, "What goes wrong today" 2):
a child killed (SIGKILL) half-way through an in-place `torch.save`, at every
write boundary of the save, always resumes from a whole checkpoint and ends
with the weights of an uninterrupted run, whether ckpt relaunches it or a
new `ckpt run` starts on the same disk after the machine died (ckpt killed
with it). Through the real binary, real torch, a real file remote.

The training is deterministic (every step's input comes from a generator
seeded by the step). Each attempt loads ckpt.pt, trains a step, saves it in
place and waits until a snapshot holds that save, then trains a step and
saves again through a file object that kills at write boundary k (k = 0:
right after the truncating open; k = the number of writes: after the last
one, the new file whole).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ckpt_cli import formats

from ._util import Running, ckpt_ok, entry, manifests, pid_gone, run_args, script, wait_for

torch = pytest.importorskip("torch")

TRAIN = """
    import io, json, os, signal, sys, time
    from pathlib import Path
    import torch

    torch.set_num_threads(1)
    d = Path(os.environ["CKPT_DIR"])
    log, remote, final = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    plan = json.loads(sys.argv[4])  # {"total": T, "kill_at": k or None, "kill": "self"|"ckpt"}
    attempt = int(os.environ.get("CKPT_ATTEMPT") or 0)
    path = d / "ckpt.pt"


    def note(**fields):
        with open(log, "a") as f:
            f.write(json.dumps({"attempt": attempt, **fields}) + "\\n")


    def init():
        g = torch.Generator().manual_seed(0)
        return {"w": torch.randn(64, generator=g), "b": torch.zeros(8), "step": 0}


    def train_step(state):
        s = state["step"]
        g = torch.Generator().manual_seed(1000 + s)
        state["w"] = state["w"] * 0.9 + 0.1 * torch.randn(64, generator=g)
        state["b"] = state["b"] + float(s)
        state["step"] = s + 1


    class Writes(io.RawIOBase):
        # The save's file object: counts writes, and at boundary `kill_at`
        # (before write number kill_at + 1) kills (the child, or ckpt too).
        def __init__(self, f=None, kill_at=None):
            self.f, self.kill_at, self.n, self.pos = f, kill_at, 0, 0

        def writable(self):
            return True

        def write(self, b):
            if self.n == self.kill_at:
                die()
            if self.f is not None:
                self.f.write(b)
                self.f.flush()
            self.n += 1
            self.pos += len(b)
            return len(b)

        def tell(self):
            return self.pos


    def die():
        if plan.get("kill") == "ckpt":  # the machine dies: ckpt first, then us
            os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


    def save(state, kill_at=None):
        with open(path, "wb") as f:  # in place: truncated, then written
            w = Writes(f, kill_at)
            torch.save(state, w)
            if kill_at is not None and w.n == kill_at:
                die()  # the last boundary: every byte written


    def snapshotted():
        # A snapshot in the remote holds ckpt.pt exactly as it is now.
        st = path.stat()
        for m in sorted(Path(remote, "snapshots").glob("*.json")):
            try:
                doc = json.loads(m.read_bytes())
            except (OSError, ValueError):
                continue
            for e in doc["entries"]:
                if e["path"] == "ckpt.pt" and (e["size"], e["mtime_ns"]) == (
                    st.st_size,
                    st.st_mtime_ns,
                ):
                    return True
        return False


    if path.exists():
        try:
            state = torch.load(path)
        except Exception as exc:
            head = path.read_bytes()[:8].hex() if path.exists() else None
            size = path.stat().st_size if path.exists() else None
            note(error=f"{type(exc).__name__}: {exc}", size=size, head=head)
            sys.exit(3)  # not retried: the test sees it
    else:
        state = init()
    kill_at = plan.get("kill_at")
    if kill_at == "attempt":  # ckpt relaunches: attempt a kills at boundary a - 1
        counter = Writes()
        torch.save(state, counter)
        kill_at = attempt - 1 if attempt - 1 <= counter.n else None
    note(loaded=state["step"], kill_at=kill_at, pid=os.getpid())
    saves = 0
    while state["step"] < plan["total"]:
        train_step(state)
        if kill_at is not None and saves == 1:
            save(state, kill_at)
        save(state)
        saves += 1
        if kill_at is not None and remote != "-":
            end = time.monotonic() + 120
            while not snapshotted():
                if time.monotonic() > end:
                    note(error="no snapshot of the save")
                    sys.exit(4)
                time.sleep(0.02)
    torch.save({"w": state["w"], "b": state["b"], "step": state["step"]}, final)
    note(done=state["step"])
"""


def _boundaries() -> int:
    """How many writes torch.save makes of the training state."""
    import io

    class Counter(io.RawIOBase):
        n = 0

        def writable(self) -> bool:
            return True

        def write(self, b: Any) -> int:
            self.n += 1
            return len(b)

    c = Counter()
    g = torch.Generator().manual_seed(0)
    torch.save({"w": torch.randn(64, generator=g), "b": torch.zeros(8), "step": 0}, c)
    return c.n


def _reference(tmp_path: Path, train: list[str], total: int) -> Any:
    """The weights of an uninterrupted run (no ckpt, no kill)."""
    d, out = tmp_path / "ref", tmp_path / "ref-final.pt"
    d.mkdir()
    env = {**os.environ, "CKPT_DIR": str(d)}
    plan = json.dumps({"total": total})
    subprocess.run(
        [*train, str(tmp_path / "ref.log"), "-", str(out), plan], env=env, check=True, timeout=600
    )
    return torch.load(out)


def _log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_resumes(log: list[dict[str, Any]], boundaries: int) -> None:
    """Every boundary was killed at once, and every attempt after a kill
    loaded a whole checkpoint: the save before the torn one, or the new one
    when every byte of it was written."""
    assert not [r for r in log if "error" in r], log
    starts = [r for r in log if "loaded" in r]
    kills = [r["kill_at"] for r in starts if r["kill_at"] is not None]
    assert sorted(kills) == list(range(boundaries + 1)), kills
    for before, after in itertools.pairwise(starts):
        if before["kill_at"] is None:
            continue
        whole = before["loaded"] + 1  # the save that was snapshotted
        expected = whole + 1 if before["kill_at"] == boundaries else whole
        assert after["loaded"] == expected, (before, after)


def _same_weights(got_path: Path, ref: Any) -> None:
    got = torch.load(got_path)
    assert got["step"] == ref["step"]
    assert torch.equal(got["w"], ref["w"]) and torch.equal(got["b"], ref["b"])


def _no_torn_snapshot(remote: Path) -> None:
    """No snapshot taken after a child's exit recorded a torn ckpt.pt (the
    old binary's "exit" snapshot made the torn file the newest generation):
    every version such a snapshot holds has the size of a whole save (every
    save of this state has one size). The run keeps every snapshot. (Those
    taken while a child writes in place are the snapshot side's: a file
    being written is in progress.)"""
    sizes = {
        e["size"]
        for m in manifests(remote)
        if m["reason"] in ("exit", "final") and (e := entry(m, "ckpt.pt")) is not None
    }
    assert len(sizes) <= 1, f"snapshots after exits hold ckpt.pt of sizes {sorted(sizes)}"


def _repairs(events: Path) -> list[dict[str, Any]]:
    """The `repair` events that put ckpt.pt back (ckpt.pt alone each)."""
    found = [json.loads(line) for line in events.read_text().splitlines()]
    put_back = [e for e in found if e["event"] == "repair" and e["files"]]
    assert all([f["path"] for f in e["files"]] == ["ckpt.pt"] for e in put_back), put_back
    return put_back


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_relaunched_child_killed_mid_save_resumes_from_whole_checkpoint(tmp_path: Path) -> None:
    """Relaunched by ckpt after a SIGKILL at each write boundary of an
    in-place torch.save: every attempt loads a whole checkpoint (the old
    binary relaunched it on the torn file: torch.load failed, exit 3, the
    job over), and the final weights are an uninterrupted run's."""
    boundaries = _boundaries()
    total = 2 * (boundaries + 1) + 4
    train = script(tmp_path, "train.py", TRAIN)
    ref = _reference(tmp_path, train, total)
    remote, log, final = tmp_path / "remote", tmp_path / "train.log", tmp_path / "final.pt"
    events = tmp_path / "events.jsonl"
    plan = json.dumps({"total": total, "kill_at": "attempt", "kill": "self"})
    retries = ["--retries", str(boundaries + 5), "--keep", "1000", "--log-json", str(events)]
    # A debounce well above what the supervisor takes to put the torn file back
    # (the snapshot side also waits while a file fails its check).
    args = run_args(tmp_path / "ck", remote, *retries, debounce="1")
    run = Running(
        [*args, *train, str(log), str(remote), str(final), plan],
        cwd=tmp_path,
        logs=tmp_path / "logs",
        name="run",
    )
    try:
        status = run.wait(2000)
        assert status == 0, f"ckpt exited {status}; log {_log(log)}\n{run.stderr()}"
    finally:
        run.cleanup()
    _check_resumes(_log(log), boundaries)
    _same_weights(final, ref)
    _no_torn_snapshot(remote)
    # Every torn save (all boundaries but the last) was put back before a
    # relaunch, the torn file kept.
    repairs = _repairs(events)
    assert len(repairs) == boundaries
    assert all((Path(e["kept"]) / "ckpt.pt").is_file() for e in repairs), "kept, not deleted"


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_new_run_after_machine_died_mid_save_resumes_from_whole_checkpoint(
    tmp_path: Path,
) -> None:
    """The machine dies (ckpt killed with the child) at each write boundary
    of an in-place torch.save; a new `ckpt run` on the same disk puts the
    torn ckpt.pt back from the newest snapshot before the child starts (the
    old binary kept "a local file newer than the newest snapshot" as it
    was: torch.load failed), and the final weights are an uninterrupted
    run's."""
    boundaries = _boundaries()
    total = 2 * (boundaries + 1) + 4
    train = script(tmp_path, "train.py", TRAIN)
    ref = _reference(tmp_path, train, total)
    remote, log, final = tmp_path / "remote", tmp_path / "train.log", tmp_path / "final.pt"
    events = tmp_path / "events.jsonl"
    before = ""
    for k in [*range(boundaries + 1), None]:
        plan = json.dumps({"total": total, "kill_at": k, "kill": "ckpt"})
        flags = ["--retries", "0", "--keep", "1000", "--log-json", str(events), "--verbose"]
        args = run_args(tmp_path / "ck", remote, *flags)
        run = Running(
            [*args, *train, str(log), str(remote), str(final), plan],
            cwd=tmp_path,
            logs=tmp_path / "logs",
            name=f"run-{k}",
        )
        try:
            status = run.wait(600)
        finally:
            run.cleanup()
        last = _log(log)[-1]
        if k is None:
            assert status == 0, f"ckpt exited {status}; log {last}\n{before}\n{run.stderr()}"
        else:
            assert status == -9, (
                f"boundary {k}: ckpt exited {status}, {last}\n{before}\n{run.stderr()}"
            )
            assert "error" not in last, (last, run.stderr())
            # The machine is gone: so is the child (the guardian kills its group).
            child = last["pid"]
            wait_for(lambda pid=child: pid_gone(pid), what="the killed child to be gone")
        before = f"the run before:\n{run.stderr()}"
    _check_resumes(_log(log), boundaries)
    _same_weights(final, ref)
    _no_torn_snapshot(remote)
    # Every torn save (all boundaries but the last) was put back at a start.
    # Every torn save (all boundaries but the last) was put back at a start,
    # or, when its mtime (the filesystem's coarse clock) fell before the
    # snapshot taken a moment earlier, --dir was replaced by that snapshot:
    # either way the torn file is kept, once, in a kept dir (inside --dir,
    # or beside it holding the old --dir and the kept dirs in it).
    repairs = _repairs(events)
    kept = [p for p in tmp_path.glob("**/.*ckpt-kept-*/**/ckpt.pt") if p.is_file()]
    torn = [p for p in set(kept) if formats.check_file(p).ok is False]
    assert len(torn) == boundaries, (len(torn), len(repairs), sorted(map(str, kept)))
    restored = tmp_path / "restored"
    ckpt_ok(["restore", str(remote), str(restored)], cwd=tmp_path)
    assert torch.load(restored / "ckpt.pt")["step"] == total
