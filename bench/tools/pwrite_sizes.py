"""How much a buffered write costs by the size of each write call.

    python bench/tools/pwrite_sizes.py BUFFER_KIB WRITE_KIB OUTDIR [FILL_MIB] [THREADS]

Writes 10 files of 100 MiB into OUTDIR with os.pwrite, each call writing
WRITE_KIB of one BUFFER_KIB buffer of random bytes (the way ckpt restore writes
8 MiB chunks), and prints the wall time and the system time. With FILL_MIB,
first writes that many MiB of other data into OUTDIR/fill (no sync): the page
cache full of dirty data, as after a training job's own large write. With
THREADS, that many threads share the 10 files, each with a buffer of its own,
as ckpt's restore and push threads write chunks (FILL_MIB 0 for none).
Run it a few times, alternating sizes, with `rm -rf OUTDIR; sync` between
(findings.md, item 1 and "a quiet machine").
"""

import os
import resource
import sys
import threading
import time


def main() -> None:
    buf_kib, write_kib, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    fill_mib = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    threads = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    os.makedirs(out, exist_ok=True)
    if fill_mib:
        os.makedirs(f"{out}/fill", exist_ok=True)
        block = os.urandom(16 << 20)
        for i in range(fill_mib // 256):
            with open(f"{out}/fill/{i:03d}.bin", "wb") as f:
                for _ in range(16):
                    f.write(block)
    per, step = 100 << 20, write_kib << 10
    todo, lock = list(range(10)), threading.Lock()

    def work() -> None:
        view = memoryview(bytearray(os.urandom(buf_kib << 10)))
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            fd = os.open(f"{out}/f{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            offset = 0
            while offset < per:
                for start in range(0, len(view), step):
                    os.pwrite(fd, view[start : start + step], offset)
                    offset += step
            os.close(fd)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(
        f"buffer {buf_kib} KiB, writes of {write_kib} KiB, {threads} thread(s): "
        f"{time.perf_counter() - t0:.2f} s wall, {r1.ru_stime - r0.ru_stime:.2f} s sys"
    )


if __name__ == "__main__":
    main()
