"""Case 6: what `ckpt run` costs a CPU-bound training run that writes a big
checkpoint every step: wall time under ckpt run against the bare child."""

import json
import os
import subprocess

from _common import (
    Bench,
    Case,
    MiB,
    Proc,
    Table,
    median,
    mib,
    rmtree,
    seconds_of,
    sync,
    timing_table,
)

NUMBER = 6
TITLE = "Overhead on a training run"

#: A pure-Python loop of fixed work per step (one core), then a checkpoint
#: written to a temp name and renamed, as torch.save + os.replace does. The
#: checkpoint is a buffer of random bytes with the step number stamped every
#: 4 KiB, so every step's checkpoint is new content throughout (nothing
#: deduplicates) without paying os.urandom for it in every step.
CHILD = r"""
import os, sys
src, steps, work, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
with open(src, "rb") as f:
    buf = bytearray(f.read())
for step in range(1, steps + 1):
    x = 0
    for _ in range(work):
        x = (x * 1103515245 + 12345) & 0xFFFFFFFF
    stamp = step.to_bytes(8, "little")
    for off in range(0, len(buf), 4096):
        buf[off : off + 8] = stamp
    tmp = os.path.join(out, "model.pt.tmp")
    with open(tmp, "wb") as f:
        f.write(buf)
    os.replace(tmp, os.path.join(out, "model.pt"))
"""

#: Iterations of the child's loop per second, measured by the child's interpreter.
CALIBRATE = r"""
import time
n, x = 2_000_000, 0
t0 = time.perf_counter()
for _ in range(n):
    x = (x * 1103515245 + 12345) & 0xFFFFFFFF
print(n / (time.perf_counter() - t0))
"""

LIMIT = 1.03


def run(b: Bench) -> Case:
    a = b.args
    case = Case(NUMBER, TITLE)
    out = b.dir("c6")
    size = a.overhead_mib * MiB
    src = b.pool.file(size, 0)
    child = out / "child.py"
    child.write_text(CHILD)
    rate = float(
        subprocess.run(
            [b.python, "-c", CALIBRATE], capture_output=True, text=True, check=True
        ).stdout
    )
    work = int(rate * a.step_seconds)
    d, remote, events = out / "dir", out / "remote", out / "events.jsonl"
    bare = [b.python, child, src, str(a.overhead_steps), str(work), d]
    supervised = b.ckpt_run(d, remote, "--log-json", events, command=bare)

    series: dict[str, list[Proc]] = {"bare child": [], "ckpt run -- child": []}
    ends = []
    for r in range(a.runs):
        order = ["bare child", "ckpt run -- child"]
        if r % 2:
            order.reverse()
        for name in order:
            rmtree(d)
            rmtree(remote)
            rmtree(events)
            d.mkdir()
            sync()
            if name == "bare child":
                series[name].append(b.run(bare))
            else:
                series[name].append(b.run(supervised, hwm=True))
                ends.append(_end_event(events))
        print(f"    run {r + 1}/{a.runs} done", flush=True)

    rows = [
        [
            str(i + 1),
            str(e.get("snapshots")),
            mib(e.get("bytes_uploaded") or 0),
            mib(p.hwm or 0),
            str(e.get("status")),
        ]
        for i, (e, p) in enumerate(zip(ends, series["ckpt run -- child"], strict=True))
    ]
    case.conditions = (
        "No fsync on either side. The child's source buffer comes from the page cache; its "
        "checkpoints (and ckpt's chunks) go to the page cache and the kernel writes them back "
        "during the run, which is part of the time of both runs; `sync` before each run."
    )
    case.method = [
        f"The child is single-threaded: a pure-Python loop of fixed work (calibrated to "
        f"about {a.step_seconds:g} s per step on this machine: {work} iterations), then a "
        f"{size / MiB:.0f} MiB checkpoint of random bytes (new content every step) written "
        "to a temp name and renamed (torch.save + os.replace), "
        f"{a.overhead_steps} steps. Bare: `python child.py` writing into DIR. Supervised: "
        "`ckpt run --dir DIR --remote REMOTE --retries 0 --preemption off -- python "
        "child.py` (default debounce and keep; REMOTE a local directory on the same disk), "
        "timed until ckpt has exited, so its final flush is included. Same DIR path, "
        "emptied before every run, `sync` before every run; bare and supervised runs "
        "alternate (the first goes first in turn) so they share the machine's noise. No "
        "fsync on either side; the machine has 2 cores, so ckpt's hashing and writing "
        "compete with the child's writes and the kernel's writeback.",
    ]
    case.tables = [
        timing_table(
            series, title="Wall time of the whole run (peak RSS: its largest process, the child)"
        ),
        Table(
            [
                "supervised run",
                "snapshots",
                "MiB uploaded",
                "supervisor's own peak RSS MiB",
                "exit status",
            ],
            rows,
            "From the --log-json end event; RSS: VmHWM of the ckpt process, polled",
        ),
    ]
    pairs = [
        s.seconds / p.seconds
        for s, p in zip(series["ckpt run -- child"], series["bare child"], strict=True)
    ]
    case.notes.append(
        "Ratio of each supervised run to the bare run next to it: "
        + ", ".join(f"{x:.3f}" for x in pairs)
        + f" (median {median(pairs):.3f}; information, the target uses the ratio of medians)."
    )
    case.target(
        "ckpt run -- child / bare child",
        seconds_of(series["ckpt run -- child"]) / seconds_of(series["bare child"]),
        "<=",
        LIMIT,
        "x",
        "median wall time under ckpt run over median wall time of the bare child",
    )
    return case


def _end_event(path: os.PathLike[str]) -> dict:
    with open(path) as f:
        events = [json.loads(line) for line in f if line.strip()]
    return next((e for e in reversed(events) if e["event"] == "end"), {})
