"""Case 3: an incremental snapshot after one file of the big set was rewritten,
against rsync -a into an already synced copy: wall time, and the bytes each
process read and wrote (/proc/PID/io) against the size of the changed file."""

import json
import os

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
    mib,
    sync,
    timing_table,
    warm,
    write_random,
)

NUMBER = 3
TITLE = "Incremental snapshot: one file changed"

#: ckpt's reads beyond the floor, and its writes, may exceed the changed file by this much.
SLACK = 1.1


def run(b: Bench) -> Case:
    a = b.args
    case = Case(NUMBER, TITLE)
    out = b.dir("c3")
    src = b.pool.dataset(out / "src", a.size_mib * MiB, a.files)
    per = a.size_mib * MiB // a.files
    repo, dst = out / "repo", out / "dst"
    warm(src)
    # Untimed: the parent snapshot and the synced copy.
    b.run([b.ckpt, "push", "-q", src, repo])
    b.run(["rsync", "-a", f"{src}/", f"{dst}/"])

    # The floor: what starting the Python interpreter and ckpt reads anyway.
    floor = [b.run([b.ckpt, "--version"]) for _ in range(3)]
    rchar_floor = median(p.rchar for p in floor)
    # For reference: a push with nothing changed (opens the repository, reads
    # the parent manifest, lists the chunks, stats the files).
    sync()
    idle = b.run([b.ckpt, "push", "-q", src, repo])

    series: dict[str, list[Proc]] = {"ckpt push": [], "rsync -a": []}
    changed = []
    for r in range(a.runs):
        victim = src / f"shard-{r % a.files:02d}.bin"
        tmp = victim.with_name(victim.name + ".tmp")  # a temp name: ckpt ignores it
        write_random(tmp, per)
        os.replace(tmp, victim)  # like torch.save to a temp file + os.replace
        changed.append(victim.name)
        order = ["ckpt push", "rsync -a"] if r % 2 == 0 else ["rsync -a", "ckpt push"]
        for name in order:
            sync()
            argv = (
                [b.ckpt, "push", "-q", src, repo]
                if name == "ckpt push"
                else ["rsync", "-a", f"{src}/", f"{dst}/"]
            )
            series[name].append(b.run(argv))
    listing = json.loads(b.capture([b.ckpt, "ls", "--json", repo]))
    new_bytes = [s.get("new_bytes") for s in listing["snapshots"]][: a.runs]

    ck, rs = series["ckpt push"], series["rsync -a"]
    read_extra = median((p.rchar) - rchar_floor for p in ck)
    written = median(p.wchar for p in ck)
    case.conditions = (
        "No fsync on either side. Every file is in the page cache (the rewritten one was just "
        "written, then flushed with `sync` before the timed runs); `sync` before each timed "
        "run."
    )
    case.method = [
        f"The source is a fresh copy (hard links) of the big set: {a.files} files of "
        f"{per / MiB:.1f} MiB. Untimed set-up: a first `ckpt push SRC REPO` and `rsync -a "
        "SRC/ DST/`. Then, in each run, one file (a different one each run) is rewritten "
        "with new random bytes of the same size, written to a temp name and renamed over the "
        "old one (as torch.save to a temp file + os.replace does), and both tools bring "
        "their copy up to date: `ckpt push SRC REPO` (same host and path: ckpt trusts the "
        "other files by size, mtime and inode from the parent manifest) and `rsync -a SRC/ "
        "DST/` (its quick check: size and mtime). Warm page cache, `sync` before each timed "
        "run, no fsync on either side; the two take turns going first.",
        "rchar/wchar are the process's /proc/PID/io counters, read after it exited and before "
        "it was reaped (waitid with WNOWAIT, then wait4; the zombie's counters are complete: "
        "checked to include its threads' and its reaped children's I/O): every byte passed to "
        "read()/write() and the like by the process, its threads and the children it reaped. "
        "They include "
        "reading Python's modules: the floor is the rchar of `ckpt --version` "
        f"(median {mib(rchar_floor)} MiB). rsync's counters include its sender and receiver "
        "processes talking through a pipe, so it moves each changed byte about twice.",
        f"Rule: ckpt passes if (rchar - floor) and wchar are each at most {SLACK}x the size "
        "of the changed file (medians over the runs).",
    ]
    rows = [
        ["ckpt --version (the floor)", mib(rchar_floor), mib(median(p.wchar for p in floor))],
        ["ckpt push, nothing changed", mib(idle.rchar), mib(idle.wchar)],
    ]
    for name, procs in series.items():
        rows.append(
            [
                f"{name}, one file changed",
                mib(median(p.rchar for p in procs)),
                mib(median(p.wchar for p in procs)),
            ]
        )
    case.tables = [
        timing_table(series, size=per, io=True, title="Wall time (MiB/s: of the changed file)"),
        Table(
            ["process", "rchar MiB (median)", "wchar MiB (median)"],
            rows,
            f"Bytes read and written; the changed file is {mib(per)} MiB",
        ),
    ]
    case.notes.append(
        "Files rewritten: " + ", ".join(changed) + "; new bytes of each snapshot by `ckpt ls "
        "--json` (newest first): " + ", ".join(f"{mib(n or 0)} MiB" for n in new_bytes)
    )
    case.target(
        "ckpt push / rsync -a, one file changed",
        judged(ck, rs, MIN),
        "<=",
        1.5,
        "x",
        how(MIN, "ckpt push", "rsync -a"),
    )
    case.target(
        "ckpt push: (rchar - floor) / changed bytes",
        read_extra / per,
        "<=",
        SLACK,
        "x",
        "median (rchar - rchar of ckpt --version) over the changed file's size",
    )
    case.target(
        "ckpt push: wchar / changed bytes",
        written / per,
        "<=",
        SLACK,
        "x",
        "median wchar over the changed file's size",
    )
    return case
