"""Reading changed files for a snapshot: chunks of many files in flight at
once on a small thread pool (the hash releases the GIL), each chunk hashed
and put to the repository, with open descriptors and buffers bounded. A
file that changes while it is read, vanishes, or cannot be read is told
apart (`Outcome`): the snapshotter keeps its previous version.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import errno
import os
import stat
import threading
from collections.abc import Generator, Iterable
from pathlib import Path
from typing import Protocol

from ckpt_cli.dirscan import LocalEntry
from ckpt_cli.progress import Stat
from ckpt_cli.repository import Buffers, Repository

#: Files being read at once (open descriptors) at the most.
MAX_OPEN_FILES = 64
#: How files are opened for reading: never through a symlink, and without
#: blocking (a FIFO put in a file's place since the scan must not hang a snapshot).
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
#: Errors opening a file scanned a moment ago that mean it is no longer there
#: as a file (deleted, replaced by a link, a parent replaced), or busy (a lease
#: of another process): it changed, and the next snapshot looks again. Running
#: out of descriptors or memory is ckpt's own failure and raised as it is;
#: every other error means ckpt cannot read the file.
VANISHED = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EAGAIN})
OWN_FAILURE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})
#: Files of one chunk or less go to the pool this many (or a chunk's worth of
#: bytes) to a task: a future and a semaphore round per small file cost more
#: than reading it (bench/ case 4: 10,000 files of 1-64 KiB).
SMALL_BATCH_FILES = 64
#: Files up to this size, written to a local repository, are read, hashed and
#: written by one thread of their own: their work is a dozen short system
#: calls each, and with several threads every call hands the GIL over (a
#: futex wake and a context switch apiece). First push of 5,000 files, one
#: thread against four (medians of 4, findings "small files, one thread"):
#: 4 KiB 0.70 / 1.00 s, 16 KiB 0.97 / 0.99 s, 64 KiB 2.64 / 1.86 s: above
#: about 16 KiB the kernel's copies into the page cache gain from threads.
TINY = 16 * 1024

#: A file's chunk digests; None: it changed while read; a str: why it could
#: not be read.
Outcome = tuple["LocalEntry", tuple[str, ...] | str | None]


@dataclasses.dataclass
class _Big:
    """A file of several chunks being read: its chunks are separate tasks."""

    entry: LocalEntry
    fd: int
    st: os.stat_result
    futures: list[cf.Future[str]]


class _Changed(Exception):
    """The file changed while it was being read."""


class _Unreadable(Exception):
    """Reading the file failed (not the remote): the reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def open_error(exc: OSError) -> str | None:
    """An error opening a scanned file: None if the file vanished or changed,
    else why it cannot be read; ckpt's own failures are raised."""
    if exc.errno in VANISHED:
        return None
    if exc.errno in OWN_FAILURE:
        raise exc
    return reason(exc)


class Counts(Protocol):
    """What a read adds up (a SnapshotResult)."""

    files_read: int
    bytes_read: int
    new_bytes: int
    new_chunks: int


class ChunkReader:
    """Reads, hashes and puts the chunks of a snapshot's changed files."""

    def __init__(self, repo: Repository, root: Path, concurrency: int) -> None:
        self.repo = repo
        self.root = root
        self._pool = cf.ThreadPoolExecutor(concurrency, thread_name_prefix="ckpt-chunk")
        #: Batches of TINY files when chunks are written locally (see TINY);
        #: to a remote they go to the pool, so their round trips overlap.
        self._tiny_pool = (
            cf.ThreadPoolExecutor(1, thread_name_prefix="ckpt-tiny") if repo.local_io else None
        )
        self._slots = threading.BoundedSemaphore(concurrency + 2)
        self._buffers = Buffers(repo.chunk_size)
        self._stats_lock = threading.Lock()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._tiny_pool is not None:
            self._tiny_pool.shutdown(wait=False, cancel_futures=True)

    def read_files(
        self,
        files: list[LocalEntry],
        result: Counts,
        pinned: dict[str, tuple[int, os.stat_result]] | None = None,
        expect: dict[str, Stat] | None = None,
        growing: dict[str, int] | None = None,
    ) -> Generator[Outcome, None, None]:
        """Yield (file, chunk digests), (file, None) if it changed while read,
        or (file, why) if it could not be read, in no particular order.
        Chunks of many files are in flight at once; descriptors stay bounded.
        Files of one chunk or less go to the pool in batches, each read whole
        by one task (see SMALL_BATCH_FILES).

        expect: the stat each file had when it was judged; one that differs
        at the read changed since (None). growing: appenders -> the size
        judged: that prefix is read, and the file may grow meanwhile."""
        rules = Rules(expect or {}, growing or {})
        pending: collections.deque[_Big | cf.Future[list[Outcome]]] = collections.deque()
        open_big = 0
        chunk = self.repo.chunk_size
        batches: dict[bool, list[LocalEntry]] = {False: [], True: []}  # by tiny
        batch_bytes = {False: 0, True: 0}

        def submit_batch(tiny: bool) -> None:
            pool = self._tiny_pool if tiny and self._tiny_pool is not None else self._pool
            self._slots.acquire()
            pending.append(pool.submit(self._small_task, batches[tiny], pinned, result, rules))
            batches[tiny], batch_bytes[tiny] = [], 0

        def pop_head() -> Iterable[Outcome]:
            nonlocal open_big
            head = pending.popleft()
            if isinstance(head, _Big):
                open_big -= 1
                return [self._finish(head, result, rules)]
            return head.result()

        def head_done() -> bool:
            head = pending[0]
            if isinstance(head, _Big):
                return all(f.done() for f in head.futures)
            return head.done()

        try:
            for le in files:
                size = rules.size(le)
                if size <= chunk:
                    tiny = size <= TINY
                    batches[tiny].append(le)
                    batch_bytes[tiny] += le.size
                    if len(batches[tiny]) >= SMALL_BATCH_FILES or batch_bytes[tiny] >= chunk:
                        submit_batch(tiny)
                else:
                    big = self._submit_big(le, result, pinned, rules)
                    if isinstance(big, _Big):
                        pending.append(big)
                        open_big += 1
                    else:
                        yield big
                while pending and (open_big > MAX_OPEN_FILES or head_done()):
                    yield from pop_head()
            for tiny in (False, True):
                if batches[tiny]:
                    submit_batch(tiny)
            while pending:
                yield from pop_head()
        finally:
            for item in pending:
                if isinstance(item, _Big):
                    cf.wait(item.futures)
                    os.close(item.fd)
                else:
                    cf.wait([item])

    def _open(
        self, le: LocalEntry, pinned: dict[str, tuple[int, os.stat_result]] | None
    ) -> tuple[int, os.stat_result] | None:
        """A descriptor on the file and its stat; None if it is gone or no
        longer a regular file; _Unreadable if it cannot be opened. A pinned
        file is read through a duplicate of its pin (closed after), so the pin
        survives a failed upload; its stat is the one taken at pin time, so a
        change in place since shows."""
        if pinned is not None and le.path in pinned:
            pinned_fd, st = pinned[le.path]
            fd = os.dup(pinned_fd)
        else:
            try:
                fd = os.open(self.root / le.path, OPEN_FLAGS)
            except OSError as exc:
                why = open_error(exc)
                if why is None:
                    return None  # vanished or replaced by a link since the scan
                raise _Unreadable(why) from None
            st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return None
        return fd, st

    def _submit_big(
        self,
        le: LocalEntry,
        result: Counts,
        pinned: dict[str, tuple[int, os.stat_result]] | None,
        rules: Rules,
    ) -> _Big | Outcome:
        try:
            opened = self._open(le, pinned)
        except _Unreadable as exc:
            return le, exc.reason
        if opened is None:
            return le, None
        fd, st = opened
        taken = rules.take(le.path, st)
        if taken is None:
            os.close(fd)
            return le, None
        size, mtime_ns = taken
        big = _Big(dataclasses.replace(le, size=size, mtime_ns=mtime_ns, ino=st.st_ino), fd, st, [])
        chunk = self.repo.chunk_size
        for offset in range(0, size, chunk):
            self._slots.acquire()
            big.futures.append(
                self._pool.submit(self._chunk_task, fd, offset, min(chunk, size - offset), result)
            )
        return big

    def _chunk_task(self, fd: int, offset: int, length: int, result: Counts) -> str:
        try:
            with self._buffers.view(length) as view:
                try:
                    got = os.preadv(fd, [view], offset)
                except OSError as exc:
                    raise _Unreadable(reason(exc)) from None
                if got != length:
                    raise _Changed
                digest = self.repo.hash(view)
                if self.repo.borrows_buffers:
                    sent = self.repo.put_chunk(digest, view)
                else:  # the buffer goes back to the pool while the copy uploads
                    payload = bytes(view)
            if not self.repo.borrows_buffers:
                sent = self.repo.put_chunk(digest, payload)
            with self._stats_lock:
                result.bytes_read += length
                if sent:
                    result.new_bytes += length
                    result.new_chunks += 1
            return digest
        finally:
            self._slots.release()

    def _finish(self, big: _Big, result: Counts, rules: Rules) -> Outcome:
        le, fd, before = big.entry, big.fd, big.st
        try:
            cf.wait(big.futures)  # none may read fd once it is closed
            digests = tuple(f.result() for f in big.futures)
            after = os.fstat(fd)
            if le.path in rules.growing:  # an appender: its prefix is taken
                os.close(fd)
                fd = -1
                with self._stats_lock:
                    result.files_read += 1
                return le, (digests if after.st_size >= le.size else None)
            grew = os.pread(fd, 1, before.st_size) != b""
        except _Changed:
            return le, None
        except _Unreadable as exc:
            return le, exc.reason
        except OSError as exc:  # the fstat or pread above: the local file
            return le, reason(exc)
        finally:
            if fd >= 0:
                os.close(fd)
        with self._stats_lock:
            result.files_read += 1
        if grew or (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            return le, None
        return le, digests

    def _small_task(
        self,
        batch: list[LocalEntry],
        pinned: dict[str, tuple[int, os.stat_result]] | None,
        result: Counts,
        rules: Rules,
    ) -> list[Outcome]:
        """Read, hash and put whole files of at most one chunk, one after the
        other, through one buffer."""
        try:
            with self._buffers.view(self.repo.chunk_size) as buf:
                return [self._read_small(le, buf, pinned, result, rules) for le in batch]
        finally:
            self._slots.release()

    def _read_small(
        self,
        le: LocalEntry,
        buf: memoryview,
        pinned: dict[str, tuple[int, os.stat_result]] | None,
        result: Counts,
        rules: Rules,
    ) -> Outcome:
        try:
            opened = self._open(le, pinned)
        except _Unreadable as exc:
            return le, exc.reason
        if opened is None:
            return le, None
        fd, before = opened
        appender = le.path in rules.growing
        try:
            taken = rules.take(le.path, before)
            if taken is None:
                return le, None  # changed since it was judged
            size, mtime_ns = taken
            if size > len(buf):
                return le, None  # grew past a chunk since the scan: read it next time
            # One byte more than the size, where the buffer has room: a file
            # that grew meanwhile shows as a longer read (an appender's
            # prefix alone is read: it may grow).
            try:
                got = os.preadv(fd, [buf[: size + (0 if appender else 1)]], 0)
                longer = not appender and size == len(buf) and os.pread(fd, 1, size) != b""
            except OSError as exc:
                return le, reason(exc)
            if got != size or longer:
                return le, None
            view = buf[:size]
            digests: tuple[str, ...] = ()
            sent = False
            if size:
                digest = self.repo.hash(view)
                sent = self.repo.put_chunk(digest, view)
                digests = (digest,)
            view.release()
            after = os.fstat(fd)
        finally:
            os.close(fd)
        with self._stats_lock:
            result.files_read += 1
            result.bytes_read += size
            if sent:
                result.new_bytes += size
                result.new_chunks += 1
        if appender:
            if after.st_size < size:
                return le, None
        elif (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            return le, None
        return (
            dataclasses.replace(le, size=size, mtime_ns=mtime_ns, ino=before.st_ino),
            digests,
        )


@dataclasses.dataclass(frozen=True)
class Rules:
    """What a read must find (see _read_files)."""

    expect: dict[str, Stat]
    growing: dict[str, int]

    def size(self, le: LocalEntry) -> int:
        judged = self.expect.get(le.path)
        return judged[0] if judged is not None else le.size

    def take(self, path: str, st: os.stat_result) -> tuple[int, int] | None:
        """(size, mtime_ns) to read and record of the file whose descriptor
        has stat st; None if it changed since it was judged."""
        judged = self.expect.get(path)
        if judged is None:
            return st.st_size, st.st_mtime_ns
        size, mtime_ns, ino = judged
        if path in self.growing:  # an appender: the prefix judged, if it is still there
            ok = st.st_ino == ino and st.st_size >= size
        else:
            ok = (st.st_size, st.st_mtime_ns, st.st_ino) == judged
        return (size, mtime_ns) if ok else None
