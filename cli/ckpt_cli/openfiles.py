"""Which files under --dir the job holds open for writing, and whether a
writer only appends (a log: never holds a snapshot back) or rewrites in place
(a save in progress: its new content waits for the close).

`scan(pids, root)` reads /proc/PID/fd (readlink, relative to an open
/proc/PID/fd) of each process of the job (ckpt is the job's subreaper:
`subtree.live(os.getpid())` lists them; `job_scan` does both) and, for the
descriptors that point below root, /proc/PID/fdinfo/N (`flags:`, octal: the
access mode, O_APPEND; `pos:`). Sockets, pipes, anonymous inodes and files
elsewhere cost one readlink each; files unlinked while open ("... (deleted)"
with a link count of 0) are left out (no snapshot can hold them); paths come
from readlink as bytes, so newlines and any other byte are kept. A process
that exits mid-scan, or a descriptor closed mid-scan, is simply not there.
A process whose descriptors cannot be read (another user's), or a scan that
stops at MAX_FDS descriptors or BUDGET seconds, gives complete=False:
absence from the result then proves nothing (rely on the format checks and
the close events). Cost: ~5-6 us of CPU per descriptor; 64 processes x
1,000 descriptors: 0.39-0.44 s of CPU (1.0-1.2 s wall on 2 cores at load
13, where the 1 s budget stops it at ~50,000 descriptors); 8 processes x
200: 9 ms of CPU, 12-17 ms wall. Run it off the supervisor's loop thread.

The rule: appender or rewriter (`writer_kind`, a pure function)
-----------------------------------------------------------------
Evidence, strongest first:
1. The file shrank since the last snapshot (size < the size it held then):
   rewriter. An `open(p, "w")` truncates to 0; ftruncate shrinks.
2. The bytes the last snapshot holds changed (prefix_unchanged False):
   rewriter.
3. Open with O_APPEND (by every holder): appender. The kernel puts every
   write at the end; only a truncate could rewrite, and rule 1 sees that.
4. The bytes the last snapshot holds are unchanged and the file grew (or
   kept its size): appender, whatever the open flags (TensorBoard's event
   writer opens with "wb", without O_APPEND, and only appends).
5. Not compared (no earlier version, or not read yet) and the name is a
   log's (`events.out.tfevents.*`, *.log, *.jsonl, *.ndjson, *.csv, *.tsv,
   *.out, *.err): appender.
6. No earlier version, but ckpt looked at the file before (a snapshot it
   held back a few seconds ago), and since then the file only grew and the
   bytes it looked at then (the first and the last 64 KiB of that size) are
   unchanged (since_look): appender.
7. Otherwise: rewriter (open for writing: in progress; closed: an ordinary
   change, which counts as activity).
O_TRUNC is not evidence: the kernel drops it from a descriptor's flags after
open(), so /proc never shows it; rule 1 sees its effect. A save in progress
also only grows (torch.save writes front to back), so an appender by rules
4 and 6, evidence from bytes alone (`WriterKind.checked`), still gets its
format check: a recognised format that fails it is a save in progress, not
a log. A misjudged appender of an unrecognised format costs what ckpt did
before it knew of writers (the file is taken as it is); a misjudged
rewriter holds snapshots back until the settle timeout.

The prefix hook (for the snapshotter): whether the previous snapshot's bytes
of a file are unchanged is known only while reading it, from chunk digests:
`prefix_kept(old_chunks, old_size, new_chunks, chunk_size, tail_digest)`
compares the old version's full chunks with the new version's first ones, and
the digest of the new bytes [full chunks x chunk_size, old_size) (one extra
hash of less than a chunk, for a file that grew) with the old last chunk's.
An appender's full chunks are unchanged, so none of them is uploaded again.

Watchdog: which events mean "closed after writing" (watchdog 7.1.1)
-------------------------------------------------------------------
The inotify emitter turns IN_CLOSE_WRITE into FileClosedEvent (event_type
"closed", followed by a DirModifiedEvent of the parent), IN_CLOSE_NOWRITE
into FileClosedNoWriteEvent ("closed_no_write") and IN_OPEN into
FileOpenedEvent ("opened", whatever the access mode: it cannot tell a write
open). IN_CLOSE_WRITE comes at each close of a descriptor that was open for
writing, also the kernel's when the process exits or is killed, and also
while another descriptor still holds the file open for writing; a kernel
queue overflow arrives as one EventsLostEvent ("events_lost") per watch.

Wiring, for an automatic snapshot (the integrator's part):
1. pinned = snapshotter.pin(), then scan = job_scan(root): after the pin, so
   a file open for writing at the scan may be mid-write in the pin.
2. Each file that changed since the last snapshot (the stat cache says
   which): kind = writer_kind(rel, scan.flags(rel), size=pinned size,
   prev_size=parent entry's size, prefix_unchanged=None). Open and rewriter:
   in progress ("open for writing by pid N"). Appender: taken as pinned, no
   format check (a log named .json may hold JSON lines). Otherwise:
   formats.check_file(root / rel, rel=rel, fd=pinned fd, size=pinned size);
   ok False: in progress ("failed the zip check: ..."). Then
   formats.check_tree(pinned.entries, changed=...) for directories.
3. Nothing in progress: snapshot(pinned=...). While reading, a file open
   without O_APPEND and not a log by name may still prove an appender
   (rule 4): compute prefix_kept from the digests and ask again.
   Something in progress: keep the previous snapshot as the newest and wait
   (a "closed" event on a waited-for path is the cue to try again at once;
   also poll every few seconds, as a close can be coalesced and an overflow
   loses it; "events_lost": rescan everything), up to the settle timeout.
4. "opened" and "closed_no_write" events need no handling (ckpt's own reads
   make them: schedule the observer with an event_filter without them to
   save wake-ups). "modified"/"closed" events on a path whose last
   writer_kind was appender and whose size has not shrunk (one stat) do
   not restart the quiet period. A writer killed mid-save closes its file
   too: only the format check can tell that file is torn.
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ckpt_cli import processes as subtree

O_ACCMODE = 0o3
#: Descriptors looked at in one scan, and its seconds, at the most: beyond
#: either the scan stops incomplete (a job with 64 x 1,000 descriptors).
MAX_FDS = 100_000
BUDGET = 1.0
#: Names of files that only ever grow (rule 5).
LOG_SUFFIXES = (".log", ".jsonl", ".ndjson", ".csv", ".tsv", ".out", ".err")
LOG_PREFIXES = ("events.out.tfevents.",)
_DELETED = b" (deleted)"


@dataclass(frozen=True)
class Holder:
    """One descriptor open for writing on a file."""

    pid: int
    fd: int
    flags: int  # as in /proc/PID/fdinfo/N: access mode, O_APPEND, O_CLOEXEC...
    pos: int  # the descriptor's offset

    @property
    def append(self) -> bool:
        return bool(self.flags & os.O_APPEND)


@dataclass(frozen=True)
class OpenScan:
    #: Relative path (as snapshotter.scan names files) -> its write descriptors.
    files: dict[str, tuple[Holder, ...]]
    #: False: a process could not be read or the cap was hit; a file missing
    #: from `files` may still be open.
    complete: bool
    pids: int = 0  # processes whose descriptors were read
    fds: int = 0  # descriptors looked at
    denied: tuple[int, ...] = ()
    seconds: float = 0.0

    def flags(self, rel: str) -> int | None:
        """The open flags that speak for the file: O_APPEND only if every
        holder has it; None if no process holds it open for writing."""
        holders = self.files.get(rel)
        if not holders:
            return None
        flags = 0
        for h in holders:
            flags |= h.flags
        if not all(h.append for h in holders):
            flags &= ~os.O_APPEND
        return flags


def scan(
    pids: Iterable[int],
    root: str | os.PathLike[str],
    *,
    max_fds: int = MAX_FDS,
    budget: float = BUDGET,
    proc: str = "/proc",
) -> OpenScan:
    """The files below root that the processes `pids` hold open for writing;
    stops (complete=False) after max_fds descriptors or `budget` seconds."""
    t0 = time.monotonic()
    deadline = t0 + budget
    prefix = os.fsencode(os.path.realpath(root)).rstrip(b"/") + b"/"
    base = os.fsencode(proc)
    files: dict[str, list[Holder]] = {}
    denied: list[int] = []
    seen = read = 0
    complete = True
    for pid in dict.fromkeys(pids):
        if seen >= max_fds or time.monotonic() > deadline:
            complete = False
            break
        try:
            dfd = os.open(b"%s/%d/fd" % (base, pid), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except PermissionError:
            denied.append(pid)
            complete = False
            continue
        except OSError:
            continue  # exited (or never was): it holds nothing open
        try:
            names = os.listdir(dfd)
            read += 1
            for i, name in enumerate(names):
                if seen >= max_fds or (i % 256 == 255 and time.monotonic() > deadline):
                    complete = False
                    break
                seen += 1
                found = _holder(pid, dfd, name, prefix, base)
                if found is not None:
                    files.setdefault(found[0], []).append(found[1])
        except OSError:
            pass  # the process exited while its descriptors were listed
        finally:
            os.close(dfd)
    return OpenScan(
        {k: tuple(v) for k, v in files.items()},
        complete,
        read,
        seen,
        tuple(denied),
        time.monotonic() - t0,
    )


def _holder(pid: int, dfd: int, name: str, prefix: bytes, base: bytes) -> tuple[str, Holder] | None:
    """(relative path, holder) if descriptor `name` of pid (dfd: its
    /proc/PID/fd) is a file below the root (prefix) open for writing."""
    link = os.fsencode(name)
    try:
        target = os.readlink(link, dir_fd=dfd)
    except OSError:
        return None  # closed, or the process exited, since the listing
    if not target.startswith(prefix):
        return None  # a socket, a pipe, a file elsewhere
    if target.endswith(_DELETED):  # unlinked while open, unless its name ends so
        try:
            if os.stat(link, dir_fd=dfd).st_nlink == 0:
                return None
        except OSError:
            return None
    got = _fdinfo(b"%s/%d/fdinfo/%s" % (base, pid, link))
    if got is None or got[0] & O_ACCMODE == os.O_RDONLY:
        return None
    return os.fsdecode(target[len(prefix) :]), Holder(pid, int(name), got[0], got[1])


def _fdinfo(path: bytes) -> tuple[int, int] | None:
    """(flags, pos) of /proc/PID/fdinfo/N; None if it is gone."""
    try:
        with open(path, "rb") as f:
            text = f.read(4096)
    except OSError:
        return None
    flags = pos = None
    for line in text.splitlines():
        key, _, value = line.partition(b":")
        if key == b"flags":
            flags = int(value.strip(), 8)
        elif key == b"pos":
            pos = int(value.strip())
    return None if flags is None else (flags, pos or 0)


class Role(enum.Enum):
    APPENDER = "appender"  # taken as its current prefix; growing is not activity
    REWRITER = "rewriter"  # open: in progress; closed: an ordinary change


@dataclass(frozen=True)
class WriterKind:
    role: Role
    reason: str
    #: An appender by bytes alone (rules 4 and 6): its format check still
    #: decides, as a save in progress only grows too.
    checked: bool = False

    @property
    def appender(self) -> bool:
        return self.role is Role.APPENDER


def describe_holders(holders: Sequence[Holder], proc: str = "/proc") -> str:
    """'pid 123 (python)', or 'pids 123 (python), 124 (torchrun)': who holds
    a file open for writing, for a line a user reads (the command name is
    the kernel's comm, at most 15 bytes)."""
    pids = sorted({h.pid for h in holders})
    named = []
    for pid in pids[:3]:
        try:
            with open(f"{proc}/{pid}/comm", "rb") as f:
                comm = f.read(64).decode("utf-8", "replace").strip()
        except OSError:
            comm = ""
        named.append(f"{pid} ({comm})" if comm else str(pid))
    more = f" and {len(pids) - 3} more" if len(pids) > 3 else ""
    return f"pid{'s' if len(pids) > 1 else ''} {', '.join(named)}{more}"


def is_log_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.endswith(LOG_SUFFIXES) or base.startswith(LOG_PREFIXES)


def writer_kind(
    name: str,
    flags: int | None,
    *,
    size: int,
    prev_size: int | None,
    prefix_unchanged: bool | None,
    since_look: bool | None = None,
) -> WriterKind:
    """Appender or rewriter (the rule in the module docstring).

    name: the relative path; flags: OpenScan.flags(name), None when no
    process of the job holds it open for writing; size: its size now;
    prev_size: its size in the last snapshot (None: not in it);
    prefix_unchanged: whether those prev_size bytes are unchanged (None:
    not known, e.g. not read yet); since_look: whether the file only grew,
    the bytes ckpt read at its last look unchanged, since that look (None:
    no look, or not compared; False: it shrank or they changed)."""
    if prev_size is not None and size < prev_size:
        return WriterKind(Role.REWRITER, f"shrank from {prev_size} to {size} bytes")
    if prefix_unchanged is False:
        return WriterKind(Role.REWRITER, "rewrote bytes the last snapshot holds")
    if since_look is False:
        return WriterKind(Role.REWRITER, "rewritten since ckpt last looked")
    if flags is not None and flags & os.O_APPEND:
        return WriterKind(Role.APPENDER, "open with O_APPEND")
    if prefix_unchanged and prev_size is not None:
        return WriterKind(Role.APPENDER, "only grew since the last snapshot", checked=True)
    if prefix_unchanged is None and is_log_name(name):
        return WriterKind(Role.APPENDER, "a log, by its name")
    if prefix_unchanged is None and since_look:
        return WriterKind(Role.APPENDER, "only grew since ckpt last looked", checked=True)
    return WriterKind(Role.REWRITER, "open for writing" if flags is not None else "changed")


def prefix_kept(
    old_chunks: Sequence[str],
    old_size: int,
    new_chunks: Sequence[str],
    chunk_size: int,
    tail_digest: str | None,
) -> bool | None:
    """Are a file's old bytes (the last snapshot's version: old_chunks,
    old_size) the start of its new version (new_chunks, same chunking)?
    tail_digest: the digest of the new file's bytes over the old last
    partial chunk, [old_size // chunk_size * chunk_size, old_size), or None
    if not taken (then the answer is None unless a full chunk differs).
    The result is writer_kind's prefix_unchanged."""
    full = old_size // chunk_size
    if list(new_chunks[:full]) != list(old_chunks[:full]):
        return False
    if old_size % chunk_size == 0:
        return True
    if tail_digest is None or len(old_chunks) <= full:
        return None
    return tail_digest == old_chunks[full]


def job_scan(root: str | os.PathLike[str], *, below: int | None = None) -> OpenScan:
    """scan() of every process below `below` (default: this process, the
    job's subreaper)."""
    pids = [p.pid for p in subtree.live(os.getpid() if below is None else below)]
    return scan(pids, Path(root))
