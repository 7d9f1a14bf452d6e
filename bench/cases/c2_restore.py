"""Case 2: restore of case 1's snapshot into an empty directory, against
cp -r of the source and tar xzf of case 1's tarball."""

from _common import (
    MIN,
    Bench,
    Case,
    MiB,
    Proc,
    how,
    judged,
    min_of,
    ratio_table,
    rmtree,
    rotate,
    same_tree,
    sync,
    timing_table,
    warm,
)

from cases.c1_first_snapshot import first_snapshot_repo

NUMBER = 2
TITLE = "Restore from a local path"


def run(b: Bench) -> Case:
    a = b.args
    case = Case(NUMBER, TITLE)
    src = b.big_set()
    size = a.size_mib * MiB // a.files * a.files
    repo, tgz = first_snapshot_repo(b)
    out = b.dir("c2")
    dst = out / "dst"
    tools = {
        "ckpt restore": lambda: [b.ckpt, "restore", "-q", repo, dst],
        "cp -r": lambda: ["cp", "-r", src, dst],
        "tar xzf": lambda: ["tar", "xzf", tgz, "-C", dst],
    }
    runs = {name: a.runs for name in tools}
    runs["tar xzf"] = min(a.runs, a.slow_runs)
    series: dict[str, list[Proc]] = {name: [] for name in tools}

    for source in (src, repo, tgz):
        warm(source)
    for name in ("ckpt restore", "cp -r"):  # untimed: see case 1
        rmtree(dst)
        sync()
        b.run(tools[name]())
        rmtree(dst)
    for r in range(a.runs):
        for name in rotate(list(tools), r):
            if len(series[name]) >= runs[name]:
                continue
            rmtree(dst)
            if name == "tar xzf":
                dst.mkdir()  # tar extracts into an existing directory
            sync()
            series[name].append(b.run(tools[name]()))
            # Every byte of the first restore is compared with the source.
            if not same_tree(src, dst, content=name == "ckpt restore" and r == 0):
                raise RuntimeError(f"{name} did not reproduce {src} in {dst}")
            rmtree(dst)
        print(f"    run {r + 1}/{a.runs} done", flush=True)

    case.conditions = (
        "No fsync on either side. Repository, tarball and source are in the page cache (read "
        "once before timing); the restored files go to the page cache and are flushed with "
        "`sync`, untimed, before the next run."
    )
    case.method = [
        f"Case 1's snapshot ({a.files} files, {size / MiB:.0f} MiB, in a local repository) "
        "is restored with `ckpt restore REPO DST` into a directory that does not exist yet "
        "(ckpt verifies every chunk's hash and writes to a temp dir it renames into place). "
        "Baselines: `cp -r SRC DST` of the original files and `tar xzf SET.tgz -C DST` of "
        "case 1's tarball into an empty directory. Repository, source and tarball are read "
        "once before timing (warm page cache); `sync` before each timed run; no fsync on "
        "either side. One untimed round of ckpt and cp -r comes first (see case 1). "
        "The first ckpt restore is compared byte for byte with the source, the "
        f"others by names and sizes. `tar xzf` runs {runs['tar xzf']} time(s).",
    ]
    case.tables = [
        timing_table(series, size=size, title="Wall time of each whole process"),
        ratio_table(series, "ckpt restore"),
    ]
    case.target(
        "ckpt restore / cp -r",
        judged(series["ckpt restore"], series["cp -r"], MIN),
        "<=",
        1.3,
        "x",
        how(MIN, "ckpt restore", "cp -r"),
    )
    case.target(
        "speed-up of ckpt restore over tar xzf",
        min_of(series["tar xzf"]) / min_of(series["ckpt restore"]),
        ">=",
        3,
        "x",
        "inverse ratio of minimums: fastest tar xzf over fastest ckpt restore",
    )
    return case
