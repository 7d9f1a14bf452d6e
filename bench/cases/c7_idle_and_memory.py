"""Case 7: the supervisor's CPU while the child runs and nothing is to be
uploaded, and the peak RSS of `ckpt push` at two data sizes."""

import json
import os
import threading
import time
from pathlib import Path

from _common import Bench, Case, MiB, Table, mib, rmtree, sync, warm

NUMBER = 7
TITLE = "Idle supervisor CPU, memory against data size"

CPU_LIMIT = 1.0  # % of one core
RSS_LIMIT = 200  # MiB
RSS_SPREAD = 0.10
TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, utime + stime in clock ticks) of a live process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return int(fields[1]), int(fields[11]) + int(fields[12])


def _tree_ticks(root: int) -> tuple[int, int]:
    """(ticks of root itself, ticks of root and every live process below it)."""
    procs = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                procs[int(name)] = st
    below = {root}
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _) in procs.items():
            if ppid in below and pid not in below:
                below.add(pid)
                grew = True
    own = procs.get(root, (0, 0))[1]
    return own, sum(procs[p][1] for p in below if p in procs)


def run(b: Bench) -> Case:
    a = b.args
    case = Case(NUMBER, TITLE)
    out = b.dir("c7")
    cpu_rows, cpu = _idle_cpu(b, case, out)
    rss_rows, rss = _push_rss(b, out)
    case.tables = [
        Table(
            ["processes", "CPU seconds", "window s", "% of one core"],
            cpu_rows,
            "Supervisor CPU while the child sleeps",
        ),
        Table(["data set", "files", "ckpt push peak RSS MiB", "wall s"], rss_rows, "Peak RSS"),
    ]
    case.target(
        "idle supervisor CPU (ckpt run and everything below it)",
        cpu,
        "<",
        CPU_LIMIT,
        "%",
        f"(utime + stime) over {a.idle_seconds:g} s after a {a.idle_settle:g} s settle, "
        "% of one core",
    )
    small, big = rss[min(rss)], rss[max(rss)]
    case.target(
        f"ckpt push peak RSS, {min(rss) / MiB:.0f} and {max(rss) / MiB:.0f} MiB sets",
        max(small, big) / MiB,
        "<",
        RSS_LIMIT,
        "MiB",
        "largest ru_maxrss of the two pushes",
    )
    case.target(
        "ckpt push peak RSS: growth from the small to the big set",
        abs(big - small) / small * 100,
        "<=",
        RSS_SPREAD * 100,
        "%",
        "|RSS(big) - RSS(small)| / RSS(small)",
    )
    return case


def _idle_cpu(b: Bench, case: Case, out: Path) -> tuple[list[list[str]], float]:
    a = b.args
    d, events = out / "dir", out / "events.jsonl"
    d.mkdir()
    for i in range(100):
        (d / f"state-{i:03d}.bin").write_bytes(os.urandom(64 * 1024))
    length = a.idle_settle + a.idle_seconds + 3
    command = ["sleep", f"{length:g}"]
    argv = b.ckpt_run(d, out / "remote", "--log-json", events, command=command)
    window: dict[str, float] = {}

    def sample(pid: int) -> None:
        time.sleep(a.idle_settle)
        window["t0"], window["wall0"] = time.monotonic(), time.time()
        own0, tree0 = _tree_ticks(pid)
        time.sleep(a.idle_seconds)
        own1, tree1 = _tree_ticks(pid)
        window["t1"], window["wall1"] = time.monotonic(), time.time()
        window["own"], window["tree"] = (own1 - own0) / TICK, (tree1 - tree0) / TICK

    sampler: list[threading.Thread] = []

    def started(pid: int) -> None:
        t = threading.Thread(target=sample, args=(pid,), daemon=True)
        t.start()
        sampler.append(t)

    sync()
    proc = b.run(argv, started=started, hwm=True)
    sampler[0].join()
    span = window["t1"] - window["t0"]
    with open(events) as f:
        log = [json.loads(line) for line in f if line.strip()]
    snaps = [e for e in log if e["event"] == "snapshot"]
    inside = [e for e in snaps if window["wall0"] <= e["ts"] <= window["wall1"]]
    case.conditions = (
        "No fsync. The data sets are in the page cache (read once before each push); `sync` "
        "before each push and before the idle run."
    )
    case.method = [
        "CPU: `ckpt run --dir DIR --remote REMOTE --retries 0 --preemption off -- sleep "
        f"{length:g}` on a DIR of 100 files of 64 KiB (snapshotted once at the start). After "
        f"a {a.idle_settle:g} s settle, utime + stime of the ckpt process (all its threads) "
        "and of every process below it (the guardian, the sleeping child) are read from "
        f"/proc/PID/stat, and again {a.idle_seconds:g} s later; the difference over the "
        f"window is the CPU share ({TICK} ticks per second). Snapshots in the whole run: "
        f"{len(snaps)}, inside the window: {len(inside)}. The supervisor's own peak RSS "
        f"(VmHWM, polled) in this run: {mib(proc.hwm or 0)} MiB.",
        "Memory: `ckpt push SRC REPO` (a first snapshot into a fresh repository, warm page "
        "cache, `sync` before) of two data sets with files of the big set's size; the peak "
        "RSS is ru_maxrss from wait4. Case 1's push of the big set is listed too when "
        "case 1 ran.",
    ]
    rows = [
        [who, f"{cpu:.2f}", f"{span:.1f}", f"{cpu / span * 100:.2f}"]
        for who, cpu in (
            ("ckpt (all threads)", window["own"]),
            ("ckpt and every process below it", window["tree"]),
        )
    ]
    return rows, window["tree"] / span * 100


def _push_rss(b: Bench, out: Path) -> tuple[list[list[str]], dict[int, int]]:
    a = b.args
    per = a.size_mib * MiB // a.files
    rss: dict[int, int] = {}
    rows = []
    for total in a.rss_mib:
        files = max(1, round(total * MiB / per))
        src = b.pool.dataset(out / f"set-{total}", files * per, files)
        warm(src)
        repo = out / "repo"
        rmtree(repo)
        sync()
        proc = b.run([b.ckpt, "push", "-q", src, repo])
        rss[files * per] = proc.rss
        rows.append(
            [f"{files * per / MiB:.0f} MiB", str(files), mib(proc.rss), f"{proc.seconds:.2f}"]
        )
        rmtree(repo)
        rmtree(src)
    for size, peak in sorted(b.shared.get("push_rss", {}).items()):
        rows.append([f"{size / MiB:.0f} MiB (case 1)", str(a.files), mib(peak), ""])
    return rows, rss
