"""Summarise py-spy's raw (collapsed) output: where each thread's samples go.

    py-spy record -r 200 --threads --idle --format raw -o OUT.txt -- COMMAND
    python bench/tools/flame_summary.py OUT.txt [--top 12] [--match TEXT]

Per kind of thread (the main thread; the others grouped by their first frame,
e.g. concurrent.futures' worker or fsspec's IO loop): its share of all
samples, then the functions with the most samples at the top of the stack
(self) and the functions with the most samples anywhere in the stack
(inclusive), each as a share of that kind's samples. Idle samples (with
--idle) are kept: a worker waiting on a lock or a socket shows as such.
"""

import argparse
import collections
import re

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def short(frame: str) -> str:
    m = FRAME.match(frame)
    if not m:
        return frame
    path = m["file"]
    for marker in ("site-packages/", "lib/python3.11/", "cli/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m['func']} ({path})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument(
        "--match", action="append", default=[], help="also count stacks containing TEXT"
    )
    args = ap.parse_args()
    kinds: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    incl: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    totals: collections.Counter[str] = collections.Counter()
    matched: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    threads: dict[str, set[str]] = collections.defaultdict(set)
    with open(args.path) as f:
        lines = f.read().splitlines()
    for line in lines:
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = stack.split(";")
        if frames[0].startswith("thread ("):  # recorded with --threads
            thread, frames = frames[0], frames[1:]
        else:
            thread = "thread"
        if "MainThread" in thread or not frames or thread == "thread":
            kind = "main thread"
        else:
            kind = "threads from " + short(frames[0]).split(" (")[0]
            for f in frames[:6]:
                s = short(f)
                if "_worker" in s or "run_forever" in s or "_run_once" in s:
                    kind = "threads in " + s
                    break
        threads[kind].add(thread)
        totals[kind] += n
        kinds[kind][short(frames[-1]) if frames else "(no frame)"] += n
        for f in set(short(f) for f in frames):
            incl[kind][f] += n
        for text in args.match:
            if text in stack:
                matched[kind][text] += n
    grand = sum(totals.values())
    for kind, total in totals.most_common():
        share = f"{total} samples ({total / grand:.0%} of all)"
        print(f"== {kind}: {len(threads[kind])} thread(s), {share}")
        print("   self:")
        for f, n in kinds[kind].most_common(args.top):
            print(f"     {n / total:6.1%}  {f}")
        print("   inclusive:")
        for f, n in incl[kind].most_common(args.top + 8):
            print(f"     {n / total:6.1%}  {f}")
        for text, n in matched[kind].items():
            print(f"   stacks with {text!r}: {n / total:.1%}")


if __name__ == "__main__":
    main()
