"""Case 6: what `ckpt run` costs a CPU-bound training run that writes a big
checkpoint every step: wall time under ckpt run against the bare child and
against the physical floor of keeping a second copy (the same child with a
background `cp` of each checkpoint into the remote dir)."""

import json
import os
import subprocess

from _common import (
    PAIRED,
    Bench,
    Case,
    MiB,
    Proc,
    Table,
    how,
    judged,
    mib,
    ratio_table,
    rmtree,
    rotate,
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
#: COPY_TO (or -) is the floor baseline: a background `cp` of each checkpoint
#: into that dir, all waited for at the end. TIMES (or -) gets a JSON list of
#: [compute seconds, save seconds] per step.
CHILD = r"""
import json, os, subprocess, sys, time
src, steps, work, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
copy_to, times_path = sys.argv[5], sys.argv[6]
with open(src, "rb") as f:
    buf = bytearray(f.read())
copies, times = [], []
for step in range(1, steps + 1):
    t0 = time.perf_counter()
    x = 0
    for _ in range(work):
        x = (x * 1103515245 + 12345) & 0xFFFFFFFF
    t1 = time.perf_counter()
    stamp = step.to_bytes(8, "little")
    for off in range(0, len(buf), 4096):
        buf[off : off + 8] = stamp
    tmp = os.path.join(out, "model.pt.tmp")
    with open(tmp, "wb") as f:
        f.write(buf)
    final = os.path.join(out, "model.pt")
    os.replace(tmp, final)
    times.append([t1 - t0, time.perf_counter() - t1])
    if copy_to != "-":
        copies.append(subprocess.Popen(["cp", final, os.path.join(copy_to, f"step-{step}.pt")]))
for c in copies:
    if c.wait() != 0:
        sys.exit("cp failed")
if times_path != "-":
    with open(times_path, "w") as f:
        json.dump(times, f)
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

#: ckpt run over the floor (the child plus a background cp per checkpoint).
LIMIT = 1.05


def calibrated_work(b: Bench, seconds: float) -> int:
    """The child's units of work that take about `seconds` on this machine."""
    rate = float(
        subprocess.run(
            [b.python, "-c", CALIBRATE], capture_output=True, text=True, check=True
        ).stdout
    )
    return int(rate * seconds)


def run(b: Bench) -> Case:
    a = b.args
    case = Case(NUMBER, TITLE)
    out = b.dir("c6")
    size = a.overhead_mib * MiB
    src = b.pool.file(size, 0)
    child = out / "child.py"
    child.write_text(CHILD)
    work = calibrated_work(b, a.step_seconds)
    d, remote, events = out / "dir", out / "remote", out / "events.jsonl"
    bare = [b.python, child, src, str(a.overhead_steps), str(work), d, "-", "-"]
    floor = [b.python, child, src, str(a.overhead_steps), str(work), d, remote, "-"]
    supervised = b.ckpt_run(d, remote, "--log-json", events, command=bare)

    names = ["bare child", "child + background cp (floor)", "ckpt run -- child"]
    series: dict[str, list[Proc]] = {name: [] for name in names}
    ends = []
    for r in range(a.overhead_runs):
        for name in rotate(names, r):
            rmtree(d)
            rmtree(remote)
            rmtree(events)
            d.mkdir()
            sync()
            if name == "bare child":
                series[name].append(b.run(bare))
            elif name.startswith("child + background cp"):
                remote.mkdir()
                series[name].append(b.run(floor))
            else:
                series[name].append(b.run(supervised, hwm=True))
                ends.append(_end_event(events))
        print(f"    run {r + 1}/{a.overhead_runs} done", flush=True)

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
        "checkpoints (and ckpt's chunks, and the floor's copies) go to the page cache and the "
        "kernel writes them back during the run, which is part of the time of every run; "
        "`sync` before each run."
    )
    case.method = [
        f"The child is single-threaded: a pure-Python loop of fixed work (calibrated to "
        f"about {a.step_seconds:g} s per step on this machine: {work} iterations), then a "
        f"{size / MiB:.0f} MiB checkpoint of random bytes (new content every step) written "
        "to a temp name and renamed (torch.save + os.replace), "
        f"{a.overhead_steps} steps. Bare: `python child.py` writing into DIR. Floor: the "
        "same child starting `cp DIR/model.pt REMOTE/step-N.pt` in the background after "
        "each checkpoint and waiting for every cp at the end: the physical cost of keeping a "
        "second copy of each checkpoint on the same disk, which no tool can go below. "
        "Supervised: `ckpt run --dir DIR --remote REMOTE --retries 0 --preemption off -- "
        "python child.py` (default debounce and keep; REMOTE a local directory on the same "
        "disk), timed until ckpt has exited, so its final flush is included. Same DIR path, "
        "emptied before every run, `sync` before every run; the three take turns going "
        "first. No fsync; the machine has 2 cores, so ckpt's (or cp's) reading, hashing and "
        "writing compete with the child's writes and the kernel's writeback.",
    ]
    case.tables = [
        timing_table(
            series,
            cpu=True,
            title="Wall time of the whole run (peak RSS: its largest process, the child)",
        ),
        ratio_table(
            {k: series[k] for k in ("ckpt run -- child", "child + background cp (floor)")},
            "ckpt run -- child",
            "ckpt against the floor",
        ),
        ratio_table(
            {k: series[k] for k in ("ckpt run -- child", "bare child")},
            "ckpt run -- child",
            "ckpt against the bare child (information)",
        ),
        ratio_table(
            {k: series[k] for k in ("child + background cp (floor)", "bare child")},
            "child + background cp (floor)",
            "The floor against the bare child: what a second copy costs at all",
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
    case.target(
        "ckpt run -- child / child + background cp (floor)",
        judged(series["ckpt run -- child"], series["child + background cp (floor)"], PAIRED),
        "<=",
        LIMIT,
        "x",
        how(PAIRED, "ckpt run -- child", "child + background cp"),
    )
    return case


def _end_event(path: os.PathLike[str]) -> dict:
    with open(path) as f:
        events = [json.loads(line) for line in f if line.strip()]
    return next((e for e in reversed(events) if e["event"] == "end"), {})
