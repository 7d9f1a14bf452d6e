"""Every process ckpt started, not only the child's process group: what an init
(PID 1 of a container) owes its subtree.

ckpt makes itself a child subreaper (PR_SET_CHILD_SUBREAPER), so a process of
the job whose parent dies (a data-loader worker, a shell's background job, a
daemon that called setsid) is re-parented to ckpt instead of to the machine's
init. `reap` collects those orphans' exit statuses so no zombie piles up, and
`live` finds every process below ckpt, also those that left the child's group,
so a stop reaches all of them. Linux only (prctl, /proc); elsewhere the
subreaper is off and `live` sees nothing, which leaves the group as the unit.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return fn


def is_subreaper() -> bool:
    prctl = _prctl()
    if prctl is None:
        return False
    flag = ctypes.c_int(0)
    return prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0) == 0 and flag.value != 0


def set_subreaper(on: bool) -> bool:
    """Turn the subreaper attribute of this process on or off; False if the
    kernel refused (or this is not Linux)."""
    prctl = _prctl()
    return prctl is not None and prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    pgid: int
    state: str  # one letter of /proc/PID/stat: R, S, D, T, Z (zombie), X or x (dead)

    @property
    def gone(self) -> bool:
        return self.state in ("Z", "X", "x")


def pid_alive(pid: int) -> bool:
    """A process with this pid exists in this PID namespace (a zombie counts;
    another user's too). A pid from another namespace means nothing here."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stat(pid: int | str) -> tuple[int, list[bytes]] | None:
    """pid's /proc/PID/stat: the pid it names, and its fields from the state
    on (field 3 of proc(5) at index 0); None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # "PID (COMM) STATE PPID PGRP ...": COMM may hold spaces and parentheses.
    try:
        return int(data[: data.index(b" ")]), data[data.rfind(b")") + 2 :].split()
    except ValueError:
        return None


def read_proc(pid: int | str) -> Proc | None:
    """pid's line of /proc/PID/stat; None if there is no such process."""
    stat = _stat(pid)
    if stat is None:
        return None
    fields = stat[1]
    try:
        return Proc(int(pid), int(fields[1]), int(fields[2]), fields[0].decode("ascii"))
    except (IndexError, ValueError, UnicodeDecodeError):
        return None


def start_time(pid: int | str) -> int | None:
    """When pid started, in clock ticks after boot (field 22 of /proc/PID/stat):
    with the pid, it names one process for as long as the machine runs (a pid
    is reused, a pid and its start time are not). None if unknown."""
    stat = _stat(pid)
    try:
        return int(stat[1][19]) if stat is not None else None
    except (IndexError, ValueError):
        return None


def proc_is_ours() -> bool:
    """/proc shows this process's own PID namespace, so /proc/PID is the
    process os.kill(PID) reaches (not so under a /proc mounted for another
    namespace, e.g. `unshare --pid` without --mount-proc)."""
    stat = _stat("self")
    return stat is not None and stat[0] == os.getpid()


#: /proc is there and shows this PID namespace: its pids are the ones os.kill
#: reaches. Under a /proc of another namespace (`unshare --pid` without
#: --mount-proc) its pids would name other processes: nothing is read from it,
#: and the child's process group is the unit, as without /proc.
HAVE_PROC = os.path.isdir("/proc/self/task") and proc_is_ours()


def processes() -> list[Proc]:
    """Every process of this PID namespace (an empty list without /proc)."""
    if not HAVE_PROC:
        return []
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    return [p for name in names if name.isdigit() and (p := read_proc(name)) is not None]


def children(pid: int) -> list[Proc]:
    """The direct children of pid, from /proc/PID/task/*/children when the
    kernel has it (cheap), else from a scan of every process."""
    if not HAVE_PROC:
        return []
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        for tid in tasks:
            with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
                found.extend(int(c) for c in f.read().split())
    except (OSError, ValueError):
        return [p for p in processes() if p.ppid == pid]
    return [p for c in found if (p := read_proc(c)) is not None]


def live(root: int, *, pgid: int | None = None, exclude: Collection[int] = ()) -> list[Proc]:
    """Processes still running below root (its descendants, at any depth) and
    members of process group pgid wherever they are; a process in exclude and
    everything below it are left out. Zombies are not running."""
    procs = processes()
    below: dict[int, list[Proc]] = {}
    for p in procs:
        below.setdefault(p.ppid, []).append(p)
    found: dict[int, Proc] = {}
    todo = [root]
    while todo:
        for p in below.get(todo.pop(), ()):
            if p.pid not in exclude and p.pid not in found:
                found[p.pid] = p
                todo.append(p.pid)
    if pgid is not None:
        found.update({p.pid: p for p in procs if p.pgid == pgid and p.pid not in exclude})
    return [p for p in found.values() if not p.gone]


def reap(keep: Collection[int] = ()) -> list[int]:
    """Collect every exited child of this process but those in keep (whose
    owners wait for them themselves); return the pids reaped."""
    reaped: list[int] = []
    for p in children(os.getpid()):
        if p.state == "Z" and p.pid not in keep:
            with contextlib.suppress(ChildProcessError):
                pid, _status = os.waitpid(p.pid, os.WNOHANG)
                if pid:
                    reaped.append(pid)
    return reaped


def send(procs: Iterable[Proc], sig: int) -> None:
    for p in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p.pid, sig)
