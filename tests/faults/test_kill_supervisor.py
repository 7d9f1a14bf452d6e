"""kill -9 of the supervisor at random moments while it snapshots, uploads and
collects garbage: the remote stays a repository that restores exactly one
committed state, and nothing committed is lost.

Injected: SIGKILL to the `ckpt run` process at a seeded random moment, while its
child writes multi-file states (atomically, tmp + os.replace; one file spans
two 8 MiB chunks), commits each one with `ckpt.commit()` and logs "committed
N" (fsync) only after commit() returned. `--keep 1`, so garbage collection runs
after every snapshot. The moment is chosen per iteration from the seed: a random
delay after the child started, a short random delay after the child entered
commit(), or (file remotes) at once when a half-written chunk or a manifest
count above --keep (GC not done yet) shows in the remote.

Asserted after every kill: the supervisor's child is gone too (the guardian);
`ckpt ls --json` opens the repository (exit 0, no damaged manifest, newest
first); every chunk a manifest names exists; `ckpt restore` into a fresh dir
yields exactly one committed state (the expected files, every one whole, all of
one version), the one `ls` lists first, and its version is at least the last
one whose commit returned before the kill. The next iteration runs on the same
remote with a fresh --dir (a new machine): it must take over the dead writer's
lease at once (`--lease-timeout 600`, far above the 30 s an iteration waits for
its child to start, and above the default run's per-test timeout), and its
child checks that the state it was restored from is one whole committed state.

Where each kill landed is read from what the remote held right after it (the
supervisor is dead, so nothing changes it any more): chunks of a version newer
than the newest manifest, or a half-written object -> during upload; more
manifests than --keep, or unreferenced chunks of an older version -> during GC;
otherwise the child's log says whether a commit was under way (-> during
snapshot: pin, read, hash, before any new object) or whether that commit was
already durable (-> after the commit was durable, before the child heard), or
the child was just writing files (-> idle).

A last test kills during uploads to a path remote until a half-written object
(a temp name) is left behind, and asserts that a later writer's GC removes it.

Iterations: CKPT_FAULT_ITERATIONS (default 50) kills in all: max(10, N/5) on S3
(the moto test server), the rest on path remotes, split over FILE_SHARDS tests
so xdist runs them in parallel. CKPT_FAULT_ITERATIONS=500 makes a long run. Every
assertion message names the seed: CKPT_FAULT_SEED=<seed> replays the choices.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from faults._proc import (
    BLOCK,
    CHUNK,
    HEADER,
    PRELUDE,
    RemoteView,
    base_seed,
    read_announce,
    repro,
    run_together,
    verify_whole,
    wait_gone,
)
from faults._tally import record
from integration._util import PY, Running, read_tree, wait_for
from stores import Store

ITERATIONS = int(os.environ.get("CKPT_FAULT_ITERATIONS", "50"))
S3_ITERATIONS = max(10, ITERATIONS // 5)
FILE_ITERATIONS = max(1, ITERATIONS - S3_ITERATIONS)
FILE_SHARDS = 4
SEED = base_seed()
KEEP = 1
#: One state: a file of two chunks, one of one chunk, and a small one.
SIZES = {"a.bin": CHUNK + 2 * BLOCK, "b.bin": 3 * BLOCK, "c.bin": HEADER + 100}


def _per_test_timeout(iterations: int) -> float:
    """210 s for the default 10 iterations: well below --lease-timeout (600), so
    a run that waited out the lease would fail the test (and each iteration's
    wait for its child to start gives up after 30 s anyway)."""
    return 60.0 + 15.0 * iterations


#: argv: log, ready file, seed, sizes (JSON). Checks that the directory it was
#: restored into holds one whole committed state (else exits 3), announces
#: itself, then writes states N+1, N+2, ... for ever, committing each.
WRITER = (
    "from __future__ import annotations\n"
    + PRELUDE
    + """
import json, os, sys, time
from pathlib import Path
import ckpt

d = Path(os.environ["CKPT_DIR"])
log_path, ready, seed = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
sizes = json.loads(sys.argv[4])


def log(line, sync=False):
    with open(log_path, "a") as f:
        f.write(line + "\\n")
        f.flush()
        if sync:
            os.fsync(f.fileno())


names = sorted(os.listdir(d)) if d.is_dir() else []
if names and names != sorted(sizes):
    sys.exit(f"child: restored files {names}, expected {sorted(sizes)} or nothing")
versions = set()
for name in names:
    try:
        got = verify_whole((d / name).read_bytes())
    except ValueError as exc:
        sys.exit(f"child: restored file {name} is torn: {exc}")
    if got[0] != name:
        sys.exit(f"child: restored file {name} holds {got[0]}'s content")
    versions.add(got)
if len({v for _n, v in versions}) > 1:
    sys.exit(f"child: restored files of several versions: {sorted(versions)}")
restored = max((v for _n, v in versions), default=0)
part = ready.with_name(ready.name + ".part")
part.write_text(json.dumps({"pid": os.getpid(), "restored": restored}))
os.replace(part, ready)

v = restored + 1
while True:
    log(f"writing {v}")
    for name, size in sizes.items():
        tmp = d / (name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(content(seed, name, v, size))
        os.replace(tmp, d / name)
    log(f"commit {v}")
    ckpt.commit()
    log(f"committed {v}", sync=True)
    v += 1
    time.sleep(0.03)  # the "training" between two checkpoints
"""
)


class Log:
    """The child's log (shared by every iteration on one remote)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self) -> list[str]:
        return self.path.read_text().splitlines() if self.path.exists() else []

    def last(self, word: str) -> int:
        vs = [int(line.split()[1]) for line in self.lines() if line.split()[0] == word]
        return max(vs, default=0)


class Target:
    """Where the iterations run: a path remote, or an S3 store."""

    def __init__(
        self, name: str, url: str, view: RemoteView, options: list[str], env: dict[str, str]
    ) -> None:
        self.name = name  # for messages: which test (shard) this is
        self.url = url
        self.view = view
        self.options = options
        self.env = env
        self.kind = "s3" if url.startswith("s3://") else "file"


def _version_of(view: RemoteView, manifest: dict[str, Any] | None) -> int:
    """The version a manifest holds: from the header of its a.bin's first chunk."""
    if manifest is None:
        return 0
    for e in manifest["entries"]:
        if e["path"] == "a.bin" and e.get("chunks"):
            who = view.chunk_owner(e["chunks"][0])
            return who[1] if who else 0  # a missing chunk: _check_repository says so
    raise AssertionError(f"manifest {manifest['id']} has no a.bin: {manifest['entries']}")


def _classify(
    view: RemoteView, before_orphans: set[str], before_temps: set[str], log_tail: str
) -> str:
    """Where the kill landed, from what the remote holds now (see the docstring)."""
    state = view.state()
    newest_v = _version_of(view, state.newest())
    new_orphans = state.orphans() - before_orphans
    owners = [view.chunk_owner(d) for d in sorted(new_orphans)]
    if set(state.temps) - before_temps or any(o and o[1] > newest_v for o in owners):
        return "during upload"
    if new_orphans or len(state.manifests) > KEEP:
        return "during gc"
    words = log_tail.split()
    if words and words[0] == "commit":
        return "during snapshot" if int(words[1]) > newest_v else "commit durable, not yet heard"
    return "idle"


def _choose_kill(
    rng: random.Random,
    target: Target,
    log: Log,
    remote_path: Path | None,
    proc: Running,
    modes: list[str],
) -> str:
    """Wait for the seeded moment; return how it was chosen (for messages)."""
    mode = rng.choice(modes)
    if mode == "random":
        delay = rng.uniform(0.0, 0.6)
        time.sleep(delay)  # the injected fault's moment, not a wait for something
        return f"{mode} {delay:.3f}s"
    if mode == "in-commit":
        seen = log.last("commit")
        wait_for(lambda: log.last("commit") > seen, what="the child to enter commit()", proc=proc)
        delay = rng.uniform(0.0, 0.05 if target.kind == "file" else 0.4)
        time.sleep(delay)
        return f"{mode} +{delay:.3f}s"
    assert remote_path is not None
    snaps = remote_path / "snapshots"

    def upload_seen() -> bool:
        for _dirpath, _dirs, files in os.walk(remote_path / "chunks"):
            if any(f.startswith(".") for f in files):
                return True
        return False

    def gc_seen() -> bool:
        try:
            return sum(1 for n in os.listdir(snaps) if n.endswith(".json")) > KEEP
        except FileNotFoundError:
            return False

    seen_it = upload_seen if mode == "mid-upload" else gc_seen
    end = time.monotonic() + 5.0
    while time.monotonic() < end and proc.proc.poll() is None:
        if seen_it():
            return f"{mode} (seen)"
        time.sleep(0.0005)
    return f"{mode} (not seen in 5s: killed anyway)"


def _kill_iterations(
    spawn: Callable[..., Running],
    tmp_path: Path,
    target: Target,
    iterations: int,
    seed: int,
    remote_path: Path | None,
    *,
    modes: list[str] | None = None,
    until: Callable[[], bool] = lambda: False,
) -> Counter[str]:
    """Up to `iterations` runs on one remote, each killed -9 at a seeded moment
    and checked (see the module docstring); stops early once until() is true."""
    rng = random.Random(seed)
    if modes is None:
        modes = ["random", "in-commit"] + (["mid-upload", "mid-gc"] if remote_path else [])
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    log = Log(tmp_path / "child.log")
    phases: Counter[str] = Counter()
    prev_pid: int | None = None
    state0 = target.view.state()
    before_orphans, before_temps = state0.orphans(), set(state0.temps)
    for i in range(iterations):
        ready = tmp_path / f"ready-{i}.json"
        args = [
            "run",
            "--dir",
            str(tmp_path / f"ck-{i}"),
            "--remote",
            target.url,
            *target.options,
            "--snapshots",
            "commit",
            "--keep",
            str(KEEP),
            "--lease-timeout",
            "600",
            "--backoff",
            "0",
            "--",
            PY,
            str(script),
            str(log.path),
            str(ready),
            str(seed),
            json.dumps(SIZES),
        ]
        committed_before = log.last("committed")
        ckpt = spawn(args, name=f"ckpt-{i}", env=target.env)
        where = repro(SEED, test=target.name, iteration=i)
        child = read_announce(ready, what=f"the child of iteration {i} to start{where}", proc=ckpt)
        ckpt.extra_pids.append(child["pid"])
        assert child["restored"] >= committed_before, (
            f"iteration {i}: the run restored version {child['restored']}, but version "
            f"{committed_before} was committed before{where}"
        )
        if prev_pid is not None:
            assert "took over the lease" in ckpt.stderr(), ckpt.stderr() + where
            assert f"process {prev_pid} on this host is gone" in ckpt.stderr(), (
                ckpt.stderr() + where
            )

        how = _choose_kill(rng, target, log, remote_path, ckpt, modes)
        tail = (log.lines() or [""])[-1]
        ckpt.signal(signal.SIGKILL)
        assert ckpt.wait() == -signal.SIGKILL, f"ckpt was not killed by us ({how}){where}"
        prev_pid = ckpt.pid
        phase = _classify(target.view, before_orphans, before_temps, tail)
        where = repro(SEED, test=target.name, iteration=i, kill=f"'{how}'", phase=f"'{phase}'")
        wait_gone([child["pid"]], what=f"the child of the killed ckpt{where}")

        _check_repository(tmp_path, target, log, i, where)
        phases[phase] += 1
        after = target.view.state()
        before_orphans, before_temps = after.orphans(), set(after.temps)
        if until():
            break
    return phases


def _check_repository(tmp_path: Path, target: Target, log: Log, i: int, where: str) -> None:
    committed, written = log.last("committed"), log.last("writing")
    out = tmp_path / f"restored-{i}"
    # Two readers at once (they need no lease): ls and restore.
    listing, res = run_together(
        [
            ["ls", target.url, "--json", *target.options],
            ["restore", target.url, str(out), *target.options],
        ],
        cwd=tmp_path,
        env=target.env,
    )
    assert listing.returncode == 0, f"ckpt ls after the kill: {listing.stderr}{where}"
    rows = json.loads(listing.stdout)["snapshots"]
    assert all(r["ok"] for r in rows), f"a damaged manifest after the kill: {rows}{where}"
    gens = [r["generation"] for r in rows]
    assert gens == sorted(gens, reverse=True), f"ls is not newest first: {gens}{where}"
    state = target.view.state()
    missing = state.referenced() - state.chunks
    assert not missing, f"manifests name {len(missing)} missing chunks{where}"

    assert res.returncode == 0, f"ckpt restore after the kill: {res.stderr}{where}"
    files = read_tree(out) if out.is_dir() else {}
    if not rows:
        assert committed == 0, f"version {committed} was committed, the remote is empty{where}"
        assert not files, f"restored {sorted(files)} from an empty remote{where}"
        return
    assert sorted(files) == sorted(SIZES), f"restored files {sorted(files)}{where}"
    versions = {}
    for name, data in files.items():
        try:
            got_name, versions[name] = verify_whole(data)
        except ValueError as exc:
            raise AssertionError(f"restored {name} is torn: {exc}{where}") from None
        assert got_name == name, f"{name} holds the content of {got_name}{where}"
    assert len(set(versions.values())) == 1, f"files of several versions: {versions}{where}"
    version = versions["a.bin"]
    assert version >= committed, (
        f"lost a commit: restored version {version}, but the commit of version {committed} "
        f"had returned before the kill{where}"
    )
    assert version <= written, f"restored version {version} was never written{where}"
    m = re.search(r"restored snapshot ([0-9a-f]{8})", res.stderr)
    assert m and m.group(1) == rows[0]["id"], (
        f"restore took {m and m.group(1)}, ls lists {rows[0]['id']} first{where}"
    )


def _record(phases: Counter[str]) -> None:
    for phase, n in phases.items():
        record(f"supervisor kill -9 ({phase})", n)


@pytest.mark.timeout(_per_test_timeout(S3_ITERATIONS))
def test_kill_9_of_the_supervisor_on_s3(
    spawn: Callable[..., Running], tmp_path: Path, store_of: Callable[[str], Store]
) -> None:
    """S3_ITERATIONS kills on one S3 remote (moto): uploads and deletes are
    HTTP requests there, so more kills land in them."""
    store = store_of("s3-moto")
    target = Target(
        "s3",
        store.url,
        RemoteView(store.url, store.storage_options),
        store.cli_options,
        store.env,
    )
    phases = _kill_iterations(spawn, tmp_path, target, S3_ITERATIONS, SEED + 1000, None)
    _record(phases)


@pytest.mark.parametrize("shard", range(FILE_SHARDS))
@pytest.mark.timeout(_per_test_timeout(-(-FILE_ITERATIONS // FILE_SHARDS)))
def test_kill_9_of_the_supervisor_on_a_path_remote(
    spawn: Callable[..., Running], tmp_path: Path, remote: Path, shard: int
) -> None:
    """FILE_ITERATIONS/FILE_SHARDS kills on one path remote (see the module docstring)."""
    n = FILE_ITERATIONS // FILE_SHARDS + (1 if shard < FILE_ITERATIONS % FILE_SHARDS else 0)
    seed = SEED + shard
    target = Target(f"path-shard-{shard}", str(remote), RemoteView(remote), [], {})
    phases = _kill_iterations(spawn, tmp_path, target, n, seed, remote)
    _record(phases)


@pytest.mark.timeout(_per_test_timeout(20))
def test_half_written_objects_of_killed_uploads_are_collected(
    spawn: Callable[..., Running], tmp_path: Path, remote: Path
) -> None:
    """Injected: kill -9 of the supervisor while a chunk is being written to a
    path remote (polled for: its temp object exists), repeated until a
    half-written temp object is left behind (at most 20 kills). Asserted: the
    next writer's first snapshot (whose GC sweeps the chunk store for orphans
    of crashed uploads) removes it: crashes must not make a remote grow for
    ever (each such object is up to 8 MiB)."""
    view = RemoteView(remote)

    def leftover() -> bool:
        return bool(view.state().temps)

    phases = _kill_iterations(
        spawn,
        tmp_path,
        Target("leftovers", str(remote), view, [], {}),
        20,
        SEED + 2000,
        remote,
        modes=["mid-upload"],
        until=leftover,
    )
    left = set(view.state().temps)
    assert left, f"20 kills during uploads left no half-written object{repro(SEED)}"

    log = Log(tmp_path / "child.log")
    ready = tmp_path / "ready-clean.json"
    committed = log.last("committed")
    ckpt = spawn(
        [
            "run",
            "--dir",
            str(tmp_path / "ck-clean"),
            "--remote",
            str(remote),
            "--snapshots",
            "commit",
            "--keep",
            str(KEEP),
            "--",
            PY,
            str(tmp_path / "writer.py"),
            str(log.path),
            str(ready),
            str(SEED + 2000),
            json.dumps(SIZES),
        ],
        name="ckpt-clean",
    )
    child = read_announce(ready, what="the clean run's child", proc=ckpt)
    ckpt.extra_pids.append(child["pid"])
    wait_for(lambda: log.last("committed") > committed + 1, what="two commits", proc=ckpt)
    ckpt.signal(signal.SIGTERM)
    assert ckpt.wait() == 143, ckpt.stderr()
    still = sorted(left & set(view.state().temps))
    assert not still, (
        f"half-written objects of killed uploads are still in the remote after a later "
        f"writer's snapshots and GC: {still}{repro(SEED)}"
    )
    _record(phases)
