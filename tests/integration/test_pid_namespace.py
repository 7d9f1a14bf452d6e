"""`ckpt run` in a PID namespace whose /proc is not its own (`unshare --pid
--fork` without --mount-proc: a container runtime that shares the host's
/proc does the same). The pids /proc lists are the parent namespace's, not
those os.kill reaches: ckpt must not take them for processes of its job
(it did: "stopped 44 process(es) the child left behind", after waiting out
--grace for host processes to exit, and signalling pids of its own namespace
that happened to have those numbers)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ._util import CKPT, read_tree, restore_into, run_args, writer

pytestmark = pytest.mark.timeout(180)


def _unshare() -> str:
    path = shutil.which("unshare")
    if path is None:
        pytest.skip("unshare (util-linux) is not installed")
    if os.geteuid() != 0:
        pytest.skip("a new PID namespace needs root here")
    if subprocess.run([path, "--pid", "--fork", "true"], check=False).returncode != 0:
        pytest.skip("unshare --pid does not work here")
    return path


def test_a_foreign_proc_is_not_taken_for_the_jobs_processes(
    tmp_path: Path, ckpt_dir: Path, remote: Path
) -> None:
    """Injected: ckpt (PID 1 of a new namespace) sees the parent namespace's
    /proc. Asserted: the child's exit is handled as usual, exit 0, the state
    durable; ckpt stops no process "left behind" (the job left none)."""
    args = [*run_args(ckpt_dir, remote, "--grace", "2"), *writer(tmp_path, {"x.txt": "hi"})]
    res = subprocess.run(
        [_unshare(), "--pid", "--fork", "--kill-child", str(CKPT), *args],
        cwd=tmp_path,
        env=dict(os.environ),
        text=True,
        capture_output=True,
        timeout=150,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert "left behind" not in res.stderr, res.stderr
    assert "final state is durable" in res.stderr, res.stderr
    out = tmp_path / "restored"
    restore_into(remote, out, cwd=tmp_path)
    assert read_tree(out) == {"x.txt": b"hi"}
