"""examples/torchrun_ddp: two torchrun "nodes" on 127.0.0.1, one `ckpt run`
per node (--rank R --world-size 2), both sharing one file:// remote in tmp_path.

The reference is an uninterrupted run (the per-rank last loss and the
weights' checksum; the batches depend on (step, rank) alone, so a resumed run
that restored the right state ends with the same numbers).

The job's life, in one test (two stops, three launches of both nodes):

1. Once both nodes have committed a step, SIGTERM to both `ckpt run`
   supervisors, as a scheduler ending (or requeueing) a job sends it. Each
   forwards it to torchrun and its worker, flushes what was committed and
   exits 143. This stop has no race in it: each node is stopped by its own
   supervisor, and whatever state the stop leaves (one node a commit ahead of
   the other, or not), the replacements must agree on a step.
2. Two replacement nodes with FRESH empty --dir on the same remote: both must
   resume at the newest step that both nodes committed, read from the remote
   (a commit in flight at the SIGTERM may have become durable on one node
   only), and CKPT_RESTORED_STEP must say so.
3. Once both have committed a step past that one, `kill -9` of node 1's
   worker. torchrun reports any worker failure as exit 1 (its
   ChildFailedError, whatever the worker's own code); node 0's worker fails
   when gloo sees its peer's connection close, so both torchruns exit 1, and
   with `--retry-on 1,75,signals` each ckpt restores the newest step complete
   on both ranks and relaunches; the two torchruns meet again. The
   relaunches race the old torchruns' teardown (the new node 1 may reach node
   0's old store before it closes), so the test gives `--retries 3` with a
   1 s backoff and asserts on the outcome: both nodes' last attempts resume
   at the same committed step, and the job ends with the reference numbers.

And a checkpoint request: SIGUSR1 to node 0's `ckpt run` alone (what a cloud's
preemption notice or `ckpt signal` does on one node) must make both ranks save
and commit the same step (train.py all-reduces the request). ckpt has to pass
the signal on to a torchrun worker, which registered through the shim but runs
in a session of its own (torchrun's start_new_session), outside the child's
process group.

The interruptions cannot miss the job's middle: after the step the test waits
for, the job still has (STEPS - that step) steps of at least STEP_DELAY
seconds of sleep each to go: a lower bound on time, not a threshold; a slow
machine only gives the test more room. No network: every connection goes to
127.0.0.1 (torchrun's --master_addr; gloo on GLOO_SOCKET_IFNAME=lo).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ckpt_cli import processes as subtree

pytest.importorskip("torch", reason="the example trains with PyTorch (CPU)")

try:
    from integration._util import Running, ckpt_ok, wait_for
except ImportError:  # pragma: no cover - pytest's importlib import mode
    from tests.integration._util import Running, ckpt_ok, wait_for

pytestmark = pytest.mark.timeout(420)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "torchrun_ddp"
TRAIN = EXAMPLE / "train.py"
WORLD = 2
STEPS, SAVE_EVERY = 40, 4
#: Seconds of sleep per step in the interrupted run: after the step the test
#: waits for, at least (STEPS - that step) * STEP_DELAY seconds of training are left.
STEP_DELAY = 0.15
#: Stop once both nodes have committed at least this step (the second save).
STOP_AFTER = 2 * SAVE_EVERY
#: Longest wait for anything (a hang, not a speed limit).
HANG = 180.0
#: What the job's processes get: one thread each (two nodes share two cores),
#: gloo on the loopback interface only.
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
#: Rank sources ckpt would detect: none may leak in from the machine running the tests.
RANK_ENV = (
    "CKPT_RANK", "CKPT_WORLD_SIZE", "CKPT_RESTORED_STEP", "GROUP_RANK", "NODE_RANK",
    "PET_NNODES", "SLURM_NODEID", "SLURM_NNODES", "JOB_COMPLETION_INDEX",
    "SKYPILOT_NODE_RANK", "SKYPILOT_NUM_NODES", "MASTER_ADDR", "MASTER_PORT",
)  # fmt: skip


def torchrun() -> list[str]:
    beside = Path(sys.executable).parent / "torchrun"
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "torch.distributed.run"]


def free_port() -> int:
    """A port the OS says is free on 127.0.0.1 (torchrun's store binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Node:
    """`ckpt run --rank R --world-size 2 ... -- torchrun ... train.py` in the background."""

    def __init__(
        self,
        base: Path,
        rank: int,
        port: int,
        remote: Path,
        env: dict[str, str],
        flags: list[str],
    ) -> None:
        self.rank = rank
        self.dir = base / f"node{rank}" / "ckpt"
        self.result = base / f"node{rank}" / "result.json"
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        args = [
            *("run", "--rank", str(rank), "--world-size", str(WORLD)),
            *("--dir", str(self.dir), "--remote", remote.as_uri()),
            *("--grace", "20", "--backoff", "0", "--debounce", "0.2", *flags, "--"),
            *torchrun(),
            *("--nnodes", str(WORLD), "--node_rank", str(rank), "--nproc-per-node", "1"),
            *("--master_addr", "127.0.0.1", "--master_port", str(port), str(TRAIN)),
        ]
        env = {**CHILD_ENV, "RESULT_FILE": str(self.result), **env}
        self.proc = Running(args, cwd=base, logs=base / "logs", name=f"node{rank}", env=env)

    def log(self) -> str:
        return (
            f"--- node {self.rank} stdout:\n{self.proc.stdout()}\n--- stderr:\n{self.proc.stderr()}"
        )

    def committed(self) -> list[int]:
        """The steps this node's worker saw committed (durable), in order."""
        return [int(s) for s in re.findall(r"committed step (\d+)", self.proc.stdout())]

    def wait(self) -> int:
        return self.proc.wait(HANG)

    def results(self) -> dict[str, Any]:
        assert self.result.exists(), f"no result written\n{self.log()}"
        doc: dict[str, Any] = json.loads(self.result.read_text())
        return doc

    def stop(self) -> None:
        """Teardown: a clean stop first (ckpt takes torchrun and its workers
        down, also those torchrun put in sessions of their own), then a kill."""
        if self.proc.proc.poll() is None:
            self.proc.signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.proc.wait(60)
        self.proc.cleanup()


@pytest.fixture
def nodes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Node]]:
    """Every node a test starts; stopped at teardown if it still runs."""
    for name in RANK_ENV:
        monkeypatch.delenv(name, raising=False)
    started: list[Node] = []
    yield started
    for node in started:
        node.stop()


def start_job(
    nodes: list[Node],
    base: Path,
    remote: Path,
    env: dict[str, str],
    flags: tuple[str, ...] = (),
) -> tuple[Node, Node]:
    port = free_port()
    job = tuple(Node(base, rank, port, remote, env, [*flags]) for rank in range(WORLD))
    nodes.extend(job)
    return job[0], job[1]


def finish(job: tuple[Node, Node]) -> list[dict[str, Any]]:
    """Wait for both nodes to succeed; their result files."""
    for node in job:
        status = node.wait()
        assert status == 0, f"node {node.rank}: ckpt run exited {status}\n{node.log()}"
    return [node.results() for node in job]


def step_of(snapshot: dict[str, Any]) -> int | None:
    step = snapshot.get("step")
    return None if step is None else int(step)


COMMON = {"STEPS": str(STEPS), "SAVE_EVERY": str(SAVE_EVERY)}
_reference: list[dict[str, Any]] = []


@pytest.fixture
def reference(nodes: list[Node], tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Both nodes' results of an uninterrupted run (once per worker process)."""
    if not _reference:
        base = tmp_path_factory.mktemp("ddp-plain")
        plain = finish(start_job(nodes, base, base / "remote", COMMON))
        for rank, r in enumerate(plain):
            assert (r["rank"], r["world_size"], r["start_step"], r["steps"]) == (
                rank, WORLD, 0, STEPS,
            )  # fmt: skip
            assert r["restored_step"] is None
        assert plain[0]["checksum"] == plain[1]["checksum"], "DDP replicas differ"
        _reference.extend(plain)
    return _reference


def wait_until_committed(job: tuple[Node, Node], step: int) -> None:
    for node in job:
        wait_for(
            lambda n=node: max(n.committed(), default=0) >= step,
            what=f"node {node.rank} to commit step {step}",
            timeout=HANG,
            proc=node.proc,
        )
    for node in job:
        assert node.proc.proc.poll() is None, f"node {node.rank} ended early\n{node.log()}"


def assert_same_numbers(results: list[dict[str, Any]], reference: list[dict[str, Any]]) -> None:
    """The same batches and the exact restored state: the reference's numbers."""
    for rank, (r, p) in enumerate(zip(results, reference, strict=True)):
        assert r["steps"] == STEPS
        assert r["loss"] == pytest.approx(p["loss"], rel=1e-6, abs=1e-9), (rank, r, p)
        assert r["checksum"] == pytest.approx(p["checksum"], rel=1e-6, abs=1e-9), (rank, r, p)
    assert results[0]["checksum"] == results[1]["checksum"], "DDP replicas differ"


def worker_of(node: Node) -> int:
    """The pid of the training worker torchrun started for node's current attempt."""
    launches = re.findall(r"attempt \d+: started .* \(pid (\d+)\)", node.proc.stderr())
    assert launches, node.log()
    agent = int(launches[-1])

    def workers() -> list[int]:
        found = []
        for child in subtree.children(agent):
            with contextlib.suppress(OSError):
                if not child.gone and str(TRAIN) in Path(f"/proc/{child.pid}/cmdline").read_text():
                    found.append(child.pid)
        return found

    (pid,) = wait_for(
        workers,
        what=f"node {node.rank}'s torchrun to start its worker",
        timeout=HANG,
        proc=node.proc,
    )
    return pid


def resumes(node: Node) -> list[tuple[int, str]]:
    """(step loaded, CKPT_RESTORED_STEP) of every attempt of node's worker that resumed."""
    found = re.findall(r"resumed at step (\d+) \(ckpt restored step (\S+),", node.proc.stdout())
    return [(int(step), restored) for step, restored in found]


def test_replacement_nodes_and_retries_resume_at_the_newest_step_all_ranks_committed(
    tmp_path: Path, nodes: list[Node], reference: list[dict[str, Any]]
) -> None:
    # 1. Interrupted: SIGTERM to both supervisors once both committed STOP_AFTER.
    remote = tmp_path / "remote"
    slow = {**COMMON, "STEP_DELAY": str(STEP_DELAY)}
    first = start_job(nodes, tmp_path / "first", remote, slow)
    wait_until_committed(first, STOP_AFTER)
    for node in first:
        node.proc.signal(signal.SIGTERM)
    for node in first:
        status = node.wait()
        assert status == 143, f"node {node.rank}: ckpt run exited {status}\n{node.log()}"
        assert f"ckpt: rank {node.rank} of {WORLD} (" in node.proc.stderr(), node.log()
        assert not node.result.exists(), f"node {node.rank} finished before the stop"

    # What the remote holds: each rank's committed steps; the newest one of both.
    steps = {}
    for rank in range(WORLD):
        doc = json.loads(
            ckpt_ok(["ls", remote.as_uri(), "--rank", str(rank), "--json"], cwd=tmp_path).stdout
        )
        assert all(s["rank"] == rank for s in doc["snapshots"]), doc
        steps[rank] = {step_of(s) for s in doc["snapshots"]} - {None}
        # Every step the worker saw committed is durable (and kept: --keep 3
        # keeps the newest complete steps and everything of each rank since).
        seen = first[rank].committed()
        assert max(seen) in steps[rank], (rank, seen, steps[rank])
    both = steps[0] & steps[1]
    assert both, steps
    expected = max(both)
    assert STOP_AFTER <= expected < STEPS
    assert expected % SAVE_EVERY == 0, "the example saves every SAVE_EVERY steps"
    listing = json.loads(ckpt_ok(["ls", remote.as_uri(), "--json"], cwd=tmp_path).stdout)
    assert listing["complete_steps"][0] == expected, listing["complete_steps"]

    # 2. Replacement nodes: fresh, empty local dirs; the same remote. Both
    # resume at `expected`; once both committed a step past it, node 1's
    # worker is killed (-9) and ckpt's retries (torchrun's 1 is in
    # --retry-on) relaunch both nodes from the newest step both committed.
    second = start_job(
        nodes,
        tmp_path / "second",
        remote,
        slow,
        flags=("--retries", "3", "--retry-on", "1,75,signals", "--backoff", "1:2"),
    )
    wait_until_committed(second, expected + SAVE_EVERY)
    for node in second:
        assert resumes(node)[:1] == [(expected, str(expected))], node.log()
        assert re.search(rf"ckpt: restor.* step {expected}\b", node.proc.stderr()), node.log()
    os.kill(worker_of(second[1]), signal.SIGKILL)
    results = finish(second)
    last = []
    for node, r in zip(second, results, strict=True):
        stderr = node.proc.stderr()
        assert re.search(r"attempt \d+: exit code 1 after", stderr), node.log()
        assert "recoverable (exit code 1): retry 1/3" in stderr, node.log()
        *_, (step, restored) = resumes(node)
        assert step == r["start_step"] == r["restored_step"] == int(restored), node.log()
        assert r["attempt"] >= 2, node.log()
        last.append(step)
    assert last[0] == last[1], f"the ranks went on from different steps: {last}"
    assert expected + SAVE_EVERY <= last[0] < STEPS and last[0] % SAVE_EVERY == 0, last
    assert_same_numbers(results, reference)
    done = json.loads(ckpt_ok(["ls", remote.as_uri(), "--json"], cwd=tmp_path).stdout)
    assert done["complete_steps"][0] == STEPS, done["complete_steps"]


def test_a_checkpoint_request_to_one_node_makes_every_rank_save_the_same_step(
    tmp_path: Path, nodes: list[Node]
) -> None:
    """SIGUSR1 to node 0's `ckpt run` (what a cloud's preemption notice or
    `ckpt signal` does on that node alone): ckpt passes it on as the
    checkpoint signal to the worker, which registered through the shim
    (ckpt.checkpoint()); the example all-reduces the request, so both ranks
    save and commit at the end of the same step, off the SAVE_EVERY schedule.
    torchrun starts each worker in a session of its own (start_new_session):
    the signal has to reach a process outside the child's process group."""
    env = {"STEPS": "400", "SAVE_EVERY": "1000", "STEP_DELAY": str(STEP_DELAY)}
    job = start_job(nodes, tmp_path / "job", tmp_path / "remote", env)
    for node in job:
        wait_for(
            lambda n=node: "starting at step 0" in n.proc.stdout(),
            what=f"node {node.rank}'s worker to start (its handler is installed by then)",
            timeout=HANG,
            proc=node.proc,
        )
    job[0].proc.signal(signal.SIGUSR1)
    wait_for(
        lambda: (
            "ckpt: sent SIGUSR1" in job[0].proc.stderr() or "not passed on" in job[0].proc.stderr()
        ),
        what="node 0's ckpt to act on SIGUSR1",
        timeout=HANG,
        proc=job[0].proc,
    )
    assert "not passed on" not in job[0].proc.stderr(), (
        "ckpt did not pass the checkpoint signal on to the torchrun worker, which "
        "registered through the shim but runs in a session of its own\n" + job[0].log()
    )
    for node in job:
        wait_for(
            lambda n=node: "(checkpoint requested" in n.proc.stdout(),
            what=f"node {node.rank} to save on the request\n{job[0].log()}",
            timeout=HANG,
            proc=node.proc,
        )
    assert "ckpt: sent SIGUSR1 to the child" in job[0].proc.stderr(), job[0].log()
    saved = [
        re.findall(r"committed step (\d+) \(checkpoint requested", n.proc.stdout()) for n in job
    ]
    assert saved[0] == saved[1] and len(saved[0]) == 1, saved
    step = int(saved[0][0])
    assert 0 < step < 400
    for node in job:
        node.proc.signal(signal.SIGTERM)
    for node in job:
        status = node.wait()
        assert status == 143, f"node {node.rank}: ckpt run exited {status}\n{node.log()}"
    listing = json.loads(
        ckpt_ok(["ls", (tmp_path / "remote").as_uri(), "--json"], cwd=tmp_path).stdout
    )
    assert listing["complete_steps"][0] == step, listing
