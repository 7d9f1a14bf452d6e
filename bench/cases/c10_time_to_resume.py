"""Case 10: time to resume. A fresh machine: an empty --dir, the remote on an
S3 server holding a snapshot of 1 GiB; `ckpt run -- python -c pass` end to end
against `rclone copy` of the same files alone, and the split of ckpt's time
(from its --log-json events and bench/_phases.py's timestamps around the
calls of a run's start)."""

import json
import sys
from pathlib import Path
from typing import Any

from _common import (
    BENCH,
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
    same_tree,
    sync,
    timing_table,
    warm,
)

from cases.c5_object_store import _stores_module, _with_url, rclone_path, rclone_section

NUMBER = 10
TITLE = "Time to resume from S3"

LIMIT = 1.1


def run(b: Bench) -> Case:
    a = b.args
    case = Case(NUMBER, TITLE)
    out = b.dir("c10")
    stores = _stores_module()
    kind = a.resume_store
    src = b.pool.dataset(out / "src", a.resume_mib * MiB, a.resume_files)
    size = a.resume_mib * MiB // a.resume_files * a.resume_files
    warm(src)
    service = stores.start_service(kind, b.dir("c10", "server"))
    try:
        store = service.new_store()
        env = {**b.env, **store.env}
        conf = b.work / "rclone.conf"
        conf.write_text(rclone_section(store, "bench") or "")
        remote = f"bench:{rclone_path(store)}"
        rclone = [b.tools["rclone"], "copy", remote, out / "dir", "--config", conf, "-q"]
        # Untimed: the snapshot ckpt restores and the copy rclone downloads.
        b.run([b.ckpt, "push", "-q", src, store.url], env=env)
        b.run([b.tools["rclone"], "copy", src, remote, "--config", conf, "-q"], env=env)
        d, events = out / "dir", out / "events.jsonl"
        ckpt = b.ckpt_run(d, store.url, "--log-json", events, command=[b.python, "-c", "pass"])
        names = ["ckpt run -- python -c pass", "rclone copy (down)"]
        series: dict[str, list[Proc]] = {name: [] for name in names}
        for r in range(a.runs):
            for name in rotate(names, r):
                rmtree(d)
                rmtree(events)
                sync()
                argv = ckpt if name.startswith("ckpt") else rclone
                series[name].append(b.run(argv, env=env))
                if not same_tree(src, d):
                    raise RuntimeError(f"{name} did not bring {src} into {d}")
            print(f"    run {r + 1}/{a.runs} done", flush=True)
        # The split: the same run under bench/_phases.py (timestamps around calls).
        splits = []
        for _ in range(a.split_runs):
            rmtree(d)
            rmtree(events)
            phases = out / "phases.json"
            sync()
            argv = [b.python, BENCH / "_phases.py", phases, *ckpt[1:]]
            proc = b.run(argv, env=env)
            splits.append(_split(proc, json.loads(phases.read_text()), _events(events)))
    finally:
        for suffix in ("", "-rclone"):
            try:
                service.cleanup(_with_url(store, store.url + suffix))
            except Exception as exc:
                print(f"    cleanup: {exc}", file=sys.stderr)
        service.server.stop()

    case.conditions = (
        "No fsync locally: the restored files go to the page cache, `sync` before each run; "
        "the server keeps the objects in temp files (moto) on the same disk."
    )
    case.method = [
        f"Untimed set-up: {a.resume_files} files of {size / a.resume_files / MiB:.1f} MiB "
        f"({size / MiB:.0f} MiB of random bytes) pushed by `ckpt push` to {kind} on "
        "127.0.0.1 (tests/stores.py), and copied there by `rclone copy` under another "
        "prefix. Each round, with an empty --dir (deleted, `sync`): `ckpt run --dir DIR "
        "--remote URL --retries 0 --preemption off --log-json EVENTS -- python -c pass` "
        "(start-up, opening the remote, lease, run history, listing and choosing the "
        "snapshot, the download with every chunk verified, the child, the final flush, "
        "exit: timed to ckpt's exit) and `rclone copy REMOTE DIR` of the same files (its "
        "defaults) alone, taking turns going first. Both results are compared with the "
        "source (names and sizes).",
        f"The split comes from {a.split_runs} more run(s) of the same command under "
        "`bench/_phases.py` (not timed for the target): it imports ckpt as the console "
        "script does and wraps the functions a run's start calls (open_backend, "
        "Repository.open, Lease.acquire, load_runs, prepare_rank_dir, Repository.snapshots, "
        "Repository.load, materialise, swap_in, Child(), Supervisor._final_flush, ...) with "
        "timestamps; with the --log-json events (start, restore, launch, exit, end) and the "
        "launcher's fork time they split the wall time. ckpt itself is unchanged.",
    ]
    rows = []
    for label in splits[0] if splits else []:
        values = [s.get(label, 0.0) for s in splits]
        rows.append([label, f"{median(values):.3f}", ", ".join(f"{v:.3f}" for v in values)])
    case.tables = [
        timing_table(series, size=size, cpu=True, title="Wall time of each whole process"),
        ratio_table(series, names[0]),
        Table(
            ["phase of ckpt run", "median s", "runs (s)"],
            rows,
            "Where ckpt run's time goes (bench/_phases.py runs; rows in the order they happen)",
        ),
    ]
    case.target(
        f"ckpt run -- python -c pass / rclone copy, {size / MiB:.0f} MiB from {kind}",
        judged(series[names[0]], series[names[1]], MIN),
        "<=",
        LIMIT,
        "x",
        how(MIN, "ckpt run", "rclone copy"),
    )
    return case


def _events(path: Path) -> dict[str, float]:
    """The first ts of each event of the log."""
    out: dict[str, float] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                e = json.loads(line)
                out.setdefault(e["event"], e["ts"])
    return out


def _calls(phases: dict[str, Any], label: str) -> int:
    return sum(1 for c in phases["calls"] if c[0] == label)


def _split(proc: Proc, phases: dict[str, Any], ev: dict[str, float]) -> dict[str, float]:
    """Seconds of each phase, in order; 'other' is what no phase covers. A
    function called several times (the snapshots listed, the manifest read
    more than once) counts with all its calls."""
    first: dict[str, tuple[float, float]] = {}
    total: dict[str, float] = {}
    for label, start, end in phases["calls"]:
        first.setdefault(label, (start, end))
        total[label] = total.get(label, 0.0) + end - start

    def took(label: str) -> float:
        return total.get(label, 0.0)

    t0, t_end = proc.wall0, proc.wall0 + proc.seconds
    restore_done = ev.get("restore", ev.get("fresh", 0.0))
    prepare = took("bring --dir to the snapshot")
    inner = took("list snapshots") + took("read the manifest") + took("transfer")
    inner += took("swap in")
    split = {
        "interpreter start + import ckpt_cli.main": phases["t_main_imported"] - t0,
        "imports of the run command (supervisor, ...)": phases["t_lazy_imported"]
        - phases["t_main_imported"],
        "parse, config, up to the start event": ev["start"] - phases["t_lazy_imported"],
        "open the remote (fsspec, s3fs, botocore, client)": took("open the remote"),
        "read ckpt.json": took("read ckpt.json"),
        "take the lease": took("take the lease"),
        "read the run history": took("read the run history"),
        f"list snapshots ({_calls(phases, 'list snapshots')} calls)": took("list snapshots"),
        f"read the manifest ({_calls(phases, 'read the manifest')} calls)": took(
            "read the manifest"
        ),
        "transfer (download, verify, write)": took("transfer"),
        "swap in": took("swap in"),
        "rest of preparing --dir (local scan, choosing)": prepare - inner,
        "restore done to child started": first.get("start the child", (restore_done, 0))[0]
        - restore_done,
        "start the child (fork, exec)": took("start the child"),
        "child runs (python -c pass) and is reaped": ev.get("exit", 0.0)
        - first.get("start the child", (0.0, 0.0))[1],
        "final flush": took("final flush"),
        "after the final flush to the end event": ev.get("end", 0.0)
        - first.get("final flush", (0.0, ev.get("exit", 0.0)))[1],
        "end event to process exit": t_end - ev.get("end", t_end),
    }
    split["other (between the phases above)"] = proc.seconds - sum(split.values())
    split["total (whole process)"] = proc.seconds
    return split
