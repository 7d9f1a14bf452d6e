"""What a buffered write into memory freed a moment ago costs against one
into memory freed a few seconds ago.

    python bench/tools/freed_idle.py OUTDIR [ROUNDS]

Each round, for each idle time (0 and 3 s) and each write size (64 KiB and
8 MiB) in turn: `rm -rf OUTDIR/files`, `sync`, the idle time, then 1 GiB
written as 10 new files of 100 MiB with os.pwrite of one buffer; prints the
wall and system time of the writing. On a VM that reports free memory to its
host (virtio free page reporting: /sys/module/page_reporting), memory that
stayed free for about 2 s is handed back, and filling it again costs several
times more (findings.md, "2026-12-08"). The report's Machine table says
whether the kernel does that.
"""

import os
import resource
import shutil
import sys
import time

SIZES = (64 << 10, 8 << 20)
IDLE = (0.0, 3.0)


def write(out: str, piece: int, buf: memoryview) -> tuple[float, float]:
    os.makedirs(out)
    t0 = time.perf_counter()
    s0 = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    for n in range(10):
        fd = os.open(f"{out}/f{n}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        for offset in range(0, 100 << 20, piece):
            os.pwrite(fd, buf[:piece], offset)
        os.close(fd)
    return time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_stime - s0


def main() -> None:
    out = os.path.join(sys.argv[1], "files")
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    buf = memoryview(os.urandom(8 << 20))
    for r in range(rounds):
        for idle in IDLE:
            for piece in SIZES:
                shutil.rmtree(out, ignore_errors=True)
                os.sync()
                time.sleep(idle)
                wall, sys_s = write(out, piece, buf)
                print(
                    f"round {r + 1}: idle {idle:.0f} s, {piece >> 10} KiB writes: "
                    f"{wall:.2f} s wall, {sys_s:.2f} s sys",
                    flush=True,
                )
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
