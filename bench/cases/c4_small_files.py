"""Case 4: many small files. First snapshot and no-change snapshot as whole
`ckpt push` processes against rsync -a, and the no-change snapshot in-process
(Snapshotter.snapshot() on a local repository) against an absolute limit."""

import json
import time

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
    min_of,
    ratio_table,
    rmtree,
    small_files,
    sync,
    timing_table,
    warm,
)

NUMBER = 4
TITLE = "Small files"

#: The issue's absolute limit for an in-process snapshot with nothing changed.
IN_PROCESS_LIMIT = 0.2


def run(b: Bench) -> Case:
    a = b.args
    case = Case(NUMBER, TITLE)
    out = b.dir("c4")
    src = out / "src"
    total = small_files(src, a.small_files)
    generated = time.time()
    warm(src)

    labels = {
        "ckpt push, first": "ckpt push (first)",
        "rsync -a, first": "rsync -a (into an empty dir)",
        "ckpt push, nothing changed": "ckpt push (nothing changed)",
        "rsync -a, nothing changed": "rsync -a (nothing changed)",
    }
    series: dict[str, list[Proc]] = {label: [] for label in labels.values()}
    # The start-up floor of any ckpt command (interpreter, imports, argument
    # parsing): what a no-change push cannot go below without a faster start.
    floor: list[Proc] = []
    for r in range(a.runs):
        floor.append(b.run([b.ckpt, "--version"]))
        # New paths each round; the old ones are deleted at the end. On ext4
        # without a journal (these VMs) an inode freed minutes ago is skipped
        # when a new one is allocated (fs/ext4/ialloc.c, recently_deleted):
        # writing 10,000 files right after deleting 10,000 from the same
        # block group scanned past them all, 5 s of system time in one
        # first push (findings, "small files"), a cost of the bench's own
        # rmtree and no user's first push.
        repo, dst = out / f"repo-{r}", out / f"dst-{r}"
        ckpt = [b.ckpt, "push", "-q", src, repo]
        rsync = ["rsync", "-a", f"{src}/", f"{dst}/"]
        order = [("ckpt push", ckpt), ("rsync -a", rsync)]
        if r % 2:
            order.reverse()
        for phase in ("first", "nothing changed"):
            for name, argv in order:
                sync()
                series[labels[f"{name}, {phase}"]].append(b.run(argv))
        snapshots = len(json.loads(b.capture([b.ckpt, "ls", "--json", repo]))["snapshots"])
        if snapshots != 1:
            raise RuntimeError(f"the no-change push wrote a snapshot: {snapshots} in {repo}")
        print(f"    run {r + 1}/{a.runs} done", flush=True)
    for r in range(a.runs):
        rmtree(out / f"repo-{r}")
        rmtree(out / f"dst-{r}")

    in_process, first = _in_process(b, src, out / "repo-inproc", generated, max(a.runs, 5))

    case.conditions = (
        "No fsync on either side. The files are in the page cache (read once before timing); "
        "`sync` before each timed run."
    )
    case.method = [
        f"{a.small_files} files of 1-64 KiB (uniformly random sizes, os.urandom bytes, "
        f"{total / MiB:.0f} MiB in all) in 8 subdirectories, read once before timing. Each run "
        "starts from a fresh, empty repository and an empty rsync destination (new paths "
        "each round; the old ones are deleted after the last): first `ckpt "
        "push SRC REPO` and `rsync -a SRC/ DST/`, then both again with nothing changed (ckpt "
        "writes no snapshot; rsync copies nothing). `sync` before each timed run, no fsync "
        "on either side; the two take turns going first.",
        "In-process: the bench process imports ckpt_cli and builds what `ckpt push` builds "
        "(`open_backend` of a local path, `Repository.open(create=True)`, a `Snapshotter` "
        "on the source directory), takes a first snapshot (untimed), then times "
        f"`snapshot()` with nothing changed {len(in_process)} times (median). The limit "
        f"of {IN_PROCESS_LIMIT} s is absolute, as the issue asks.",
    ]
    first_ck, first_rs = labels["ckpt push, first"], labels["rsync -a, first"]
    same_ck, same_rs = labels["ckpt push, nothing changed"], labels["rsync -a, nothing changed"]
    case.tables = [
        timing_table(
            {**series, "ckpt --version (start-up floor)": floor},
            size=total,
            cpu=True,
            title="Wall time of each whole process",
        ),
        ratio_table(
            {first_ck: series[first_ck], first_rs: series[first_rs]}, first_ck, "First push"
        ),
        ratio_table({same_ck: series[same_ck], same_rs: series[same_rs]}, same_ck, "No change"),
        Table(
            ["in-process snapshot()", "median s", "runs (s)"],
            [
                ["first snapshot (untimed set-up)", f"{first:.3f}", ""],
                [
                    "nothing changed",
                    f"{median(in_process):.4f}",
                    ", ".join(f"{t:.4f}" for t in in_process),
                ],
            ],
        ),
    ]
    for phase in ("first", "nothing changed"):
        ck = series[labels[f"ckpt push, {phase}"]]
        rs = series[labels[f"rsync -a, {phase}"]]
        case.target(
            f"ckpt push / rsync -a, {a.small_files} files, {phase}",
            judged(ck, rs, MIN),
            "<=",
            1.5,
            "x",
            how(MIN, "ckpt push", "rsync -a"),
        )
    case.notes.append(
        f"Start-up floor: the fastest `ckpt --version` took {min_of(floor):.3f} s, "
        f"{min_of(floor) / min_of(series[same_ck]) * 100:.0f} % of the fastest no-change push; "
        "rsync's fastest no-change run took "
        f"{min_of(series[same_rs]):.3f} s. The profile of a whole `ckpt push` is in "
        "bench/results/findings.md."
    )
    case.target(
        f"in-process snapshot(), {a.small_files} files, nothing changed",
        median(in_process),
        "<",
        IN_PROCESS_LIMIT,
        "s",
        "median wall time of Snapshotter.snapshot() in the bench process",
    )
    return case


def _in_process(b: Bench, src, repo_dir, generated: float, runs: int) -> tuple[list[float], float]:
    """(seconds of each no-change snapshot(), seconds of the first snapshot)."""
    from ckpt_cli.backends import open_backend
    from ckpt_cli.repository import Repository
    from ckpt_cli.snapshotter import Snapshotter

    # A file modified within the last second is never trusted by its stat
    # (racy-git rule): let the newest file age past it, as in a real run.
    time.sleep(max(0.0, generated + 1.5 - time.time()))
    repo = Repository.open(open_backend(str(repo_dir)), create=True)
    assert repo is not None
    snap = Snapshotter(repo, src, run="bench")
    try:
        t0 = time.perf_counter()
        first = snap.snapshot(reason="bench")
        first_s = time.perf_counter() - t0
        if first.manifest is None:
            raise RuntimeError("the in-process first snapshot wrote nothing")
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            result = snap.snapshot(reason="bench")
            times.append(time.perf_counter() - t0)
            if result.manifest is not None or result.files_read:
                raise RuntimeError(
                    f"a snapshot with nothing changed read {result.files_read} files"
                )
    finally:
        snap.close()
    return times, first_s
