"""ckpt as an init for its subtree (and as PID 1 of a container): orphans of
the job are adopted and reaped, no zombie piles up, a stop reaches processes
that left the child's process group, nothing of the subtree outlives ckpt,
and the final snapshot is durable.

Each case runs twice: as an ordinary process (ckpt is a child subreaper) and
as PID 1 of a new PID namespace (`unshare --pid --fork --mount-proc`), where
the kernel gives no default action to a signal without a handler. The PID 1
variant skips, with the kernel's words, where namespaces cannot be made.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ckpt_cli import processes as subtree

from ._util import Running, pid_gone, read_tree, restore_into, run_args, wait_for

pytestmark = pytest.mark.timeout(180)

#: The job: a bash script that (1) starts a daemon that leaves the group with
#: setsid and notes the SIGTERM it gets, (2) orphans a long sleep, (3) orphans
#: five short-lived processes that become zombies of whoever adopted them, then
#: saves a step counter until SIGTERM, when it writes final.txt and exits 0.
#: Every helper records its pid (as seen in its own PID namespace) in $MARK.
JOB = r"""
trap 'echo stopped > "$CKPT_DIR/final.txt"; exit 0' TERM
setsid sh -c 'trap "echo term > $0/daemon-term; exit 0" TERM
  echo $$ > $0/daemon.pid; while :; do sleep 0.1; done' "$MARK" &
( sleep 6007 & echo $! > "$MARK/orphan.pid" )
for i in 1 2 3 4 5; do
  ( sh -c 'echo $$ > $0/zombie$1.pid; sleep 3; :' "$MARK" "$i" & )
done
echo ready > "$MARK/ready"
n=0
while :; do
  n=$((n + 1)); echo "$n" > "$CKPT_DIR/step.tmp"; mv "$CKPT_DIR/step.tmp" "$CKPT_DIR/step"
  sleep 0.2
done
"""


def _unshare_refusal() -> str | None:
    """Why a PID namespace cannot be made here (None if it can)."""
    try:
        res = subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "true"],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except FileNotFoundError:
        return "unshare (util-linux) is not installed"
    if res.returncode != 0:
        return f"unshare --pid refused: {res.stderr.strip() or res.returncode}"
    return None


@pytest.fixture(params=["subreaper", "pid1"])
def mode(request: pytest.FixtureRequest) -> str:
    if request.param == "pid1" and (why := _unshare_refusal()):
        pytest.skip(why)
    mode: str = request.param
    return mode


def _prefix(mode: str) -> list[str] | None:
    if mode != "pid1":
        return None
    return ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        out.extend(int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split())
    return out


def _ckpt_pid(run: Running, mode: str) -> int:
    """ckpt's pid as this test sees it (under unshare, unshare's only child)."""
    if mode != "pid1":
        return run.pid
    return wait_for(lambda: next(iter(_children(run.pid)), None), what="ckpt under unshare")


def _ns_pids(pid: int) -> list[int]:
    """pid's numbers from this namespace down to its own (NSpid of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return [int(n) for n in line.split()[1:]]
    return [pid]


def _outer_pid(inner: int, ckpt: int) -> int | None:
    """The pid, in this test's namespace, of the process that is `inner` in
    ckpt's namespace (the same number when there is no new namespace)."""
    ns = os.readlink(f"/proc/{ckpt}/ns/pid")
    if ns == os.readlink("/proc/self/ns/pid"):
        return inner
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{name}/ns/pid") == ns and _ns_pids(int(name))[-1] == inner:
                return int(name)
        except OSError:
            continue
    return None


def _ppid(pid: int) -> int | None:
    proc = subtree.read_proc(pid)
    return proc.ppid if proc is not None else None


def _state(pid: int) -> str | None:
    proc = subtree.read_proc(pid)
    return proc.state if proc is not None else None


def test_orphans_are_reaped_and_a_stop_reaches_the_whole_subtree(
    mode: str,
    tmp_path: Path,
    ckpt_dir: Path,
    remote: Path,
    spawn: Callable[..., Running],
) -> None:
    mark = tmp_path / "mark"
    mark.mkdir()
    job = tmp_path / "job.sh"
    job.write_text(JOB)
    run = spawn(
        [*run_args(ckpt_dir, remote, "--grace", "10"), "bash", str(job)],
        env={"MARK": str(mark)},
        prefix=_prefix(mode),
    )
    ckpt = _ckpt_pid(run, mode)
    if mode == "pid1":
        assert _ns_pids(ckpt)[-1] == 1, "ckpt is not PID 1 of its namespace"

    names = ["daemon", "orphan", *(f"zombie{i}" for i in range(1, 6))]
    for name in names:
        wait_for(lambda n=name: (mark / f"{n}.pid").is_file(), what=f"{name}.pid", proc=run)  # type: ignore[misc]

    def outer(name: str) -> int:
        def found() -> int | None:
            text = (mark / f"{name}.pid").read_text().strip()
            return _outer_pid(int(text), ckpt) if text else None

        return wait_for(found, what=f"the pid of {name}", proc=run)

    pids = {name: outer(name) for name in names}
    run.extra_pids.extend(pids.values())

    # Adoption: the orphans' parent is ckpt (a subreaper, or PID 1), not init.
    for name in ("orphan", "zombie1"):
        wait_for(
            lambda p=pids[name]: _ppid(p) == ckpt or pid_gone(p),  # type: ignore[misc]
            what=f"{name} re-parented to ckpt",
            proc=run,
        )
        parent = _ppid(pids[name])
        assert parent in (ckpt, None), f"{name}'s parent is {parent}, not ckpt ({ckpt})"

    # Reaping: the short-lived orphans exit after 3 s; ckpt must collect them,
    # or they stay zombies (state Z, parent ckpt) for as long as ckpt lives.
    for i in range(1, 6):
        pid = pids[f"zombie{i}"]
        wait_for(lambda p=pid: _state(p) is None, what=f"zombie{i} reaped", proc=run)  # type: ignore[misc]
    zombies = [c for c in _children(ckpt) if _state(c) == "Z"]
    assert not zombies, f"zombie children of ckpt: {zombies}"

    wait_for((ckpt_dir / "step").is_file, what="the job's first step", proc=run)
    os.kill(ckpt, signal.SIGTERM)
    status = run.wait()
    assert status == 128 + signal.SIGTERM, run.stderr()

    # The daemon outside the child's group got ckpt's SIGTERM (not the kernel's
    # SIGKILL that tears down a namespace after its init exits).
    assert (mark / "daemon-term").read_text().strip() == "term", run.stderr()
    for name, pid in pids.items():
        assert pid_gone(pid), f"{name} (pid {pid}) outlived ckpt"

    restored = tmp_path / "restored"
    restore_into(remote, restored, cwd=tmp_path)
    assert read_tree(restored)["final.txt"] == b"stopped\n"


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """An HTTP endpoint on 127.0.0.1 that accepts connections and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    server.close()


def test_a_stop_before_the_child_starts_is_obeyed(
    mode: str,
    tmp_path: Path,
    ckpt_dir: Path,
    spawn: Callable[..., Running],
    silent_endpoint: str,
) -> None:
    """SIGTERM while ckpt waits for a remote that never answers: it stops at
    once (128+15) without launching the child, also as PID 1, where a signal
    with no handler would be ignored."""
    pytest.importorskip("s3fs")
    started = tmp_path / "started"
    run = spawn(
        [
            *run_args(
                ckpt_dir, "s3://bucket/run", "-o", f"client_kwargs.endpoint_url={silent_endpoint}"
            ),
            "touch",
            str(started),
        ],
        prefix=_prefix(mode),
        env={
            "AWS_ACCESS_KEY_ID": "test-key",
            "AWS_SECRET_ACCESS_KEY": "test-secret",
            "AWS_EC2_METADATA_DISABLED": "true",
            "CKPT_IO_TIMEOUT": "600",
        },
    )
    ckpt = _ckpt_pid(run, mode)
    wait_for(lambda: "remote: s3://bucket/run" in run.stderr(), what="ckpt opening the remote")
    os.kill(ckpt, signal.SIGTERM)
    status = run.wait()
    assert status == 128 + signal.SIGTERM, run.stderr()
    assert "stopped by SIGTERM before the child started" in run.stderr()
    assert "Traceback" not in run.stderr()
    assert not started.exists()


def test_a_daemon_the_child_leaves_behind_is_stopped_when_the_child_exits(
    tmp_path: Path, ckpt_dir: Path, remote: Path, spawn: Callable[..., Running]
) -> None:
    """The child succeeds but left a daemon outside its group: ckpt stops it
    (SIGTERM first) before it exits 0, instead of leaving it running."""
    mark = tmp_path / "mark"
    mark.mkdir()
    job = tmp_path / "job.sh"
    job.write_text(
        'setsid sh -c \'trap "echo term > $0/daemon-term; exit 0" TERM\n'
        '  echo $$ > $0/daemon.pid; while :; do sleep 0.1; done\' "$MARK" &\n'
        'while [ ! -s "$MARK/daemon.pid" ]; do sleep 0.05; done\n'
        'echo done > "$CKPT_DIR/out.txt"\n'
    )
    run = spawn([*run_args(ckpt_dir, remote), "bash", str(job)], env={"MARK": str(mark)})
    status = run.wait()
    assert status == 0, run.stderr()
    daemon = int((mark / "daemon.pid").read_text())
    run.extra_pids.append(daemon)
    assert (mark / "daemon-term").read_text().strip() == "term"
    assert pid_gone(daemon)
    assert "left behind" in run.stderr()
