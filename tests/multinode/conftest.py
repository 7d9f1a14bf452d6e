"""Fixtures and helpers of the multi-node suite: several real `ckpt run`
supervisors (one per rank, each with its own --dir) against ONE remote, which
is either a directory (file://) or the real S3 test server (moto).

- `make_remote` / `remote`: a fresh remote of the parametrised kind, with a
  read-only view of its objects (`Remote.keys`, per-rank manifests, chunks,
  trash) taken straight from the store, not through ckpt.
- `cluster`: starts one supervisor per rank around the TRAINER child below
  and kills every supervisor and child process group it started at teardown.
- TRAINER: a training script that writes a rank-specific shard, a shared
  `weights.bin` (the same bytes on every rank for a step) and `state.txt`,
  then commits the step (`ckpt commit --step S`, or the shim's
  `ckpt.commit(step=S)`). It reports through marker files in its own control
  dir (outside the checkpoint dir): started-<n>.json (its n-th launch: env
  and a digest of every file it was restored with), at-<S> (the step's files are written,
  not committed yet), committed-<S>, done. A gate (a file the test creates)
  can hold it before any commit, which makes "rank 0 committed step k, rank 1
  did not" deterministic.

No test here sleeps to let something happen: every wait polls with a
generous deadline.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import random
import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from faults._proc import RemoteView
from integration._util import CKPT, PY, Running, pid_gone, run_ckpt, wait_for

REPO = Path(__file__).resolve().parents[2]
#: Remote kinds every multi-node test runs against.
KINDS = ("file", "s3-moto")
#: Every poll's deadline here (seconds): generous, a slow machine is slower, not flaky.
DEADLINE = 60.0
#: Bytes of the shared weights file per step (one chunk: ckpt's chunks are 8 MiB).
WEIGHTS = 3 * 1024 * 1024

#: Variables that name a rank or a world size (ckpt's own and every engine's it
#: detects): none may leak in from the machine that runs the suite.
RANK_ENV = (
    "GROUP_RANK",
    "NODE_RANK",
    "PET_NNODES",
    "PET_NODE_RANK",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "SLURM_NODEID",
    "SLURM_NNODES",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_JOB_ID",
    "JOB_COMPLETION_INDEX",
    "SKYPILOT_NODE_RANK",
    "SKYPILOT_NUM_NODES",
)
#: CKPT_* variables the suite itself relies on (everything else CKPT_* is
#: configuration of `ckpt run` and is removed).
KEEP_CKPT_ENV = ("CKPT_DMI_DIR", "CKPT_FAULT_TALLY_DIR")


@pytest.fixture(autouse=True)
def _rank_isolation(_isolated_home: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """No rank identity and no ckpt setting from the outside; the worktree's
    cli/ and shims/ first on PYTHONPATH, for ckpt and for the children (the
    venv's editable install may point at another checkout)."""
    for name in list(os.environ):
        if name.startswith("CKPT_") and name not in KEEP_CKPT_ENV:
            monkeypatch.delenv(name)
    for name in RANK_ENV:
        monkeypatch.delenv(name, raising=False)
    old = os.environ.get("PYTHONPATH")
    paths = [str(REPO / "cli"), str(REPO / "shims"), *([old] if old else [])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))


# ---------------------------------------------------------------- file contents


def weights(step: int, size: int) -> bytes:
    """The shared weights at `step`: the same bytes on every rank."""
    return random.Random(f"weights/{step}").randbytes(size)


def cycle(step: int, period: int, size: int) -> bytes:
    """A file that comes back to old contents every `period` steps (so a rank
    names again a chunk that only an older, pruned manifest named)."""
    return random.Random(f"cycle/{step % period}").randbytes(size)


def shard(rank: int, step: int) -> bytes:
    """Rank `rank`'s own shard at `step` (different on every rank)."""
    return (f"rank {rank} shard at step {step}\n" * 1024).encode()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def expected_files(
    rank: int, step: int, *, size: int = WEIGHTS, period: int = 0, period_size: int = 0
) -> dict[str, str]:
    """What a rank's checkpoint dir holds after it wrote `step` (name -> sha256)."""
    out = {
        f"shard-{rank}.bin": sha(shard(rank, step)),
        "weights.bin": sha(weights(step, size)),
        "state.txt": sha(str(step).encode()),
    }
    if period:
        out["cycle.bin"] = sha(cycle(step, period, period_size))
    return out


def tree_digests(root: Path) -> dict[str, str]:
    """Every regular file below root -> sha256 (what the TRAINER reports too)."""
    if not root.is_dir():
        return {}
    return {
        p.relative_to(root).as_posix(): sha(p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


# ---------------------------------------------------------------- the child

TRAINER_BODY = """
cfg = json.loads(sys.argv[1])
d = Path(os.environ["CKPT_DIR"])
ctl = Path(cfg["ctl"])
ctl.mkdir(parents=True, exist_ok=True)
rank = int(os.environ.get("CKPT_RANK") or 0)
mode = cfg.get("commit", "none")


def mark(name, doc=None):
    tmp = ctl / (name + ".part")
    tmp.write_text(json.dumps({} if doc is None else doc))
    os.replace(tmp, ctl / name)


def wait(path):
    p = Path(path)
    while not p.exists():
        time.sleep(0.02)


def save(name, data):
    tmp = d / (name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, d / name)


files = {}
if d.is_dir():
    for p in sorted(d.rglob("*")):
        if p.is_file() and not p.is_symlink():
            files[p.relative_to(d).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
state = d / "state.txt"
start = int(state.read_text()) if state.exists() else 0
names = ("CKPT_RANK", "CKPT_WORLD_SIZE", "CKPT_RESTORED_STEP", "CKPT_RESTORED", "CKPT_ATTEMPT")
report = {
    "pid": os.getpid(),
    "pgid": os.getpgid(0),
    "start": open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19],
    "env": {k: os.environ.get(k) for k in names},
    "files": files,
    "state": state.read_text() if state.exists() else None,
}
if mode == "shim":
    import ckpt

    report["shim_restored_step"] = getattr(ckpt.checkpoint(), "restored_step", "missing")
mark(f"started-{len(list(ctl.glob('started-*.json'))) + 1}.json", report)

step = start
while True:
    if cfg.get("stop") and Path(cfg["stop"]).exists():
        break
    if step >= cfg["steps"]:
        break
    step += 1
    save(f"shard-{rank}.bin", shard(rank, step))
    save("weights.bin", weights(step, cfg["weights"]))
    if cfg.get("period"):
        save("cycle.bin", cycle(step, cfg["period"], cfg["period_size"]))
    save("state.txt", str(step).encode())
    mark(f"at-{step}")
    gate = cfg.get("gates", {}).get(str(step))
    if gate:
        wait(gate)
    if cfg.get("pace"):
        wait(Path(cfg["pace"]) / f"at-{step}")
    got = None
    try:
        if mode == "shim":
            got = ckpt.commit(step=step)
        elif mode == "shell":
            r = subprocess.run(
                [cfg["ckpt"], "commit", "--step", str(step)],
                capture_output=True, text=True, stdin=subprocess.DEVNULL,
            )
            if r.returncode != 0:
                raise RuntimeError(f"ckpt commit exited {r.returncode}: {r.stderr.strip()}")
            got = r.stdout.strip()
    except Exception as exc:
        mark(f"failed-{step}", {"error": f"{type(exc).__name__}: {exc}"})
        sys.exit(3)
    mark(f"committed-{step}", {"result": got})
    time.sleep(cfg.get("sleep", 0))
mark("done", {"last": step})
if cfg.get("finish"):
    wait(ctl / "finish")
sys.exit(cfg.get("exit", 0))
"""

#: The whole child script: imports, the content functions above, the body.
TRAINER = "\n".join(
    [
        "import hashlib, json, os, random, subprocess, sys, time",
        "from pathlib import Path",
        "",
        *(inspect.getsource(f) for f in (weights, cycle, shard)),
        TRAINER_BODY,
    ]
)


# ---------------------------------------------------------------- the remote


_LOCAL_TEMP = re.compile(r"^\.[^/]*\.tmp-[0-9a-f]+$")
_MANIFEST = re.compile(r"^ranks/(\d+)/snapshots/(\d{10})-([0-9a-f]{8})\.json$")
_ROOT_MANIFEST = re.compile(r"^snapshots/(\d{10})-([0-9a-f]{8})\.json$")
_HASH = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class Remote:
    """One repository location shared by every rank, and a view of its objects."""

    kind: str
    url: str
    env: dict[str, str]
    view: RemoteView
    cwd: Path
    #: A local remote's directory; None for an object store (reached through `fs`).
    path: Path | None = None
    fs: Any = None
    root: str = ""

    def move(self, src: str, dst: str) -> None:
        """Move one object (the test plays a GC round by hand)."""
        if self.path is not None:
            (self.path / dst).parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.path / src, self.path / dst)
            return
        self.fs.mv(f"{self.root}/{src}", f"{self.root}/{dst}")
        self.fs.invalidate_cache()

    def put(self, key: str, data: bytes) -> None:
        """Write one object (the test plants what a killed writer left)."""
        if self.path is not None:
            (self.path / key).parent.mkdir(parents=True, exist_ok=True)
            (self.path / key).write_bytes(data)
            return
        self.fs.pipe_file(f"{self.root}/{key}", data)
        self.fs.invalidate_cache()

    def objects(self, prefix: str = "") -> dict[str, int]:
        """Committed objects under prefix (key -> size); half-written temps left out."""
        return {
            k: n
            for k, n in self.view.keys().items()
            if k.startswith(prefix) and not _LOCAL_TEMP.match(k.rsplit("/", 1)[-1])
        }

    def read_json(self, key: str) -> Any:
        return json.loads(self.view.read(key))

    def manifests(self, rank: int) -> list[tuple[str, dict[str, Any]]]:
        """Rank `rank`'s manifests (key, document), oldest generation first."""
        out = []
        for key in sorted(self.objects(f"ranks/{rank}/snapshots/")):
            if _MANIFEST.match(key):
                with contextlib.suppress(FileNotFoundError, ValueError, OSError):
                    out.append((key, self.read_json(key)))
        return out

    def root_manifests(self) -> list[str]:
        return sorted(k for k in self.objects("snapshots/") if _ROOT_MANIFEST.match(k))

    def steps(self, rank: int) -> list[int | None]:
        return [doc.get("step") for _key, doc in self.manifests(rank)]

    def manifest_of(self, rank: int, step: int) -> tuple[str, dict[str, Any]]:
        """Rank's newest manifest of `step`."""
        found = [(k, m) for k, m in self.manifests(rank) if m.get("step") == step]
        assert found, f"rank {rank} has no manifest of step {step}: {self.steps(rank)}"
        return found[-1]

    def chunks(self) -> dict[str, int]:
        """Chunks under chunks/ (digest -> size)."""
        return {
            k.rsplit("/", 1)[-1]: n
            for k, n in self.objects("chunks/").items()
            if _HASH.match(k.rsplit("/", 1)[-1])
        }

    def trash(self) -> dict[str, int]:
        """Chunks waiting in trash/ (digest -> size)."""
        return {
            k.rsplit("/", 1)[-1]: n
            for k, n in self.objects("trash/").items()
            if _HASH.match(k.rsplit("/", 1)[-1])
        }

    def ckpt(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a one-shot `ckpt` command against this remote's environment."""
        return run_ckpt(list(args), cwd=self.cwd, env=self.env, timeout=timeout)

    def ls(self, *extra: str) -> dict[str, Any]:
        res = self.ckpt("ls", self.url, "--json", *extra)
        assert res.returncode == 0, (
            f"ckpt ls {' '.join(extra)} exited {res.returncode}:\n{res.stderr}"
        )
        doc: dict[str, Any] = json.loads(res.stdout)
        return doc

    def restore(
        self, dest: Path, rank: int, world: int, *extra: str
    ) -> subprocess.CompletedProcess[str]:
        return self.ckpt(
            "restore", self.url, str(dest), "--rank", str(rank), "--world-size", str(world), *extra
        )


def assert_verified(remote: Remote) -> None:
    """`ckpt verify URL` finds every manifest of every rank whole."""
    res = remote.ckpt("verify", remote.url)
    assert res.returncode == 0, f"ckpt verify exited {res.returncode}:\n{res.stdout}\n{res.stderr}"


def chunk_names(manifest: dict[str, Any]) -> set[str]:
    return {c for e in manifest.get("entries", ()) for c in e.get("chunks", ())}


@pytest.fixture(params=KINDS)
def make_remote(
    request: pytest.FixtureRequest, tmp_path: Path, store_of: Callable[[str], Any]
) -> Callable[[str], Remote]:
    """make_remote(name) -> a fresh, empty remote of the parametrised kind."""

    def make(name: str = "remote") -> Remote:
        if request.param == "file":
            path = tmp_path / name
            return Remote("file", f"file://{path}", {}, RemoteView(path), tmp_path, path=path)
        import fsspec

        store = store_of(request.param)
        view = RemoteView(store.url, store.storage_options)
        fs, root = fsspec.core.url_to_fs(
            store.url, skip_instance_cache=True, **store.storage_options
        )
        return Remote(
            request.param, store.url, dict(store.env), view, tmp_path, fs=fs, root=root.rstrip("/")
        )

    return make


@pytest.fixture
def remote(make_remote: Callable[[str], Remote]) -> Remote:
    return make_remote("remote")


# ---------------------------------------------------------------- the ranks


@dataclass
class Node:
    """One rank's supervisor (`ckpt run`) around one TRAINER child."""

    rank: int
    world: int
    dir: Path
    ctl: Path
    proc: Running
    child: dict[str, Any] = field(default_factory=dict)

    def mark(self, name: str, timeout: float = DEADLINE) -> dict[str, Any]:
        """Wait for the child's marker file `name` and return what it holds."""
        path = self.ctl / name
        failed = self.ctl

        def seen() -> tuple[dict[str, Any]] | None:
            if path.exists():  # a tuple: an empty marker ({}) counts as seen
                return (json.loads(path.read_text()),)
            bad = sorted(failed.glob("failed-*"))
            if bad:
                raise AssertionError(
                    f"rank {self.rank}'s child failed to commit: {bad[0].read_text()}\n"
                    f"ckpt stderr:\n{self.proc.stderr()}"
                )
            return None

        what = f"rank {self.rank}'s child to reach {name}"
        return wait_for(seen, what=what, timeout=timeout, proc=self.proc)[0]

    def started(self, launch: int = 1) -> dict[str, Any]:
        """The child's start report (its env and the files it was restored with)."""
        self.child = self.mark(f"started-{launch}.json")
        self.proc.extra_pids.append(self.child["pid"])
        return self.child

    def gate(self, name: str) -> Path:
        """The gate file `name` of this rank (created by the test to let it go)."""
        return self.ctl / "gates" / name

    def open(self, name: str) -> None:
        p = self.gate(name)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()

    def finish(self) -> None:
        """Let a child started with finish=True exit."""
        (self.ctl / "finish").touch()

    def wait(self, timeout: float = 120) -> int:
        return self.proc.wait(timeout)

    def assert_exit(self, code: int = 0, timeout: float = 120) -> None:
        rc = self.wait(timeout)
        assert rc == code, f"rank {self.rank}'s ckpt exited {rc}, not {code}:\n{self.stderr()}"

    def stderr(self) -> str:
        return self.proc.stderr()

    def kill9(self) -> None:
        """kill -9 the supervisor and the child's whole process group at once
        (a node that disappears)."""
        assert self.child, "kill9 needs the child's start report (started())"
        os.kill(self.proc.pid, signal.SIGKILL)
        kill_child_group(self.child)
        self.proc.proc.wait(30)
        wait_for(lambda: pid_gone(self.child["pid"]), what=f"rank {self.rank}'s child to die")


def _start_time(pid: int) -> str | None:
    """The start time of pid (field 22 of /proc/PID/stat), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def kill_child_group(child: dict[str, Any]) -> None:
    """SIGKILL a trainer's process group, but only while its leader is still
    that trainer: a pid (and a group id) of a process that has ended is soon
    used again (pid_max is 32768 here), and a killpg of a stale group id at
    teardown could hit any process of the test run."""
    pid, pgid = child["pid"], child["pgid"]
    if _start_time(pid) != child.get("start"):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pgid:
            os.killpg(pgid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)


class Cluster:
    """Starts ranks (one `ckpt run` each) on one remote; kills them all at the end."""

    def __init__(self, tmp_path: Path, remote: Remote) -> None:
        self.tmp_path = tmp_path
        self.remote = remote
        self.nodes: list[Node] = []
        self.script = tmp_path / "trainer.py"
        self.script.write_text(TRAINER)

    def start(
        self,
        rank: int,
        world: int,
        *,
        label: str,
        steps: int,
        commit: str = "shell",
        flags: tuple[str, ...] = (),
        gates: tuple[int, ...] = (),
        sleep: float = 0.05,
        size: int = WEIGHTS,
        period: int = 0,
        period_size: int = 0,
        finish: bool = False,
        stop: Path | None = None,
        pace: Path | None = None,
        ckpt_dir: Path | None = None,
        remote: Remote | None = None,
        rank_flags: bool = True,
        env: dict[str, str] | None = None,
    ) -> Node:
        """Start rank `rank` of `world`: `ckpt run --rank R --world-size N` with
        a fresh --dir (unless given) and the TRAINER, which commits steps up to
        `steps` (commit: shell | shim | none); before committing a step in
        `gates` it waits for the gate file `step-<S>` (Node.open)."""
        remote = remote or self.remote
        ck = ckpt_dir or self.tmp_path / f"ck-{label}-r{rank}"
        ctl = self.tmp_path / "ctl" / f"{label}-r{rank}"
        ctl.mkdir(parents=True)
        cfg = {
            "ctl": str(ctl),
            "steps": steps,
            "commit": commit,
            "ckpt": str(CKPT),
            "sleep": sleep,
            "weights": size,
            "period": period,
            "period_size": period_size,
            "gates": {str(s): str(ctl / "gates" / f"step-{s}") for s in gates},
            "finish": finish,
            "stop": str(stop) if stop else None,
            "pace": str(pace) if pace else None,
        }
        args = ["run", "--dir", str(ck), "--remote", remote.url]
        if rank_flags:
            args += ["--rank", str(rank), "--world-size", str(world)]
        args += ["--debounce", "0.2", "--backoff", "0", "--retries", "0", *flags]
        args += ["--", PY, str(self.script), json.dumps(cfg)]
        proc = Running(
            args,
            cwd=self.tmp_path,
            logs=self.tmp_path / "logs",
            name=f"{label}-r{rank}",
            env={**remote.env, **(env or {})},
        )
        node = Node(rank, world, ck, ctl, proc)
        self.nodes.append(node)
        return node

    def cleanup(self) -> None:
        for node in self.nodes:
            node.proc.cleanup()
            if node.child:
                kill_child_group(node.child)


@pytest.fixture
def cluster(tmp_path: Path, remote: Remote) -> Iterator[Cluster]:
    c = Cluster(tmp_path, remote)
    try:
        yield c
    finally:
        c.cleanup()


def one_error_line(stderr: str) -> str:
    """The single `ckpt: error:` line of a refused command (and insist on one)."""
    lines = [line for line in stderr.splitlines() if line.startswith("ckpt: error:")]
    assert len(lines) == 1, f"expected one `ckpt: error:` line, got:\n{stderr}"
    return lines[0]


def assert_restored(
    report: dict[str, Any], rank: int, world: int, step: int | None, **content: int
) -> None:
    """A child's start report says it is rank/world and was restored with
    exactly rank `rank`'s files of `step` (step None: started empty)."""
    env = report["env"]
    assert env["CKPT_RANK"] == str(rank), env
    assert env["CKPT_WORLD_SIZE"] == str(world), env
    if step is None:
        assert report["files"] == {}, f"rank {rank} should start empty: {report['files']}"
        assert env["CKPT_RESTORED_STEP"] == "", env
        return
    assert report["state"] == str(step), (
        f"rank {rank} restored state {report['state']!r}, expected step {step}"
    )
    assert report["files"] == expected_files(rank, step, **content), (
        f"rank {rank}'s restored files are not its own files of step {step}"
    )
    assert env["CKPT_RESTORED_STEP"] == str(step), env


__all__ = [
    "DEADLINE",
    "KINDS",
    "WEIGHTS",
    "Cluster",
    "Node",
    "Remote",
    "assert_restored",
    "assert_verified",
    "chunk_names",
    "cycle",
    "expected_files",
    "one_error_line",
    "sha",
    "shard",
    "tree_digests",
    "weights",
]
