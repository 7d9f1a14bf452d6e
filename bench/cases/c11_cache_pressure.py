"""Case 11: push and restore of 1 GiB from and to a local path right after
other large writes (the page cache full of unrelated dirty data, as on a
training box that just wrote a checkpoint), against cp -r of the same data
under the same pressure; with where the kernel time goes (system time of each
of ckpt's threads, where they wait, /proc/vmstat counters)."""

import collections
import os
import threading
import time
from pathlib import Path

from _common import (
    MIN,
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
    warm,
)

NUMBER = 11
TITLE = "Push and restore under page-cache pressure"

LIMIT = 1.3
TICK = os.sysconf("SC_CLK_TCK")
#: /proc/vmstat counters compared before and after each timed run.
VMSTAT = (
    "nr_dirtied",
    "nr_written",
    "pgscan_kswapd",
    "pgscan_direct",
    "pgsteal_kswapd",
    "pgsteal_direct",
    "allocstall_normal",
    "allocstall_movable",
    "workingset_refault_file",
)
#: Sampled (not deltas): pages dirty and under writeback at the end of a run.
GAUGES = ("nr_dirty", "nr_writeback", "nr_dirty_threshold")


def vmstat() -> dict[str, int]:
    out = {}
    with open("/proc/vmstat") as f:
        for line in f:
            key, _, value = line.partition(" ")
            out[key] = int(value)
    return out


class ThreadWatch:
    """Polls /proc/PID/task/*/ while a process runs: the last utime/stime of
    every thread (threads that end before the process keep their last
    reading) and the wchan of each thread that sleeps, counted per sample."""

    def __init__(self, every: float = 0.02) -> None:
        self.every = every
        self.times: dict[int, tuple[str, int, int]] = {}
        self.waits: collections.Counter[str] = collections.Counter()
        self.samples = 0
        self.pid = 0
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, pid: int) -> None:
        self.pid = pid
        self._thread = threading.Thread(target=self._poll, args=(pid,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()

    def _poll(self, pid: int) -> None:
        base = f"/proc/{pid}/task"
        while not self._done.is_set():
            try:
                tids = os.listdir(base)
            except OSError:
                return
            self.samples += 1
            for tid in tids:
                try:
                    with open(f"{base}/{tid}/stat") as f:
                        stat = f.read()
                    with open(f"{base}/{tid}/wchan") as f:
                        wchan = f.read().strip()
                except OSError:
                    continue
                comm = stat[stat.index("(") + 1 : stat.rindex(")")]
                fields = stat.rsplit(")", 1)[1].split()
                state, utime, stime = fields[0], int(fields[11]), int(fields[12])
                self.times[int(tid)] = (comm, utime, stime)
                if state == "D" or (wchan not in ("", "0") and state != "R"):
                    self.waits[f"{state} {wchan}"] += 1
            self._done.wait(self.every)

    def by_role(self) -> dict[str, tuple[int, float, float, float]]:
        """The main thread and the other threads (Python names no OS thread) ->
        (threads, user s, system s, largest system s of one thread)."""
        out: dict[str, list[float]] = {}
        for tid, (_comm, utime, stime) in self.times.items():
            role = "main thread" if tid == self.pid else "other threads"
            row = out.setdefault(role, [0, 0.0, 0.0, 0.0])
            row[0] += 1
            row[1] += utime / TICK
            row[2] += stime / TICK
            row[3] = max(row[3], stime / TICK)
        return {k: (int(v[0]), v[1], v[2], v[3]) for k, v in out.items()}


def fill(where: Path, total_mib: int) -> float:
    """Write total_mib MiB of unrelated data under where (no sync): the page
    cache fills with dirty pages as after a big write of the user's. Seconds."""
    t0 = time.perf_counter()
    rmtree(where)
    where.mkdir(parents=True)
    block = os.urandom(16 * MiB)
    per_file = 256
    left, i = total_mib, 0
    while left > 0:
        n = min(per_file, left)
        with open(where / f"fill-{i:03d}.bin", "wb") as f:
            for _ in range(n // 16):
                f.write(block)
        left -= n
        i += 1
    return time.perf_counter() - t0


def run(b: Bench) -> Case:
    a = b.args
    case = Case(NUMBER, TITLE)
    out = b.dir("c11")
    src = b.pool.dataset(out / "src", a.pressure_src_mib * MiB, 10)
    size = a.pressure_src_mib * MiB // 10 * 10
    repo, dst, filler = out / "repo", out / "dst", out / "fill"
    warm(src)
    b.run([b.ckpt, "push", "-q", src, repo])  # what the restores restore
    warm(repo)
    tools = {
        "ckpt push": lambda: [b.ckpt, "push", "-q", src, dst],
        "ckpt restore": lambda: [b.ckpt, "restore", "-q", repo, dst],
        "cp -r": lambda: ["cp", "-r", src, dst],
    }
    quiet: dict[str, list[Proc]] = {name: [] for name in tools}
    loaded: dict[str, list[Proc]] = {name: [] for name in tools}
    threads: dict[str, list[ThreadWatch]] = {name: [] for name in tools}
    deltas: dict[str, list[dict[str, int]]] = {name: [] for name in tools}
    fills: list[float] = []
    for r in range(a.runs):
        for name in rotate(list(tools), r):
            # Quiet: the page cache has room and nothing is dirty.
            rmtree(dst)
            rmtree(filler)
            sync()
            quiet[name].append(b.run(tools[name]()))
            rmtree(dst)
            # Under pressure: the same right after writing other data.
            rmtree(filler)
            sync()
            fills.append(fill(filler, a.pressure_mib))
            watch = ThreadWatch()
            before = vmstat()
            loaded[name].append(b.run(tools[name](), started=watch.start))
            after = vmstat()
            watch.stop()
            threads[name].append(watch)
            delta = {k: after.get(k, 0) - before.get(k, 0) for k in VMSTAT}
            delta.update({k: after.get(k, 0) for k in GAUGES})
            deltas[name].append(delta)
            rmtree(dst)
        print(f"    run {r + 1}/{a.runs} done", flush=True)
    rmtree(filler)

    case.conditions = (
        "No fsync. The sources (the data set, the repository) are in the page cache; under "
        f"pressure, {a.pressure_mib} MiB of other data were written just before the timed "
        "run and are still dirty or under writeback while it runs; `sync` before each fill "
        "and before each quiet run."
    )
    case.method = [
        f"{size / MiB:.0f} MiB in 10 files of random bytes. Each round, for each tool in "
        "turn: a quiet run (`sync`, then the tool), then a run under pressure: `sync`, "
        f"{a.pressure_mib} MiB of unrelated data written to other files by the bench process "
        "(16 MiB writes, no sync: the kernel's dirty thresholds are "
        f"{_threshold_text()}), and at once the tool. Tools: `ckpt push SRC NEWREPO` "
        "(a first snapshot into a fresh local repository), `ckpt restore REPO DST` into a "
        "new directory, `cp -r SRC DST`. During each run under pressure the bench polls "
        "/proc/PID/task/*/stat and wchan every 20 ms (system and user time of each thread, "
        "the kernel function each sleeping thread waits in) and reads /proc/vmstat before "
        "and after.",
    ]
    case.tables = [
        timing_table(loaded, size=size, cpu=True, title="Under pressure: wall time"),
        timing_table(quiet, size=size, cpu=True, title="Quiet page cache (information)"),
        ratio_table(
            {"ckpt push": loaded["ckpt push"], "cp -r": loaded["cp -r"]},
            "ckpt push",
            "Under pressure: push",
        ),
        ratio_table(
            {"ckpt restore": loaded["ckpt restore"], "cp -r": loaded["cp -r"]},
            "ckpt restore",
            "Under pressure: restore",
        ),
        _threads_table(threads),
        _waits_table(threads),
        Table(
            ["tool", *VMSTAT, *GAUGES],
            [
                [name, *[str(median(d[k] for d in deltas[name])) for k in (*VMSTAT, *GAUGES)]]
                for name in tools
            ],
            "/proc/vmstat during the runs under pressure (medians; the first counters are "
            "deltas over the run, the last three the values at its end; pages of 4 KiB)",
        ),
    ]
    case.notes.append(
        f"Filling took {min(fills):.2f}-{max(fills):.2f} s per run "
        f"({a.pressure_mib / median(fills):.0f} MiB/s median)."
    )
    for ours in ("ckpt push", "ckpt restore"):
        case.target(
            f"{ours} / cp -r under page-cache pressure, {size / MiB:.0f} MiB",
            judged(loaded[ours], loaded["cp -r"], MIN),
            "<=",
            LIMIT,
            "x",
            how(MIN, ours, "cp -r") + " (both right after the same fill)",
        )
    return case


def _threshold_text() -> str:
    v = vmstat()
    return (
        f"{v.get('nr_dirty_background_threshold', 0) * 4096 / MiB:.0f} MiB to start "
        f"writeback, {v.get('nr_dirty_threshold', 0) * 4096 / MiB:.0f} MiB to throttle writers"
    )


def _threads_table(threads: dict[str, list[ThreadWatch]]) -> Table:
    rows = []
    for name, watches in threads.items():
        roles: dict[str, list[tuple[int, float, float, float]]] = {}
        for w in watches:
            for role, row in w.by_role().items():
                roles.setdefault(role, []).append(row)
        for role, values in sorted(roles.items()):
            rows.append(
                [
                    name,
                    role,
                    str(max(v[0] for v in values)),
                    f"{median(v[1] for v in values):.2f}",
                    f"{median(v[2] for v in values):.2f}",
                    f"{median(v[3] for v in values):.2f}",
                ]
            )
    return Table(
        [
            "tool",
            "threads",
            "count",
            "user s (median run)",
            "system s (median run)",
            "system s of the busiest one",
        ],
        rows,
        "Under pressure: CPU of the threads (/proc/PID/task/*/stat, polled every 20 ms)",
    )


def _waits_table(threads: dict[str, list[ThreadWatch]]) -> Table:
    rows = []
    for name, watches in threads.items():
        total: collections.Counter[str] = collections.Counter()
        samples = 0
        for w in watches:
            total.update(w.waits)
            samples += w.samples
        top = ", ".join(f"{k} {v}" for k, v in total.most_common(6))
        rows.append([name, str(samples), top])
    return Table(
        ["tool", "samples", "thread-samples asleep, by state and kernel function (wchan)"],
        rows,
        "Under pressure: where the threads wait",
    )
