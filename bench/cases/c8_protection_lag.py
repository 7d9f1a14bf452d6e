"""Case 8: protection lag. How long after a checkpoint lands (renamed into
place) ckpt has made it durable, beyond the debounce it was asked to wait,
against cp of the same file on the same disk. Also the latency of an explicit
commit (ckpt.checkpoint().commit(wait=True)) under --snapshots commit."""

import json
from pathlib import Path

from _common import (
    WAIT_FOR_SNAPSHOT,
    Bench,
    Case,
    MiB,
    Proc,
    Table,
    first_snapshot_after,
    median,
    min_of,
    rmtree,
    sync,
    timing_table,
    warm,
)

NUMBER = 8
TITLE = "Protection lag"

LIMIT = 2.0

#: Writes the checkpoint to a temp name (ignored by ckpt), flushes it to disk
#: (as the bench's `sync` does before the cp baseline), renames it into place
#: and records the time; then waits for ckpt's snapshot event and exits.
LAG_CHILD = (
    r"""
import json, os, shutil, sys, time
src, side, events, settle = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
d = os.environ["CKPT_DIR"]
time.sleep(settle)
tmp = os.path.join(d, "model.pt.tmp")
shutil.copyfile(src, tmp)
os.sync()
os.replace(tmp, os.path.join(d, "model.pt"))
renamed = time.time()
with open(side, "w") as f:
    f.write(repr(renamed))
t, n = renamed, 1
"""
    + WAIT_FOR_SNAPSHOT
)

#: commit(wait=True) after each of n new checkpoints (the step number stamped
#: every 4 KiB: new content each time), under --snapshots commit.
COMMIT_CHILD = r"""
import json, os, sys, time
import ckpt
src, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cp = ckpt.checkpoint()
with open(src, "rb") as f:
    buf = bytearray(f.read())
times = []
for i in range(1, n + 1):
    stamp = i.to_bytes(8, "little")
    for off in range(0, len(buf), 4096):
        buf[off : off + 8] = stamp
    tmp = cp.path / "model.pt.tmp"
    with open(tmp, "wb") as f:
        f.write(buf)
    os.sync()
    os.replace(tmp, cp.path / "model.pt")
    t0 = time.perf_counter()
    cp.commit(wait=True)
    times.append(time.perf_counter() - t0)
with open(out, "w") as f:
    json.dump(times, f)
"""


def run(b: Bench) -> Case:
    a = b.args
    case = Case(NUMBER, TITLE)
    out = b.dir("c8")
    size = a.lag_mib * MiB
    src = b.pool.file(size, 0)
    lag_child, commit_child = out / "lag_child.py", out / "commit_child.py"
    lag_child.write_text(LAG_CHILD)
    commit_child.write_text(COMMIT_CHILD)
    d, remote, events, side = out / "dir", out / "remote", out / "events.jsonl", out / "renamed"
    debounce = a.debounce
    warm(src)

    series: dict[str, list[Proc]] = {"ckpt run (whole process)": [], "cp": []}
    lags, rows = [], []
    flags = ["--debounce", f"{debounce:g}", "--log-json", events]
    command = [b.python, lag_child, src, side, events, "0.5"]
    # One untimed round of both first (see case 1).
    for argv in (b.ckpt_run(d, remote, *flags, command=command), ["cp", src, out / "copy"]):
        for p in (d, remote, events, side, out / "copy"):
            rmtree(p)
        sync()
        b.run(argv)
    for r in range(a.runs):
        order = ["ckpt", "cp"] if r % 2 == 0 else ["cp", "ckpt"]
        for name in order:
            for p in (d, remote, events, side, out / "copy"):
                rmtree(p)
            sync()
            if name == "cp":
                series["cp"].append(b.run(["cp", src, out / "copy"]))
                continue
            argv = b.ckpt_run(d, remote, *flags, command=command)
            series["ckpt run (whole process)"].append(b.run(argv))
            renamed = float(side.read_text())
            snap = first_snapshot_after(events, renamed)
            lag = snap["ts"] - renamed - debounce
            lags.append(lag)
            rows.append(
                [
                    str(r + 1),
                    f"{lag:.3f}",
                    f"{snap['seconds']:.3f}",
                    f"{lag - snap['seconds']:.3f}",
                    f"{snap['new_bytes'] / MiB:.0f}",
                ]
            )
        print(f"    run {r + 1}/{a.runs} done", flush=True)

    commits = _commit_latency(b, out, commit_child, src, a.runs)
    cp = min_of(series["cp"])
    case.conditions = (
        "No fsync on either side. The checkpoint is clean in the page cache when it is "
        "renamed into place (the child flushed it), as the cp source is; `sync` before each "
        "run."
    )
    case.method = [
        f"The child (under `ckpt run --debounce {debounce:g} --log-json EVENTS`) copies a "
        f"{size / MiB:.0f} MiB file of random bytes to a temp name in --dir, flushes it "
        "(`os.sync()`, so ckpt reads it from a clean page cache as cp does), renames it into "
        "place and writes time.time() of the rename to a side file outside --dir; it exits "
        "once the snapshot event is in the log. Lag = `ts` of the `snapshot` event (written "
        "once the manifest is written: the snapshot is durable; epoch seconds to the "
        "millisecond) - the rename time - the debounce. Baseline: `cp SRC DST` of a "
        "same-sized file to the same disk, warm cache, `sync` before. One untimed round of "
        "both comes first (see case 1). Each run uses a fresh "
        "--dir and remote (a local directory). No fsync on either side.",
        f"Commit latency (information, no target): a child under `ckpt run --snapshots "
        f"commit` writes a new {size / MiB:.0f} MiB checkpoint (temp + rename, after "
        "`os.sync()`) and times `ckpt.checkpoint().commit(wait=True)`, which returns once the "
        f"snapshot is durable; {len(commits)} commits in one run.",
    ]
    case.tables = [
        Table(
            ["run", "lag s", "snapshot took s", "detection + queue s", "MiB uploaded"],
            rows,
            f"Lag beyond the {debounce:g} s debounce (snapshot `seconds` from the event)",
        ),
        timing_table(
            series,
            size=size,
            title="Wall time of each whole process (ckpt run: start, restore, the child's "
            "copy and sync, the lag, the final flush; peak RSS: its largest process)",
        ),
        Table(
            ["measure", "min s", "median s", "runs (s)", "min over cp's min"],
            [
                [
                    "lag beyond the debounce",
                    f"{min(lags):.3f}",
                    f"{median(lags):.3f}",
                    _each(lags),
                    f"{min(lags) / cp:.2f}",
                ],
                [
                    "commit(wait=True)",
                    f"{min(commits):.3f}",
                    f"{median(commits):.3f}",
                    _each(commits),
                    f"{min(commits) / cp:.2f}",
                ],
                [
                    "cp",
                    f"{cp:.3f}",
                    f"{median(p.seconds for p in series['cp']):.3f}",
                    _each([p.seconds for p in series["cp"]]),
                    "1.00",
                ],
            ],
        ),
    ]
    case.target(
        f"protection lag beyond the debounce / cp, {size / MiB:.0f} MiB",
        min(lags) / cp,
        "<=",
        LIMIT,
        "x",
        "ratio of minimums: shortest (snapshot event ts - rename time - debounce) over fastest cp",
    )
    return case


def _each(values: list[float]) -> str:
    return ", ".join(f"{v:.3f}" for v in values)


def _commit_latency(b: Bench, out: Path, child: Path, src: Path, n: int) -> list[float]:
    d, remote, times = out / "dir", out / "remote", out / "commits.json"
    for p in (d, remote, times):
        rmtree(p)
    sync()
    command = [b.python, child, src, str(n), times]
    argv = b.ckpt_run(d, remote, "--snapshots", "commit", command=command)
    b.run(argv)
    result = json.loads(times.read_text())
    rmtree(d)
    rmtree(remote)
    return result
