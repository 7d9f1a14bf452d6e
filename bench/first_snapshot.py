"""First snapshot of a directory vs `cp -r` of it: wall time and peak RSS.

    python bench/first_snapshot.py [--size-mib 1024] [--files 10] [--runs 3] [--work DIR]

Both sides copy the same generated random bytes (nothing compresses) from a
warm page cache to a local directory, without fsync, as whole processes:
`cp -r SRC DST` against `ckpt push SRC DST` into an empty repository. Prints
medians and the ratio ckpt/cp; peak RSS comes from wait4() of each process.
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


def timed(argv, env=None):
    """Run argv; return (seconds, peak RSS in MiB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv[0]} failed with {status}")
    return elapsed, usage.ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--files", type=int, default=10)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path(__file__).parent / "work")
    args = ap.parse_args()

    work = args.work.absolute()
    src = work / "src"
    shutil.rmtree(work, ignore_errors=True)
    src.mkdir(parents=True)
    per_file = args.size_mib * 1024 * 1024 // args.files
    for i in range(args.files):
        with open(src / f"shard-{i:02d}.bin", "wb") as f:
            left = per_file
            while left:
                n = min(left, 16 << 20)
                f.write(os.urandom(n))
                left -= n
    subprocess.run(["cat", *map(str, src.iterdir())], stdout=subprocess.DEVNULL, check=True)
    env = dict(os.environ, XDG_DATA_HOME=str(work / "xdg"), XDG_STATE_HOME=str(work / "xdg"))

    rows = {"cp -r": [], "ckpt push": []}
    for _ in range(args.runs):
        for name, samples in rows.items():
            dst = work / "dst"
            shutil.rmtree(dst, ignore_errors=True)
            argv = (
                ["cp", "-r", str(src), str(dst)]
                if name == "cp -r"
                else [CKPT, "push", "--quiet", str(src), str(dst)]
            )
            samples.append(timed(argv, env))
            shutil.rmtree(dst, ignore_errors=True)

    print(
        f"first snapshot of {args.size_mib} MiB in {args.files} files, "
        f"{args.runs} runs, {os.cpu_count()} cores, page cache warm, no fsync"
    )
    med = {}
    for name, samples in rows.items():
        secs = statistics.median(s for s, _ in samples)
        rss = max(r for _, r in samples)
        med[name] = secs
        print(
            f"  {name:10s} median {secs:6.2f} s  ({args.size_mib / secs:7.0f} MiB/s)"
            f"  peak RSS {rss:6.0f} MiB"
        )
    print(f"  ratio ckpt push / cp -r: {med['ckpt push'] / med['cp -r']:.2f}x")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
