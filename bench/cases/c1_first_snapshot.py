"""Case 1: the first snapshot of the big set into a fresh local repository,
against copying the same directory with cp -r, fsspec (flytekit's way),
rclone sync and tar czf (flyte 2.x's format)."""

from pathlib import Path

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
    sync,
    timing_table,
    warm,
)

NUMBER = 1
TITLE = "First snapshot to a local path"

#: flytekit's checkpoint save uploads the directory with fsspec's put; here the
#: same call on the local filesystem, in a process of its own.
FSSPEC_PUT = (
    "import sys, fsspec; fsspec.filesystem('file').put(sys.argv[1], sys.argv[2], recursive=True)"
)


def run(b: Bench) -> Case:
    a = b.args
    case = Case(NUMBER, TITLE)
    src = b.big_set()
    size = a.size_mib * MiB // a.files * a.files
    out = b.dir("c1")
    rclone = b.tools["rclone"]
    tools = {
        "ckpt push": lambda d: [b.ckpt, "push", "-q", src, d],
        "cp -r": lambda d: ["cp", "-r", src, d],
        "fsspec put (flytekit emulation)": lambda d: [b.python, "-c", FSSPEC_PUT, src, d],
    }
    if rclone:
        tools["rclone sync"] = lambda d: [
            rclone,
            "sync",
            "--config",
            b.env["RCLONE_CONFIG"],
            src,
            d,
        ]
    tools["tar czf"] = lambda d: ["tar", "czf", d, "-C", src, "."]
    runs = {name: a.runs for name in tools}
    runs["tar czf"] = min(a.runs, a.slow_runs)
    series: dict[str, list[Proc]] = {name: [] for name in tools}

    warm(src)
    # One untimed round of the fast tools first: on these VMs the first big
    # write after a while is often several times slower than the next ones
    # (seen: cp -r of 2 GiB from 0.7 to 3.5 s), whichever tool makes it.
    for name, argv in tools.items():
        if name != "tar czf":
            rmtree(out / "dst")
            sync()
            b.run(argv(out / "dst"))
            rmtree(out / "dst")
    for r in range(a.runs):
        for name in rotate(list(tools), r):
            if len(series[name]) >= runs[name]:
                continue
            dst = out / ("set.tgz" if name == "tar czf" else "dst")
            rmtree(dst)
            sync()
            series[name].append(b.run(tools[name](dst)))
            if name == "ckpt push":
                if len(series[name]) == runs[name]:
                    dst.rename(out / "repo")  # case 2 restores it
            elif name != "tar czf":
                files = sorted(p.name for p in dst.iterdir())
                if files != sorted(p.name for p in src.iterdir()):
                    raise RuntimeError(f"{name} did not copy {src} into {dst}: {files[:5]}")
            if name != "tar czf":
                rmtree(dst)  # the last tarball stays: case 2 extracts it
        print(f"    run {r + 1}/{a.runs} done", flush=True)
    b.shared["c1"] = {"repo": out / "repo", "tgz": out / "set.tgz"}
    b.shared.setdefault("push_rss", {})[size] = max(p.rss for p in series["ckpt push"])

    gz = runs["tar czf"]
    case.conditions = (
        "No fsync on either side (ckpt does not fsync a local remote; cp, rclone, the fsspec "
        "copy and tar do not fsync). The source is in the page cache (read once before "
        "timing); each output goes to the page cache and is flushed with `sync`, untimed, "
        "before the next run."
    )
    case.method = [
        f"Source: {a.files} files of {size // a.files / MiB:.1f} MiB (os.urandom bytes, "
        f"{size / MiB:.0f} MiB in all), read once before timing (warm page cache). Every run "
        "writes to a destination that does not exist yet on the same filesystem: a fresh, "
        "empty repository for `ckpt push SRC REPO`, a new directory for `cp -r SRC DST`, "
        "`rclone sync SRC DST` and the fsspec copy, one new file for `tar czf DST.tgz -C SRC .`. "
        "The previous destination is deleted and `sync` runs before each timed run; the tools "
        "take turns in a rotating order, after one untimed round of every tool but tar. "
        "Durability: no fsync on either side (ckpt does not "
        "fsync a local remote; none of the baselines fsyncs).",
        "The flytekit baseline is an emulation: flytekit's checkpoint save uploads the "
        "directory with fsspec, so it is `fsspec.filesystem('file').put(SRC, DST, "
        "recursive=True)` in a Python process of its own (the interpreter that runs ckpt).",
        f"`tar czf` is flyte 2.x's checkpoint format (a gzip tarball, default level). It is "
        f"slow, so it runs {gz} time(s) instead of {a.runs}; its figure is the minimum of "
        f"those. rclone runs with its defaults (no `--checksum`; it hashes each file "
        "(MD5) as it copies it and checks the copy against it).",
    ]
    case.tables = [
        timing_table(series, size=size, title="Wall time of each whole process"),
        ratio_table(series, "ckpt push"),
    ]
    case.target(
        "ckpt push / cp -r",
        judged(series["ckpt push"], series["cp -r"], MIN),
        "<=",
        1.3,
        "x",
        how(MIN, "ckpt push", "cp -r"),
    )
    case.target(
        "speed-up of ckpt push over tar czf",
        min_of(series["tar czf"]) / min_of(series["ckpt push"]),
        ">=",
        15,
        "x",
        "inverse ratio of minimums: fastest tar czf over fastest ckpt push",
    )
    return case


def first_snapshot_repo(b: Bench) -> tuple[Path, Path]:
    """Case 1's repository and tarball; made here (untimed) if case 1 did not run."""
    if "c1" in b.shared:
        return b.shared["c1"]["repo"], b.shared["c1"]["tgz"]
    src = b.big_set()
    out = b.dir("c1")
    b.run([b.ckpt, "push", "-q", src, out / "repo"])
    b.run(["tar", "czf", out / "set.tgz", "-C", src, "."])
    b.shared["c1"] = {"repo": out / "repo", "tgz": out / "set.tgz"}
    return out / "repo", out / "set.tgz"
