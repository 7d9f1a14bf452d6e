"""Commit latency: time from cp.commit(wait=True) to its return, under `ckpt run`.

    python bench/commit_latency.py [--size-mib 100] [--commits 5] [--work DIR]

The child rewrites a checkpoint of random bytes (temp name + rename, like
torch.save to tmp + os.replace) and times commit(wait=True) to a file://
remote, which returns once the snapshot is durable (chunks + manifest
written). Baseline in the same run: `cp` of the same file to the same disk.
Neither side fsyncs. Prints medians and the ratio.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

CKPT = str(Path(sys.executable).parent / "ckpt")

CHILD = r"""
import json, os, sys, time
import ckpt
size, commits, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
cp = ckpt.checkpoint()
times = []
for i in range(commits):
    tmp = cp.path / "model.pt.tmp"
    with open(tmp, "wb") as f:
        f.write(os.urandom(size))
    os.replace(tmp, cp.path / "model.pt")
    t0 = time.perf_counter()
    cp.commit(wait=True)
    times.append(time.perf_counter() - t0)
t0 = time.perf_counter()
cp.commit(wait=True)
unchanged = time.perf_counter() - t0
json.dump({"commits": times, "unchanged": unchanged}, open(out, "w"))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=100)
    ap.add_argument("--commits", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path(__file__).parent / "work")
    args = ap.parse_args()
    work = args.work.absolute()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    size = args.size_mib * 1024 * 1024
    env = dict(os.environ, XDG_DATA_HOME=str(work / "xdg"), XDG_STATE_HOME=str(work / "xdg"))

    (work / "child.py").write_text(CHILD)
    out = work / "times.json"
    subprocess.run(
        [
            CKPT,
            "run",
            "--quiet",
            "--snapshots",
            "commit",
            "--dir",
            str(work / "ck"),
            "--remote",
            str(work / "remote"),
            "--",
            sys.executable,
            str(work / "child.py"),
            str(size),
            str(args.commits),
            str(out),
        ],
        env=env,
        check=True,
    )
    import json

    result = json.loads(out.read_text())

    src = work / "src.bin"
    src.write_bytes(os.urandom(size))
    cps = []
    for i in range(args.commits):
        t0 = time.perf_counter()
        subprocess.run(["cp", str(src), str(work / f"copy-{i}.bin")], check=True)
        cps.append(time.perf_counter() - t0)

    commit = statistics.median(result["commits"])
    cp = statistics.median(cps)
    print(
        f"commit latency, {args.size_mib} MiB checkpoint, file:// remote, "
        f"{args.commits} commits, {os.cpu_count()} cores, no fsync"
    )
    print(
        f"  cp.commit(wait=True)   median {commit * 1000:7.1f} ms  "
        f"(all: {', '.join(f'{t * 1000:.0f}' for t in result['commits'])} ms)"
    )
    print(f"  commit, nothing new    {result['unchanged'] * 1000:7.1f} ms")
    print(f"  cp of the same file    median {cp * 1000:7.1f} ms")
    print(f"  ratio commit / cp: {commit / cp:.2f}x")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
