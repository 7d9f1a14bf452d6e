"""What writing into new page-cache pages costs against writing the same
bytes over pages already cached.

    python bench/tools/new_vs_cached.py WRITE_KIB [PATH]

pwrites 1 GiB of one WRITE_KIB buffer into a new file (PATH, default
./new_vs_cached.bin), then the same 1 GiB over the same file again (its pages
are in the page cache now), and prints wall and system time of each; the file
is removed at the end (findings.md, item 2).
"""

import os
import resource
import sys
import time


def write(label: str, path: str, flags: int, view: memoryview) -> None:
    fd = os.open(path, flags, 0o600)
    t0 = time.perf_counter()
    s0 = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    for offset in range(0, 1 << 30, len(view)):
        os.pwrite(fd, view, offset)
    os.close(fd)
    sys_s = resource.getrusage(resource.RUSAGE_SELF).ru_stime - s0
    kib = len(view) >> 10
    print(f"{label} ({kib} KiB writes): {time.perf_counter() - t0:.2f} s wall, {sys_s:.2f} s sys")


def main() -> None:
    size = int(sys.argv[1]) << 10
    path = sys.argv[2] if len(sys.argv) > 2 else "new_vs_cached.bin"
    view = memoryview(bytearray(os.urandom(size)))
    write("new file", path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, view)
    write("over cached pages", path, os.O_WRONLY, view)
    os.unlink(path)


if __name__ == "__main__":
    main()
