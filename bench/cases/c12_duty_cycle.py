"""Case 12: `ckpt run` on a training run at a realistic duty cycle (a 500 MiB
checkpoint per 60 s of compute): wall time under ckpt run against the bare
child, and the child's own compute and save times step by step."""

import json
from pathlib import Path

from _common import (
    PAIRED,
    Bench,
    Case,
    MiB,
    Proc,
    Table,
    how,
    judged,
    median,
    ratio_table,
    rmtree,
    rotate,
    sync,
    timing_table,
)

from cases.c6_overhead import CHILD, calibrated_work

NUMBER = 12
TITLE = "Overhead at a realistic duty cycle"

LIMIT = 1.02


def run(b: Bench) -> Case:
    a = b.args
    case = Case(NUMBER, TITLE)
    out = b.dir("c12")
    size = a.duty_mib * MiB
    src = b.pool.file(size, 1)
    child = out / "child.py"
    child.write_text(CHILD)
    work = calibrated_work(b, a.duty_seconds)
    d, remote, times = out / "dir", out / "remote", out / "times.json"
    bare = [b.python, child, src, str(a.duty_steps), str(work), d, "-", times]
    supervised = b.ckpt_run(d, remote, command=bare)

    names = ["bare child", "ckpt run -- child"]
    series: dict[str, list[Proc]] = {name: [] for name in names}
    steps: dict[str, list[list[float]]] = {name: [] for name in names}
    for r in range(a.duty_runs):
        for name in rotate(names, r):
            for p in (d, remote, times):
                rmtree(p)
            d.mkdir()
            sync()
            series[name].append(b.run(bare if name == "bare child" else supervised))
            steps[name] += _times(times)
        print(f"    run {r + 1}/{a.duty_runs} done", flush=True)

    compute = {name: median(t[0] for t in steps[name]) for name in names}
    save = {name: median(t[1] for t in steps[name]) for name in names}
    case.conditions = (
        "No fsync on either side; checkpoints and ckpt's chunks go to the page cache and are "
        "written back during the run; `sync` before each run."
    )
    case.method = [
        f"The child of case 6 (single-threaded pure-Python compute, then a checkpoint of "
        f"{size / MiB:.0f} MiB of new random content written to a temp name and renamed) at a "
        f"realistic duty cycle: {a.duty_seconds:g} s of compute per checkpoint "
        f"({work} iterations, calibrated on this machine), {a.duty_steps} steps. Bare: "
        "`python child.py` into DIR; supervised: `ckpt run --dir DIR --remote REMOTE "
        "--retries 0 --preemption off -- python child.py` (REMOTE a local directory), timed "
        "until ckpt has exited (its start-up and final flush included). The two alternate, "
        f"{a.duty_runs} round(s); `sync` before each run; no fsync. The child also times "
        "each step's compute and save itself (perf_counter), so a slowdown of the training "
        "loop shows apart from ckpt's start and final flush.",
    ]
    case.tables = [
        timing_table(series, cpu=True, title="Wall time of the whole run"),
        ratio_table(series, "ckpt run -- child"),
        Table(
            ["run", "median compute s per step", "median save s per step", "steps"],
            [
                [name, f"{compute[name]:.3f}", f"{save[name]:.3f}", str(len(steps[name]))]
                for name in names
            ],
            "The child's own times (every step of every run)",
        ),
    ]
    case.notes.append(
        "Compute per step under ckpt over bare: "
        f"{compute['ckpt run -- child'] / compute['bare child']:.4f}; save per step: "
        f"{save['ckpt run -- child'] / save['bare child']:.3f}."
    )
    case.target(
        f"ckpt run -- child / bare child, {size / MiB:.0f} MiB per {a.duty_seconds:g} s",
        judged(series["ckpt run -- child"], series["bare child"], PAIRED),
        "<=",
        LIMIT,
        "x",
        how(PAIRED, "ckpt run -- child", "bare child"),
    )
    return case


def _times(path: Path) -> list[list[float]]:
    return json.loads(path.read_text())
