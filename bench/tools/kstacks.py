"""Where a command's threads are in the kernel: sample /proc/PID/task/*/stack
(needs root) and each thread's state every 10 ms while it runs.

    python bench/tools/kstacks.py COMMAND [ARG...]

Prints the most frequent (state, innermost four kernel frames) with their
share of the thread-samples: R in generic_perform_write is CPU (or waiting for
one) in a buffered write's copy; D or S in balance_dirty_pages is dirty
throttling; shrink_* / try_to_free_pages is reclaim (findings.md, items 1, 8).
"""

import collections
import os
import subprocess
import sys
import time


def main() -> None:
    proc = subprocess.Popen(sys.argv[1:])
    seen: collections.Counter[str] = collections.Counter()
    samples = 0
    while proc.poll() is None:
        try:
            tids = os.listdir(f"/proc/{proc.pid}/task")
        except OSError:
            break
        for tid in tids:
            base = f"/proc/{proc.pid}/task/{tid}"
            try:
                with open(f"{base}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
                with open(f"{base}/stack") as f:
                    frames = [ln.split()[1].split("+")[0] for ln in f if ln.strip()]
            except (OSError, IndexError):
                continue
            key = f"{state} " + (" < ".join(frames[:4]) if frames else "(user space)")
            seen[key] += 1
            samples += 1
        time.sleep(0.01)
    for key, n in seen.most_common(12):
        print(f"{n / max(samples, 1):6.1%} {key}")
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
