"""subtree: reading /proc, finding live descendants, reaping only what is ours
to reap. Real processes (sleep, sh), no mocks."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckpt_cli import processes

pytestmark = pytest.mark.skipif(not processes.HAVE_PROC, reason="needs Linux /proc")


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        p.kill()
        p.wait()


def _until(pred: object, what: str) -> None:
    end = time.monotonic() + 30
    while not pred():  # type: ignore[operator]
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_command_name_with_parentheses_and_spaces_is_parsed(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    odd = tmp_path / "we) (ird"
    sleep = shutil.which("sleep")
    assert sleep is not None
    odd.symlink_to(sleep)
    p = subprocess.Popen([str(odd), "30"])
    procs.append(p)
    got = processes.read_proc(p.pid)
    assert got is not None
    assert (got.pid, got.ppid, got.pgid) == (p.pid, os.getpid(), os.getpgid(p.pid))
    assert got.state in "RSD", got.state  # D: still paging in what it exec'd, on a busy disk


def test_live_finds_grandchildren_and_leaves_out_an_excluded_branch(
    procs: list[subprocess.Popen[bytes]],
) -> None:
    kept = subprocess.Popen(["sh", "-c", "sleep 30 & wait"])
    skipped = subprocess.Popen(["sh", "-c", "sleep 31 & wait"])
    procs += [kept, skipped]
    _until(lambda: len(processes.children(kept.pid)) == 1, "kept's grandchild")
    _until(lambda: len(processes.children(skipped.pid)) == 1, "skipped's grandchild")
    found = {p.pid for p in processes.live(os.getpid(), exclude={skipped.pid})}
    assert kept.pid in found
    assert processes.children(kept.pid)[0].pid in found
    assert skipped.pid not in found
    assert processes.children(skipped.pid)[0].pid not in found


def test_live_includes_group_members_that_are_not_descendants(
    procs: list[subprocess.Popen[bytes]],
) -> None:
    # The subshell's sleep is orphaned at once: re-parented away from the
    # leader, yet still in its process group.
    leader = subprocess.Popen(["sh", "-c", "(sleep 31 &); exec sleep 30"], start_new_session=True)
    procs.append(leader)
    try:

        def orphans() -> list[int]:
            group = [p for p in processes.processes() if p.pgid == leader.pid]
            return [p.pid for p in group if leader.pid not in (p.pid, p.ppid)]

        _until(orphans, "the orphaned group member")
        found = {p.pid for p in processes.live(leader.pid, pgid=leader.pid)}
        assert leader.pid in found
        assert set(orphans()) <= found
        assert not set(orphans()) & {p.pid for p in processes.live(leader.pid)}
    finally:
        os.killpg(leader.pid, signal.SIGKILL)


def test_reap_collects_zombies_but_not_the_ones_kept(
    procs: list[subprocess.Popen[bytes]],
) -> None:
    mine = subprocess.Popen(["true"])
    theirs = subprocess.Popen(["true"])

    def zombie(pid: int) -> bool:
        got = processes.read_proc(pid)
        return got is not None and got.state == "Z"

    for p in (mine, theirs):
        _until(lambda p=p: zombie(p.pid), "exit")  # type: ignore[misc]
    reaped = processes.reap(keep={theirs.pid})
    assert mine.pid in reaped
    assert theirs.pid not in reaped
    assert processes.read_proc(mine.pid) is None
    assert theirs.wait(5) == 0  # its owner still gets its status


def test_subreaper_can_be_set_and_cleared() -> None:
    before = processes.is_subreaper()
    try:
        assert processes.set_subreaper(True)
        assert processes.is_subreaper()
        assert processes.set_subreaper(False)
        assert not processes.is_subreaper()
    finally:
        processes.set_subreaper(before)


def test_start_time_names_one_process(procs: list[subprocess.Popen[bytes]]) -> None:
    """A pid is reused; a pid and its start time are not."""
    p = subprocess.Popen(["sleep", "30"])
    procs.append(p)
    mine, its = processes.start_time(os.getpid()), processes.start_time(p.pid)
    assert mine is not None and its is not None and its >= mine
    assert processes.start_time("self") == mine
    assert processes.start_time(2**22 + 12345) is None
    assert processes.proc_is_ours()


def _unshare() -> str:
    path = shutil.which("unshare")
    if path is None or os.geteuid() != 0:
        pytest.skip("needs unshare (util-linux) and root")
    if subprocess.run([path, "--pid", "--fork", "true"], check=False).returncode != 0:
        pytest.skip("unshare --pid does not work here")
    return path


@pytest.mark.parametrize("proc", ["its own /proc", "the parent namespace's /proc"])
def test_a_proc_of_another_pid_namespace_is_not_read(proc: str) -> None:
    """In a new PID namespace whose /proc still shows the parent's, the pids
    in /proc name other processes than os.kill reaches: nothing is read from
    it (the child's process group stays the unit)."""
    flags = ["--mount-proc"] if proc == "its own /proc" else []
    code = (
        "import os; from ckpt_cli import processes; "
        "print(processes.proc_is_ours(), processes.HAVE_PROC, "
        "len(processes.live(os.getpid())), len(processes.processes()) > 0)"
    )
    out = subprocess.run(
        [_unshare(), "--pid", "--fork", *flags, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if proc == "its own /proc":
        assert out == ["True", "True", "0", "True"], out
    else:
        assert out == ["False", "False", "0", "False"], out
