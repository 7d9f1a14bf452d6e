"""Chunks: file contents in fixed-size, content-addressed objects under
chunks/<h[:2]>/<h> (trash/ holds those a multi-rank GC round took out), and
the chunk room of a Repository: which chunks are known to exist, one upload
of a chunk however many threads put it, and reads verified by the name.

"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator

from ckpt_cli.backends import Backend, NotFound
from ckpt_cli.manifest import HASH_RE

CHUNKS = "chunks/"
#: Chunks a multi-rank GC round took out of chunks/ (see `world`).
TRASH = "trash/"


class ChunkError(Exception):
    """A chunk that is missing or whose bytes do not match its name."""

    def __init__(self, digest: str, problem: str, *, corrupt: bool = False) -> None:
        super().__init__(f"chunk {digest[:12]} {problem}")
        self.digest = digest
        #: Its bytes were read whole and do not hash to its name (not missing,
        #: not of another size): what a second read can tell from a bad transfer.
        self.corrupt = corrupt


class Buffers:
    """Chunk-sized buffers reused by chunk tasks on many threads: reading into
    a fresh bytes object per chunk pays a page fault and zeroing for every
    byte (reads half as fast, bench/ case 1). Memory: one buffer per task
    running at once."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def view(self, length: int) -> Iterator[memoryview]:
        """A writable view of `length` bytes, returned to the pool after,
        unless the block raised: a transfer that timed out may still be
        reading from it or writing into it (a put still sending, a get
        abandoned), so that buffer is left to the garbage collector and never
        handed out again. Nor is it kept alive by the error: the frames the
        error went through (and those of the errors it was raised from) lose
        their locals, where views of the buffer are, so a restore whose
        chunks fail one after another does not hold a chunk of memory per
        failure while it stops (the tracebacks keep their lines)."""
        with self._lock:
            buf = self._free.pop() if self._free else bytearray(self.size)
        view = memoryview(buf)[:length]
        try:
            yield view
        except BaseException as exc:
            view.release()
            del buf, view
            _drop_locals(exc)
            raise
        view.release()
        with self._lock:
            self._free.append(buf)


def _drop_locals(exc: BaseException) -> None:
    """Clear the locals of every finished function frame in exc's traceback
    and in those of the exceptions it was raised from or during. Generator
    and coroutine frames are left alone: clearing one that is suspended
    would close it, perhaps under the event loop of another thread."""
    import inspect

    suspendable = (
        inspect.CO_GENERATOR
        | inspect.CO_COROUTINE
        | inspect.CO_ITERABLE_COROUTINE
        | inspect.CO_ASYNC_GENERATOR
    )
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        tb = e.__traceback__
        while tb is not None:
            if not tb.tb_frame.f_code.co_flags & suspendable:
                with contextlib.suppress(RuntimeError):  # still running
                    tb.tb_frame.clear()
            tb = tb.tb_next
        todo += [e.__cause__, e.__context__]


def chunk_key(digest: str) -> str:
    return f"{CHUNKS}{digest[:2]}/{digest}"


def trash_key(digest: str) -> str:
    return f"{TRASH}{digest[:2]}/{digest}"


def digests(keys: Iterable[str]) -> set[str]:
    """The chunk names among keys."""
    names = (k.rsplit("/", 1)[-1] for k in keys)
    return {d for d in names if HASH_RE.match(d)}


class Chunks:
    """The chunks of one repository. Thread-safe for concurrent puts."""

    def __init__(self, backend: Backend, hash: Callable[[bytes | memoryview], str]) -> None:
        self.backend = backend
        #: The hex digest of a chunk, by the repository's own hash.
        self.hash = hash
        self._known: set[str] | None = None
        self._inflight: dict[str, threading.Event] = {}
        self._distrusted: set[str] = set()
        self._lock = threading.Lock()

    def known(self) -> set[str]:
        with self._lock:
            if self._known is None:
                names = self.backend.list(CHUNKS)
                self._known = {n.rsplit("/", 1)[-1] for n in names} - self._distrusted
            return self._known

    def has(self, digest: str) -> bool:
        return digest in self.known()

    def put(self, digest: str, data: bytes | memoryview) -> bool:
        """Store a chunk unless it is known to exist; True if bytes were sent.
        Concurrent puts of the same digest send it once: the others wait."""
        known = self.known()
        while True:
            with self._lock:
                if digest in known:
                    return False
                busy = self._inflight.get(digest)
                if busy is None:
                    self._inflight[digest] = threading.Event()
                    break
            busy.wait()  # the other put either stored it or failed; look again
        try:
            payload = data if self.backend.borrows_buffers else bytes(data)
            self.backend.write(chunk_key(digest), payload)  # type: ignore[arg-type]
            with self._lock:
                known.add(digest)
        finally:
            with self._lock:
                self._inflight.pop(digest).set()
        return True

    def get(self, digest: str, expected_size: int | None = None) -> bytes:
        """Read and verify a chunk; ChunkError if missing, short or corrupt."""
        if expected_size is not None and self.backend.reads_into:
            # Never more than the expected size in memory (a planted object
            # may be of any size); other backends read the object whole.
            buf = bytearray(expected_size)
            self.read_into(digest, memoryview(buf))
            return bytes(buf)
        try:
            data = self.backend.read(chunk_key(digest))
        except NotFound:
            try:  # taken out by a multi-rank GC round that a late manifest names
                data = self.backend.read(trash_key(digest))
            except NotFound:
                raise ChunkError(digest, "is missing") from None
        if expected_size is not None and len(data) != expected_size:
            raise ChunkError(digest, f"has {len(data)} bytes, expected {expected_size}")
        if self.hash(data) != digest:
            raise ChunkError(digest, "is corrupt (hash mismatch)", corrupt=True)
        return data

    def read_into(self, digest: str, view: memoryview) -> None:
        """Fill view (the chunk's expected size) with the chunk and verify it;
        ChunkError if missing, of another size or corrupt. A backend that can
        (`read_into`: a local directory, fsspec's stores) reads straight into
        view: no allocation per chunk, never more than view in memory."""
        if not self.backend.reads_into:
            view[:] = self.get(digest, len(view))
            return
        read_into = self.backend.read_into
        try:
            size = read_into(chunk_key(digest), view)
        except NotFound:
            try:
                size = read_into(trash_key(digest), view)
            except NotFound:
                raise ChunkError(digest, "is missing") from None
        if size != len(view):
            raise ChunkError(digest, f"has {size} bytes, expected {len(view)}")
        if self.hash(view) != digest:
            raise ChunkError(digest, "is corrupt (hash mismatch)", corrupt=True)

    def forget(self, digest: str) -> None:
        """A chunk found damaged (or deleted): upload it again next time it is
        seen, even if a later listing still shows the damaged object."""
        with self._lock:
            self._distrusted.add(digest)
            if self._known is not None:
                self._known.discard(digest)

    def trust(self, digest: str) -> None:
        """A chunk just read back and verified: it exists and is whole."""
        with self._lock:
            self._distrusted.discard(digest)
            if self._known is not None:
                self._known.add(digest)

    def present(self) -> set[str]:
        """Every readable chunk: chunks/, and trash/, where a multi-node GC
        round keeps them until every rank has seen it (get reads both)."""
        return self.listed() | self.trash()

    def listed(self) -> set[str]:
        """Every chunk in the store, by one listing of chunks/ (never cached:
        `ckpt verify` and `ckpt ls` want the store as it is now)."""
        return digests(self.backend.list(CHUNKS))

    def trash(self) -> set[str]:
        """Every chunk a multi-node GC round moved to trash/, by one listing."""
        return digests(self.backend.list(TRASH))
