"""kill -9 of the child in the middle of writing its checkpoint files, at seeded
random moments, while ckpt snapshots the directory (auto mode: quiet periods,
plus a rescan every second, so snapshots also come while files are written).

A child killed by a signal is relaunched (the default --retry-on); after
KILLS kills the last attempt writes one more version of every file and exits 0.
Then every snapshot the remote holds (--keep is large, so all of them) is read
back chunk by chunk, and the newest is restored with `ckpt restore`.

- Atomic writer (consistency level 2: "every file in a snapshot is whole"):
  each file is written to a temp name in pieces, fsynced, and renamed. Asserted:
  every file of every snapshot is whole (its header's sha256 matches), no temp
  name is ever in a snapshot, and the newest snapshot is the final version.
- In-place writer of an unrecognised format (level 3, best effort: "a file
  that changes while it is read is not committed in that snapshot; it keeps
  its previous version"): each file is opened with "wb" (truncated) and
  written in pieces with small sleeps. So every file of every snapshot must
  be a content the file really had on disk at one moment: empty, or the
  first bytes of ONE version (a kill may stop a write anywhere) -- never a
  mix of chunks of two versions, never bytes that were not there. The newest
  snapshot must be the final version (a file skipped while it changed is
  picked up by a later snapshot).
- In-place writer of a recognised format (level 3 with checks: a file open
  for writing or failing its check is in progress and never enters an
  automatic snapshot): the same writer, its files numpy .npy arrays (the
  same bytes behind an npy header). Every file of every snapshot is ONE
  WHOLE version, also after the kills that tear a file and leave it closed
  (only the npy check can tell), and every snapshot is verified.

The seed is in every assertion message; CKPT_FAULT_SEED=<seed> replays it.
"""

from __future__ import annotations

import inspect
import json
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from faults._proc import (
    BLOCK,
    CHUNK,
    PRELUDE,
    base_seed,
    content,
    describe,
    parse_header,
    read_announce,
    repro,
    verify_whole,
    wait_gone,
)
from faults._tally import record
from integration._util import (
    PY,
    Running,
    chunk_path,
    manifests,
    read_tree,
    restore_into,
    wait_for,
)

pytestmark = pytest.mark.timeout(240)

SEED = base_seed()
#: Kills per test; the attempt after the last kill finishes.
KILLS = 6
SIZES = {"w1.bin": CHUNK + 4 * BLOCK, "w2.bin": 6 * BLOCK}
#: Bytes per write() call of the writers.
PIECE = 2 * BLOCK

#: The in-place writer's files as numpy arrays (mode "npy"): a recognised format.
NPY_SIZES = {"w1.npy": SIZES["w1.bin"], "w2.npy": SIZES["w2.bin"]}
#: Bytes of the npy header put before a file's content in mode "npy".
NPY_HEAD = 128


def npy_head(size: int) -> bytes:
    """A version 1.0 .npy header for `size` bytes of uint8, NPY_HEAD long."""
    text = "{'descr': '|u1', 'fortran_order': False, 'shape': (" + str(size) + ",), }"
    text = text.ljust(NPY_HEAD - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode("latin-1")


#: argv: ready dir, log, seed, sizes (JSON), final attempt, mode ("atomic",
#: "inplace" or "npy": in place, behind an npy header). Announces itself in
#: <ready dir>/attempt-N.json, then writes new versions of every file (attempt
#: N writes versions N*1000+1, N*1000+2, ...) until killed; the final attempt
#: writes one version and exits 0.
WRITER = (
    "from __future__ import annotations\n"
    + PRELUDE
    + f"PIECE = {PIECE}\nNPY_HEAD = {NPY_HEAD}\n"
    + inspect.getsource(npy_head)
    + """
import json, os, random, sys, time
from pathlib import Path

d = Path(os.environ["CKPT_DIR"])
attempt = int(os.environ["CKPT_ATTEMPT"])
ready_dir, log_path, seed = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
sizes, final, mode = json.loads(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
rng = random.Random(f"{seed}/writer/{attempt}")


def log(line):
    with open(log_path, "a") as f:
        f.write(line + "\\n")


def write(name, v):
    data = content(seed, name, v, sizes[name])
    if mode == "npy":
        data = npy_head(len(data)) + data
    log(f"open {name} {v}")
    if mode == "atomic":
        path = d / f"{name}.tmp.{attempt}"  # a temp name: never snapshotted
    else:
        path = d / name
    with open(path, "wb") as f:
        f.write(data[:4096])  # one page first: a killed write leaves 0 or >= 4096 bytes
        f.flush()
        for off in range(4096, len(data), PIECE):
            f.write(data[off : off + PIECE])
            f.flush()
            if mode != "atomic":
                time.sleep(0.002)
        if mode == "atomic":
            os.fsync(f.fileno())
    if mode == "atomic":
        os.replace(path, d / name)
    log(f"closed {name} {v}")


part = ready_dir / f"attempt-{attempt}.part"
part.write_text(json.dumps({"pid": os.getpid()}))
os.replace(part, ready_dir / f"attempt-{attempt}.json")
v = attempt * 1000
while True:
    v += 1
    for name in sizes:
        write(name, v)
    if attempt == final:
        log(f"final {v}")
        sys.exit(0)
    time.sleep(rng.uniform(0.0, 0.3))
"""
)


def _snapshot_files(remote: Path) -> list[tuple[str, str, bytes]]:
    """(snapshot id, path, bytes) of every file of every snapshot, each distinct
    content read once, assembled from the chunks in the remote."""
    seen: set[tuple[str, ...]] = set()
    out = []
    for m in manifests(remote):
        for e in m["entries"]:
            if e["type"] != "file":
                continue
            key = (e["path"], *e["chunks"])
            if key in seen:
                continue
            seen.add(key)
            data = b"".join(chunk_path(remote, c).read_bytes() for c in e["chunks"])
            assert len(data) == e["size"], f"{m['id']}:{e['path']} chunks do not add up"
            out.append((m["id"], e["path"], data))
    return out


def _run_with_kills(
    spawn: Callable[..., Running],
    tmp_path: Path,
    ckpt_dir: Path,
    remote: Path,
    mode: str,
    seed: int,
    sizes: dict[str, int] = SIZES,
) -> tuple[Running, list[str], Path]:
    """Run the writer under ckpt, kill -9 it KILLS times at seeded moments, let
    the last attempt finish; returns ckpt, how each kill was placed, the log."""
    rng = random.Random(seed)
    ready_dir = tmp_path / "ready"
    ready_dir.mkdir()
    log = tmp_path / "writer.log"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    ckpt = spawn(
        [
            "run",
            "--dir",
            str(ckpt_dir),
            "--remote",
            str(remote),
            "--retries",
            str(KILLS),
            "--backoff",
            "0",
            "--debounce",
            "0.2",
            "--rescan",
            "1",
            "--keep",
            "1000",
            "--",
            PY,
            str(script),
            str(ready_dir),
            str(log),
            str(seed),
            json.dumps(sizes),
            str(KILLS + 1),
            mode,
        ]
    )
    placed: list[str] = []
    for attempt in range(1, KILLS + 1):
        where = repro(SEED, mode=mode, attempt=attempt)
        child = read_announce(
            ready_dir / f"attempt-{attempt}.json", what=f"attempt {attempt}{where}", proc=ckpt
        )
        ckpt.extra_pids.append(child["pid"])
        if rng.random() < 0.5:
            delay = rng.uniform(0.05, 1.2)
            time.sleep(delay)  # the fault's seeded moment, not a wait for something
        else:
            # At once when the attempt is inside a write (its log says "open").
            lines = len(log.read_text().splitlines()) if log.exists() else 0
            skip = rng.randrange(0, 4)

            def writing(lines: int = lines, skip: int = skip) -> bool:
                new = log.read_text().splitlines()[lines:] if log.exists() else []
                opened = [ln for ln in new if ln.startswith("open")]
                return len(opened) > skip and new[-1].startswith("open")

            wait_for(writing, what=f"attempt {attempt} to write{where}", interval=0.002, proc=ckpt)
        os.kill(child["pid"], signal.SIGKILL)
        wait_gone([child["pid"]], what=f"the killed attempt {attempt}{where}")
        # Evidence of where the kill landed: the atomic writer's temp file of
        # this attempt is left behind; the in-place writer's log ends in "open".
        if mode == "atomic":
            mid = any(ckpt_dir.glob(f"*.tmp.{attempt}"))
        else:
            # (A kill before the first write leaves no log: between writes.)
            done = log.read_text().splitlines() if log.exists() else []
            mid = bool(done) and done[-1].startswith("open")
        placed.append("mid-write" if mid else "between writes")
    assert ckpt.wait() == 0, ckpt.stderr() + repro(SEED, mode=mode)
    stderr = ckpt.stderr()
    assert stderr.count("killed by SIGKILL") >= KILLS, stderr + repro(SEED, mode=mode)
    return ckpt, placed, log


def _final_versions(log: Path) -> dict[str, int]:
    """What the finishing attempt wrote last, by file."""
    final: dict[str, int] = {}
    for line in log.read_text().splitlines():
        words = line.split()
        if words[0] == "closed":
            final[words[1]] = int(words[2])
    return final


def test_kill_9_of_an_atomic_writer_never_leaves_a_torn_file_in_a_snapshot(
    spawn: Callable[..., Running], tmp_path: Path, ckpt_dir: Path, remote: Path
) -> None:
    """Injected: KILLS x kill -9 of a child writing large files as temp +
    fsync + rename (about half of them while a write is under way). Asserted:
    every file of every snapshot is whole, no temp name is in any snapshot,
    the newest snapshot (and `ckpt restore`) is the final version."""
    seed = SEED
    _ckpt, placed, log = _run_with_kills(spawn, tmp_path, ckpt_dir, remote, "atomic", seed)
    where = repro(SEED, mode="atomic", kills=placed)

    files = _snapshot_files(remote)
    assert files, f"no snapshot at all{where}"
    for snap, path, data in files:
        assert path in SIZES, f"snapshot {snap} holds {path}: a temp name?{where}"
        try:
            name, _v = verify_whole(data)
        except ValueError as exc:
            raise AssertionError(f"snapshot {snap}: {path} is torn: {exc}{where}") from None
        assert name == path, f"snapshot {snap}: {path} holds {name}'s content{where}"

    final = _final_versions(log)
    out = tmp_path / "restored"
    restore_into(remote, out, cwd=tmp_path)
    assert read_tree(out) == {
        name: content(str(seed), name, v, SIZES[name]) for name, v in final.items()
    }, f"the newest snapshot is not the final version {final}{where}"
    for kind in sorted(set(placed)):
        record(f"child kill -9 {kind} (atomic writer)", placed.count(kind))


def test_kill_9_of_an_in_place_writer_gives_only_contents_that_were_on_disk(
    spawn: Callable[..., Running], tmp_path: Path, ckpt_dir: Path, remote: Path
) -> None:
    """Injected: KILLS x kill -9 of a child rewriting large files in place
    (truncate, then pieces with small sleeps; about half of the kills while a
    write is under way). Asserted (level 3, see the module docstring): every
    file of every snapshot is empty or a prefix of one single version; the
    newest snapshot (and `ckpt restore`) is the final version."""
    seed = SEED + 1
    _ckpt, placed, log = _run_with_kills(spawn, tmp_path, ckpt_dir, remote, "inplace", seed)
    where = repro(SEED, mode="inplace", kills=placed)

    files = _snapshot_files(remote)
    assert files, f"no snapshot at all{where}"
    for snap, path, data in files:
        assert path in SIZES, f"snapshot {snap} holds {path}{where}"
        if not data:
            continue  # the moment right after the truncation
        assert len(data) >= 4096, f"snapshot {snap}: {path} is {describe(data)}{where}"
        head = parse_header(data)
        assert head is not None, f"snapshot {snap}: {path} is {describe(data)}{where}"
        name, version, _size, _digest = head
        assert name == path, f"snapshot {snap}: {path} holds {name}'s content{where}"
        expected = content(str(seed), name, version, SIZES[name])
        assert data == expected[: len(data)], (
            f"snapshot {snap}: {path} is no content it ever had on disk: {describe(data)}{where}"
        )

    final = _final_versions(log)
    out = tmp_path / "restored"
    restore_into(remote, out, cwd=tmp_path)
    got = read_tree(out)
    assert got == {name: content(str(seed), name, v, SIZES[name]) for name, v in final.items()}, (
        f"the newest snapshot is not the final version {final}: "
        f"{ {k: describe(v) for k, v in got.items()} }{where}"
    )
    for kind in sorted(set(placed)):
        record(f"child kill -9 {kind} (in-place writer)", placed.count(kind))


def test_kill_9_of_an_in_place_writer_of_a_recognised_format_gives_whole_versions(
    spawn: Callable[..., Running], tmp_path: Path, ckpt_dir: Path, remote: Path
) -> None:
    """Injected: KILLS x kill -9 of a child rewriting .npy files in place
    (truncate, then pieces with small sleeps; about half of the kills while a
    write is under way, leaving a torn file closed). Asserted (level 3 with
    checks): every file of every snapshot is one whole version, every
    snapshot is verified; the newest snapshot (and `ckpt restore`) is the
    final version."""
    seed = SEED + 2
    _ckpt, placed, log = _run_with_kills(spawn, tmp_path, ckpt_dir, remote, "npy", seed, NPY_SIZES)
    where = repro(SEED, mode="npy", kills=placed)

    files = _snapshot_files(remote)
    assert files, f"no snapshot at all{where}"
    for snap, path, data in files:
        assert path in NPY_SIZES, f"snapshot {snap} holds {path}{where}"
        body = data[NPY_HEAD:]
        assert data[:NPY_HEAD] == npy_head(NPY_SIZES[path]), (
            f"snapshot {snap}: {path} is torn: {len(data)} bytes{where}"
        )
        try:
            name, _v = verify_whole(body)
        except ValueError as exc:
            raise AssertionError(f"snapshot {snap}: {path} is torn: {exc}{where}") from None
        assert name == path, f"snapshot {snap}: {path} holds {name}'s content{where}"
    for m in manifests(remote):
        assert m.get("verified") is True, f"snapshot {m['id']}: {m.get('unverified')}{where}"

    final = _final_versions(log)
    out = tmp_path / "restored"
    restore_into(remote, out, cwd=tmp_path)
    got = read_tree(out)
    assert got == {
        name: npy_head(NPY_SIZES[name]) + content(str(seed), name, v, NPY_SIZES[name])
        for name, v in final.items()
    }, f"the newest snapshot is not the final version {final}{where}"
    for kind in sorted(set(placed)):
        record(f"child kill -9 {kind} (in-place writer, recognised format)", placed.count(kind))
