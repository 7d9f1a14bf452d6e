"""Two supervisors on one remote: the single-writer lease under faults.

(tests/integration/test_lease.py covers the plain refusal and the takeover of
a SIGKILLed writer's lease. These go further: the refused writer changes no
byte of the remote while the holder is frozen; the takeover continues the
generation order; a lease written by another host is judged by its heartbeat
alone (its pid means nothing here), and one written by this host before a
reboot is taken over once watched unchanged; and a holder frozen (SIGSTOP, a
VM pause, a stalled NFS client) long enough to lose its lease must not write
once it wakes up, whether the new writer is still running or has already
finished.)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ckpt_cli.lease import boot_id
from ckpt_cli.manifest import host_name
from faults._proc import read_announce, wait_gone
from faults._tally import record
from integration._util import (
    PY,
    Running,
    error_lines,
    has_snapshot_with,
    manifests,
    read_tree,
    restore_into,
    run_ckpt,
    wait_for,
)

pytestmark = pytest.mark.timeout(180)

#: argv: ready file, go file, text. Writes a.txt = text (atomically), announces
#: itself; once the go file exists writes a.txt = "<text> after go"; then waits.
HOLDER = """
import json, os, sys, time
from pathlib import Path
d = Path(os.environ["CKPT_DIR"])
ready, go, text = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

def save(name, value):
    tmp = d / (name + ".tmp")
    tmp.write_text(value)
    os.replace(tmp, d / name)

save("a.txt", text)
part = ready.with_name(ready.name + ".part")
part.write_text(json.dumps({"pid": os.getpid(), "restored": os.environ["CKPT_RESTORED"]}))
os.replace(part, ready)
while not go.exists():
    time.sleep(0.02)
save("a.txt", text + " after go")
while True:
    time.sleep(0.05)
"""

#: argv: report file, text. Reports what it was restored from, writes b.txt.
WRITER = """
import json, os, sys
from pathlib import Path
d = Path(os.environ["CKPT_DIR"])
report, text = Path(sys.argv[1]), sys.argv[2]
files = {p.name: p.read_text() for p in sorted(d.iterdir()) if p.is_file()}
report.write_text(json.dumps({"restored": os.environ["CKPT_RESTORED"], "files": files}))
tmp = d / "b.txt.tmp"
tmp.write_text(text)
os.replace(tmp, d / "b.txt")
"""


def _tree(root: Path) -> dict[str, bytes]:
    """Every file below root, byte for byte (the whole remote, lease included)."""
    return read_tree(root) if root.exists() else {}


def _run_args(ckpt_dir: Path, remote: Path, *flags: str) -> list[str]:
    return ["run", "--dir", str(ckpt_dir), "--remote", str(remote), *flags, "--backoff", "0"]


def _start_holder(
    spawn: Callable[..., Running],
    tmp_path: Path,
    remote: Path,
    name: str,
    *flags: str,
) -> tuple[Running, dict[str, Any], Path]:
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    ready, go = tmp_path / f"{name}-ready.json", tmp_path / f"{name}-go"
    ckpt = spawn(
        [
            *_run_args(tmp_path / f"{name}-ck", remote, "--debounce", "0.2", *flags),
            "--",
            PY,
            str(script),
            str(ready),
            str(go),
            name,
        ],
        name=name,
    )
    child = read_announce(ready, what=f"{name}'s child to start", proc=ckpt)
    ckpt.extra_pids.append(child["pid"])
    wait_for(lambda: has_snapshot_with(remote, "a.txt"), what=f"{name}'s first snapshot", proc=ckpt)
    return ckpt, child, go


@pytest.fixture
def resume_stopped() -> Iterator[list[int]]:
    """pids the test SIGSTOPped: SIGCONT at teardown, so a failure leaves none frozen."""
    stopped: list[int] = []
    yield stopped
    for pid in stopped:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def test_a_second_supervisor_is_refused_writes_nothing_and_a_takeover_continues_the_order(
    spawn: Callable[..., Running], tmp_path: Path, remote: Path, resume_stopped: list[int]
) -> None:
    """Injected: a second `ckpt run` on a remote held by a live, frozen
    (SIGSTOP: it cannot write either) first run; then kill -9 of the first.
    Asserted: the second exits 69 with one error line naming the holder (host,
    pid), the lease and --lease-timeout; its child never ran; not one byte of
    the remote and of its own --dir changed. After the kill -9 a third run
    takes over at once (--lease-timeout 600), starts from the first run's
    newest snapshot, and its snapshot gets the next generation."""
    first, first_child, _go = _start_holder(
        spawn, tmp_path, remote, "first", "--lease-timeout", "600"
    )
    os.kill(first.pid, signal.SIGSTOP)
    resume_stopped.append(first.pid)
    before = _tree(remote)
    other = tmp_path / "other-ck"
    other.mkdir()
    (other / "mine.txt").write_text("the second run's own state")
    report = tmp_path / "second-report.json"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)

    res = run_ckpt(
        [*_run_args(other, remote), "--", PY, str(script), str(report), "second"],
        cwd=tmp_path,
        timeout=60,
    )

    assert res.returncode == 69, res.stderr
    errors = error_lines(res.stderr)
    assert len(errors) == 1, res.stderr
    assert "lease" in errors[0] or "in use" in errors[0], errors
    assert f"pid {first.pid}" in errors[0] and host_name() in errors[0], errors
    assert "--lease-timeout" in errors[0], errors
    assert not report.exists(), "the refused run started its child"
    assert _tree(remote) == before, "the refused run changed the remote"
    assert _tree(other) == {"mine.txt": b"the second run's own state"}
    record("second supervisor refused", 1)

    os.kill(first.pid, signal.SIGCONT)
    newest = manifests(remote)[-1]
    first.signal(signal.SIGKILL)
    first.wait()
    wait_gone([first_child["pid"]], what="the first run's child (guardian)")

    third = run_ckpt(
        [
            *_run_args(tmp_path / "third-ck", remote, "--lease-timeout", "600"),
            "--",
            PY,
            str(script),
            str(report),
            "third",
        ],
        cwd=tmp_path,
        timeout=60,
    )
    assert third.returncode == 0, third.stderr
    assert "took over the lease" in third.stderr and f"process {first.pid}" in third.stderr
    seen = json.loads(report.read_text())
    assert seen["restored"] == newest["id"], (seen, newest["id"])
    assert seen["files"] == {"a.txt": "first"}
    last = manifests(remote)[-1]
    assert last["generation"] == newest["generation"] + 1, (newest, last)
    out = tmp_path / "restored"
    restore_into(remote, out, cwd=tmp_path)
    assert read_tree(out) == {"a.txt": b"first", "b.txt": b"third"}
    record("lease takeover after kill -9", 1)


class ForeignLease:
    """lease.json as a ckpt on another host writes it (see ckpt_cli.lease),
    with a heartbeat thread standing in for that live writer."""

    def __init__(self, remote: Path, *, host: str, boot: str, pid: int, ttl: float) -> None:
        self.path = remote / "lease.json"
        self.doc: dict[str, Any] = {
            "owner": f"run-{uuid.uuid4().hex[:8]}",
            "host": host,
            "pid": pid,
            "boot": boot,
            "heartbeat": time.time(),
            "ttl": ttl,
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.write()

    def write(self) -> None:
        self.doc["heartbeat"] = time.time()
        tmp = self.path.with_name(f".lease.json.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(self.doc))
        os.replace(tmp, self.path)  # the way the other host's ckpt writes it

    def start(self) -> None:
        def beat() -> None:
            while not self._stop.wait(0.3):
                self.write()

        self._thread = threading.Thread(target=beat, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def age(self) -> float:
        return time.time() - float(json.loads(self.path.read_text())["heartbeat"])


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _new_repo(tmp_path: Path, remote: Path) -> None:
    src = tmp_path / "seed"
    src.mkdir()
    (src / "a.txt").write_text("seeded")
    res = run_ckpt(["push", str(src), str(remote)], cwd=tmp_path, timeout=60)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("pid_state", ["live pid", "dead pid"])
def test_a_lease_of_another_host_is_taken_over_only_once_its_heartbeat_is_stale(
    tmp_path: Path, remote: Path, pid_state: str
) -> None:
    """Injected: lease.json written (and heartbeated) as a ckpt on another host
    would, naming a pid that is live or dead here (meaningless: another host),
    with --lease-timeout 5; then that host stops heartbeating. Asserted: while
    it heartbeats, `ckpt run` is refused (69) every time and writes no
    snapshot; once the heartbeat is older than the timeout (polled), a run
    takes over, saying the heartbeat is stale (not that a process is gone)."""
    _new_repo(tmp_path, remote)
    pid = os.getpid() if pid_state == "live pid" else _dead_pid()
    lease = ForeignLease(remote, host=f"other-{uuid.uuid4().hex[:8]}", boot="x", pid=pid, ttl=5)
    lease.start()
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    report = tmp_path / "report.json"
    snaps = sorted(p.name for p in (remote / "snapshots").iterdir())
    try:
        for _ in range(2):
            res = run_ckpt(
                [
                    *_run_args(tmp_path / "ck", remote, "--lease-timeout", "5"),
                    "--",
                    PY,
                    str(script),
                    str(report),
                    "new",
                ],
                cwd=tmp_path,
                timeout=60,
            )
            assert res.returncode == 69, res.stderr
            (line,) = error_lines(res.stderr)
            assert lease.doc["host"] in line and "--lease-timeout" in line, line
            assert not report.exists()
            assert sorted(p.name for p in (remote / "snapshots").iterdir()) == snaps
            assert json.loads((remote / "lease.json").read_text())["owner"] == lease.doc["owner"]
    finally:
        lease.stop()
    wait_for(lambda: lease.age() > 6, what="the foreign lease to go stale", timeout=60)

    res = run_ckpt(
        [
            *_run_args(tmp_path / "ck", remote, "--lease-timeout", "5"),
            "--",
            PY,
            str(script),
            str(report),
            "new",
        ],
        cwd=tmp_path,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert "took over the lease" in res.stderr and "heartbeat" in res.stderr, res.stderr
    assert "is gone" not in res.stderr, res.stderr
    out = tmp_path / "restored"
    restore_into(remote, out, cwd=tmp_path)
    assert read_tree(out) == {"a.txt": b"seeded", "b.txt": b"new"}
    record("foreign lease respected until stale", 1)


def test_a_lease_of_this_host_before_a_reboot_is_taken_over_once_watched(
    tmp_path: Path, remote: Path
) -> None:
    """Injected: lease.json of this host name with another boot id and a fresh
    heartbeat, naming a pid that is live now (pids are reused after a reboot),
    that never beats again. Asserted: a run takes it over, saying why, once it
    watched it unchanged for its ttl (5 s): another machine may have this
    host's name, so a boot id alone proves nothing (a live one is kept:
    tests/faults/test_lease_liveness.py)."""
    _new_repo(tmp_path, remote)
    assert boot_id(), "no /proc/sys/kernel/random/boot_id"
    ForeignLease(remote, host=host_name(), boot=str(uuid.uuid4()), pid=os.getpid(), ttl=5)
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    report = tmp_path / "report.json"
    res = run_ckpt(
        [
            *_run_args(tmp_path / "ck", remote, "--lease-timeout", "600"),
            "--",
            PY,
            str(script),
            str(report),
            "after reboot",
        ],
        cwd=tmp_path,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert "took over the lease" in res.stderr and "rebooted" in res.stderr, res.stderr
    assert "did not change in 5s" in res.stderr, res.stderr
    record("lease takeover after reboot", 1)


@pytest.mark.parametrize("new_writer", ["still running", "already finished"])
def test_a_frozen_holder_that_wakes_up_after_a_takeover_writes_nothing(
    spawn: Callable[..., Running],
    tmp_path: Path,
    remote: Path,
    resume_stopped: list[int],
    new_writer: str,
) -> None:
    """Injected: the lease holder A is frozen (SIGSTOP) until its lease (5 s)
    is stale; B takes it over; then A wakes up (SIGCONT) and its child changes
    the directory, so A has something to snapshot. Asserted: A writes no
    snapshot after waking up (it says a snapshot failed because the lease was
    taken), whether B still runs or has finished and released the lease; B's
    state is the newest snapshot; A, stopped with SIGTERM, exits 69 (its
    final state is not durable: another writer holds the remote)."""
    a, a_child, a_go = _start_holder(spawn, tmp_path, remote, "A", "--lease-timeout", "5")
    a_run = manifests(remote)[-1]["run"]
    os.kill(a.pid, signal.SIGSTOP)
    resume_stopped.append(a.pid)
    a_snaps = {m["id"] for m in manifests(remote) if m["run"] == a_run}
    lease_doc = json.loads((remote / "lease.json").read_text())
    wait_for(
        lambda: time.time() - lease_doc["heartbeat"] > 6,
        what="A's lease to go stale",
        timeout=60,
    )

    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    report = tmp_path / "b-report.json"
    b_args = [
        *_run_args(tmp_path / "B-ck", remote, "--lease-timeout", "5", "--debounce", "0.2"),
        "--",
    ]
    b: Running | None = None
    b_stderr = ""
    b_go = tmp_path / "B-go"
    if new_writer == "still running":
        holder = tmp_path / "holder.py"
        b = spawn([*b_args, PY, str(holder), str(report), str(b_go), "B"], name="B")
        b_child = read_announce(report, what="B's child to start", proc=b)
        b.extra_pids.append(b_child["pid"])
        wait_for(lambda: "took over the lease" in b.stderr(), what="B's takeover", proc=b)
        b_stderr = b.stderr()
    else:
        res = run_ckpt([*b_args, PY, str(script), str(report), "B"], cwd=tmp_path, timeout=60)
        assert res.returncode == 0, res.stderr
        b_stderr = res.stderr
        expected = {"a.txt": b"A", "b.txt": b"B"}
    assert "took over the lease" in b_stderr and "heartbeat" in b_stderr, b_stderr

    os.kill(a.pid, signal.SIGCONT)
    a_go.touch()  # A's child writes again: A has a change to snapshot

    def a_wrote() -> set[str]:
        return {m["id"] for m in manifests(remote) if m["run"] == a_run} - a_snaps

    def outcome() -> str | None:
        if a_wrote():
            return "wrote"
        # "taken over" while B holds the lease; "disappeared" once B released it.
        err = a.stderr()
        if "snapshot failed" in err and ("taken over" in err or "disappeared" in err):
            return "refused"
        return None

    what = wait_for(outcome, what="A to try to snapshot after waking up", proc=a)
    assert what == "refused" and not a_wrote(), (
        f"A wrote snapshot(s) {sorted(a_wrote())} after B ({new_writer}) took its lease over; "
        f"A's stderr:\n{a.stderr()}"
    )

    if b is not None:
        b_go.touch()  # B's child writes again; then B is stopped and flushes
        wait_for(
            lambda: (tmp_path / "B-ck" / "a.txt").read_text() == "B after go",
            what="B's child to write",
            proc=b,
        )
        b.signal(signal.SIGTERM)
        assert b.wait() == 143, b.stderr()
        expected = {"a.txt": b"B after go"}
    a.signal(signal.SIGTERM)
    assert a.wait() == 69, a.stderr()
    wait_gone([a_child["pid"]], what="A's child")
    out = tmp_path / "restored"
    restore_into(remote, out, cwd=tmp_path)
    assert read_tree(out) == expected
    record("frozen lease holder woke up after a takeover", 1)
