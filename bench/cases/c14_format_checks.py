"""Case 14: what the format checks cost (issue 16's benchmark target). The
first automatic snapshot of --checks-mib of torch.save-style zip files under
`ckpt run`, with the built-in format checks (the default) and with
--no-format-checks, runs alternating; the checks must cost < 2 % of it."""

import json
import zipfile
from pathlib import Path
from typing import IO, BinaryIO

from _common import (
    BLOCK,
    WAIT_FOR_SNAPSHOT,
    Bench,
    Case,
    MiB,
    Proc,
    Table,
    first_snapshot_after,
    median,
    rmtree,
    rotate,
    sync,
    warm,
)

NUMBER = 14
TITLE = "Cost of the format checks"

LIMIT = 1.02

#: Hard-links every file of the data set into --dir (each appears whole, at
#: once: an atomic save that costs the child no writing), records the time,
#: then waits for the first snapshot event after it that holds them all.
CHILD = (
    r"""
import json, os, sys, time
src, n, side, events = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
d = os.environ["CKPT_DIR"]
for name in sorted(os.listdir(src)):
    os.link(os.path.join(src, name), os.path.join(d, name))
t = time.time()
with open(side, "w") as f:
    f.write(repr(t))
"""
    + WAIT_FOR_SNAPSHOT
)

#: Members of one file, the layout torch.save (zip format) writes: the
#: pickle, one member per storage (stored, not compressed), the version.
STORAGES = 8


def torch_like(path: Path, size: int, source: Path) -> None:
    """A zip file of about `size` bytes laid out like torch.save's, its
    storages cut in turn from `source` (random bytes, at least `size`)."""
    per = max(1, (size - 4096) // STORAGES)
    name = path.stem
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(f"{name}/data.pkl", b"\x80\x02}q\x00." + bytes(1000))
        z.writestr(f"{name}/byteorder", b"little")
        with open(source, "rb") as src:
            for i in range(STORAGES):
                with z.open(f"{name}/data/{i}", "w", force_zip64=True) as member:
                    _copy_cycling(src, member, per)
        z.writestr(f"{name}/version", b"3\n")
        z.writestr(f"{name}/.data/serialization_id", b"0" * 40)


def _copy_cycling(src: BinaryIO, dst: IO[bytes], n: int) -> None:
    """n bytes from src into dst, starting src over at its end."""
    while n:
        block = src.read(min(n, BLOCK))
        if not block:
            src.seek(0)
            continue
        dst.write(block)
        n -= len(block)


def run(b: Bench) -> Case:
    a = b.args
    case = Case(NUMBER, TITLE)
    out = b.dir("c14")
    files, total = a.checks_files, a.checks_mib * MiB
    per = total // files
    data = out / "data"
    data.mkdir()
    for i in range(files):
        # Each file's storages from random bytes of its own: no chunk of the
        # set repeats another, so every byte is read, hashed and written.
        torch_like(data / f"model-{i:02d}.pt", per, b.pool.file(per, i))
    size = sum(p.stat().st_size for p in data.iterdir())
    warm(data)
    child = out / "child.py"
    child.write_text(CHILD)
    d, remote, events, side = out / "dir", out / "remote", out / "events.jsonl", out / "landed"
    command = [b.python, child, data, str(files), side, events]
    kinds = {"checks on (default)": [], "--no-format-checks": []}

    def one(kind: str) -> tuple[Proc, dict, list[str]]:
        for p in (d, remote, events, side):
            rmtree(p)
        sync()
        flags: list[str] = ["--debounce", "0.2", "--log-json", str(events)]
        if kind == "--no-format-checks":
            flags.append("--no-format-checks")
        proc = b.run(b.ckpt_run(d, remote, *flags, command=command))
        landed = float(side.read_text())
        snap = first_snapshot_after(events, landed, files)
        return proc, snap, _checks_recorded(remote, snap["snapshot"])

    one("checks on (default)")  # untimed: both sides start from the same state
    procs: dict[str, list[Proc]] = {k: [] for k in kinds}
    took: dict[str, list[float]] = {k: [] for k in kinds}
    recorded: dict[str, set[str]] = {k: set() for k in kinds}
    unverified = 0
    for r in range(a.checks_runs):
        for kind in rotate(list(kinds), r):
            proc, snap, checks = one(kind)
            procs[kind].append(proc)
            took[kind].append(snap["seconds"])
            recorded[kind].update(checks)
            unverified += len(snap.get("unverified") or [])
        print(f"    run {r + 1}/{a.checks_runs} done", flush=True)

    on, off = took["checks on (default)"], took["--no-format-checks"]
    pairs = [x / y for x, y in zip(on, off, strict=True)]
    case.conditions = (
        "No fsync. The files are in the page cache (read once before the runs) and are "
        "hard-linked into --dir, so the child writes nothing; each run uses a fresh --dir "
        "and a fresh local remote, `sync` before each."
    )
    case.method = [
        f"{files} files of {per / MiB:.0f} MiB ({size / MiB:.0f} MiB in all) laid out as "
        f"torch.save writes its zip format ({STORAGES} stored storages, the pickle, "
        "byteorder, version; random bytes). Each run: `ckpt run --debounce 0.2 --log-json "
        "EVENTS [--no-format-checks]` of a child that hard-links every file into --dir at "
        "once and exits when a snapshot holding them all is in the log. Figure: that "
        "snapshot's own duration (`seconds` of its `snapshot` event: judging the changed "
        "files, reading, hashing and writing every chunk, the manifest), the first "
        "snapshot of the data set into an empty local remote. With the checks each file's "
        "zip end record and central directory are read and checked before the file is "
        "read; without them, not. The two kinds alternate, taking turns going first; one "
        "untimed run comes first.",
        "The checks recorded in the manifests of the runs with checks: "
        f"{', '.join(sorted(recorded['checks on (default)'])) or 'none'}; without: "
        f"{', '.join(sorted(recorded['--no-format-checks'])) or 'none'}. Files the "
        f"snapshots marked unverified (a check that failed on a whole file): {unverified}.",
    ]
    case.tables = [
        Table(
            ["kind", "min s", "median s", "runs (s)", "MiB/s (min)", "user s", "sys s"],
            [
                [
                    kind,
                    f"{min(took[kind]):.3f}",
                    f"{median(took[kind]):.3f}",
                    ", ".join(f"{x:.3f}" for x in took[kind]),
                    f"{size / MiB / min(took[kind]):.0f}",
                    f"{median(p.utime for p in procs[kind]):.2f}",
                    f"{median(p.stime for p in procs[kind]):.2f}",
                ]
                for kind in kinds
            ],
            "Duration of the first snapshot (`seconds` of its event); CPU of the whole "
            "`ckpt run` process tree (wait4), medians",
        ),
        Table(
            [
                "checks on / off",
                "ratio of minimums",
                "ratio of medians",
                "median paired ratio",
                "per-round ratios",
            ],
            [
                [
                    "snapshot duration",
                    f"{min(on) / min(off):.3f}",
                    f"{median(on) / median(off):.3f}",
                    f"{median(pairs):.3f}",
                    ", ".join(f"{x:.2f}" for x in pairs),
                ]
            ],
        ),
    ]
    case.target(
        f"first snapshot, format checks on / off, {size / MiB:.0f} MiB in {files} zip files",
        min(on) / min(off),
        "<=",
        LIMIT,
        "x",
        "ratio of minimums: shortest snapshot with the checks over shortest without",
    )
    if recorded["checks on (default)"] != {"zip"} or unverified:
        case.notes.append(
            "The checks did not pass every whole file as zip: a false positive, or the "
            "checks did not run; the figure above does not measure what it says."
        )
    rmtree(data)
    return case


def _checks_recorded(remote: Path, snapshot: str) -> list[str]:
    """The check each file of the snapshot passed, as its manifest records it."""
    for path in (remote / "snapshots").glob(f"*{snapshot}*.json"):
        doc = json.loads(path.read_text())
        return [e.get("check", "") for e in doc.get("entries", []) if e.get("type") == "file"]
    return []
