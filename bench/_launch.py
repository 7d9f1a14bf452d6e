"""Start one command for bench/_common.run() and account for it.

    python -I -S _launch.py FD COMMAND [ARG...]

Why a separate, small process: on Linux a process's ru_maxrss starts at the
peak RSS of the memory image it replaced at exec, and subprocess starts
children with vfork, which hands them the parent's image: every command the
bench process started itself would report at least the bench's own peak
(hundreds of MiB once it has handled a data set). This launcher imports only
os, sys, json and time, forks and execs the command, so the command's peak
RSS is its own (or the launcher's few MiB, whichever is larger).

It writes to FD the command's pid, as soon as it runs, then one JSON line:
wall seconds (from before the fork to the exit), the epoch time of the fork
(to place a command's own timestamps, e.g. ckpt's --log-json events, on its
time line), the wait status, ru_maxrss, user and system CPU seconds (the
command and the children it reaped) and the command's /proc/PID/io (read
after the exit, before the reap).
"""

import json
import os
import sys
import time


def main() -> None:
    fd, argv = int(sys.argv[1]), sys.argv[2:]
    os.set_inheritable(fd, False)  # the command must not hold the report pipe
    wall0 = time.time()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(argv[0], argv)
        except OSError as exc:
            os.write(2, f"bench: cannot run {argv[0]}: {exc}\n".encode())
        os._exit(127)
    os.write(fd, f"{pid}\n".encode())
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    seconds = time.perf_counter() - t0
    io = {}
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            key, _, value = line.partition(":")
            io[key] = int(value)
    _pid, status, usage = os.wait4(pid, 0)
    result = {
        "seconds": seconds,
        "wall0": wall0,
        "status": os.waitstatus_to_exitcode(status),
        "maxrss_kib": usage.ru_maxrss,
        "utime": usage.ru_utime,
        "stime": usage.ru_stime,
        "rchar": io["rchar"],
        "wchar": io["wchar"],
    }
    os.write(fd, (json.dumps(result) + "\n").encode())


if __name__ == "__main__":
    main()
