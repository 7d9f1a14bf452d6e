"""Buffered writes from several threads at once, by the size of each call.

    python bench/tools/pwrite_threads.py THREADS WRITE_KIB [OUTDIR]

THREADS threads write 10 files of 100 MiB into OUTDIR (default
/tmp/pwrite_threads) between them, each with its own 8 MiB buffer of random
bytes and os.pwrite calls of WRITE_KIB, as ckpt's restore and push threads
write chunks; prints the wall time and the system time. Alternate sizes,
with `rm -rf OUTDIR; sync` between runs (findings.md, "a quiet machine").
"""

import os
import resource
import sys
import threading
import time


def main() -> None:
    threads, step = int(sys.argv[1]), int(sys.argv[2]) << 10
    out = sys.argv[3] if len(sys.argv) > 3 else "/tmp/pwrite_threads"
    os.makedirs(out, exist_ok=True)
    buffers = [memoryview(bytearray(os.urandom(8 << 20))) for _ in range(threads)]
    todo, lock = list(range(10)), threading.Lock()

    def work(k: int) -> None:
        view = buffers[k]
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            fd = os.open(f"{out}/f{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                offset = 0
                while offset < 100 << 20:
                    for start in range(0, len(view), step):
                        os.pwrite(fd, view[start : start + step], offset)
                        offset += step
            finally:
                os.close(fd)

    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(
        f"threads={threads} writes of {step >> 10} KiB: {time.perf_counter() - t0:.2f} s wall, "
        f"{r1.ru_stime - r0.ru_stime:.2f} s sys"
    )


if __name__ == "__main__":
    main()
