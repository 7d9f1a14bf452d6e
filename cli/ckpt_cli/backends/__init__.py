"""Storage backends behind one narrow interface: the protocol, NotFound and
open_backend, which picks the backend a URL names.

A backend stores opaque byte objects under '/'-separated keys relative to the
remote's root. Contract of every method:

- read(key) -> bytes                 NotFound if absent; RemoteError otherwise
- read_into(key, view) -> int        the object read into view, its size
                                     returned (called where `reads_into`)
- write(key, data)                   whole object or nothing visible under key
- create_exclusive(key, data) -> bool  False if key already exists
- delete(key)                        absent is not an error
- rename(src, dst)                   NotFound if src is missing; dst replaced
- list(prefix) -> list[str]          every key below prefix, recursively
- names() -> list[str]               what the location holds, one level down
- display                            the URL without credentials, for messages

and of every capability, which callers ask instead of a backend's class:

- exclusive_create   create_exclusive cannot race (a local disk's hard link
                     or O_EXCL); False: a check, then a put, that a racing
                     writer may still overwrite
- borrows_buffers    write(key, view) has finished with view when it returns:
                     the caller may reuse the buffer
- reads_into         read_into reads straight into the caller's view, never
                     the whole object first where the store can help it
- local_io           reads and writes are this machine's own system calls
                     (a directory), no round trip: small objects are moved
                     by one thread, as hand-offs of the GIL between threads
                     cost more than they overlap

Local paths and file:// URLs use the operating system directly (atomic rename,
O_EXCL: `backends.local`); everything else goes through fsspec (s3, gs, az,
sftp, memory, ...: `backends.fsspec`, the only module that imports fsspec).
Network calls are bounded by a timeout and retried a few times with jittered
backoff before RemoteError; messages never carry credentials (`redact`).
"""

from __future__ import annotations

import re
from typing import Any, Protocol
from urllib.parse import urlsplit

from ckpt_cli import redact
from ckpt_cli.backends.urls import NEEDS_BUCKET, is_local, local_path
from ckpt_cli.errors import ConfigError

#: Names of half-written local objects; never listed as keys.
TEMP_RE = re.compile(r"^\.[^/]*\.tmp-[0-9a-f]+$")
#: Transfers a filesystem is opened for when its user does not say (`ckpt ls`).
DEFAULT_CONCURRENCY = 4


class NotFound(Exception):
    """The object does not exist."""


class Backend(Protocol):
    display: str

    @property
    def exclusive_create(self) -> bool:
        """create_exclusive cannot race (see the module's docstring)."""
        ...

    @property
    def borrows_buffers(self) -> bool:
        """write(key, view) has finished with view when it returns."""
        ...

    @property
    def reads_into(self) -> bool:
        """read_into reads straight into the caller's view."""
        ...

    @property
    def local_io(self) -> bool:
        """Reads and writes wait on no network (see the module's docstring)."""
        ...

    def read(self, key: str) -> bytes: ...
    def read_into(self, key: str, view: memoryview) -> int:
        """Read the object at key into view and return its size: where that
        is len(view), view holds the object; otherwise what view holds is
        undefined (nothing is written beyond it). NotFound if absent."""
        ...

    def write(self, key: str, data: bytes) -> None: ...
    def create_exclusive(self, key: str, data: bytes) -> bool: ...
    def delete(self, key: str) -> None: ...
    def rename(self, src: str, dst: str) -> None:
        """Move an object (server-side where the store can); NotFound if src
        is missing; dst is replaced."""
        ...

    def names(self) -> list[str]:
        """The names one level below the root, temp names left out: [] where
        the location does not exist but could (its bucket, container or
        parent directory does); RemoteError where it cannot, ConfigError
        where it is a file."""
        ...

    def list(self, prefix: str, *, temp: bool = False) -> list[str]:
        """Keys under prefix; with temp, only the temp names of writes that
        never finished (a killed writer's), which are otherwise hidden."""
        ...


def read_whole_into(backend: Backend, key: str, view: memoryview) -> int:
    """read_into for a backend that reads no better: the object, then a copy
    into view where it is view's size; its size either way."""
    data = backend.read(key)
    if len(data) == len(view):
        view[:] = data
    return len(data)


def open_backend(
    url: str,
    storage_options: dict[str, Any] | None = None,
    *,
    io_timeout: float | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> Backend:
    """Open the store at url; ConfigError for a malformed URL or a missing extra.
    io_timeout bounds every network call (default: CKPT_IO_TIMEOUT or 120 s,
    as `config.env_io_timeout` reads and checks it);
    concurrency is how many transfers the caller runs at once (S3's
    connection pool is sized for them)."""
    if not url.strip():
        raise ConfigError("empty remote URL (--remote / CKPT_REMOTE)")
    redact.register_env()
    redact.register_options(storage_options or {})
    parts = urlsplit(url)
    if parts.password:
        redact.register(parts.password)
    if is_local(url):
        from ckpt_cli.backends.local import LocalBackend

        return LocalBackend(local_path(url))
    if parts.scheme in NEEDS_BUCKET and not parts.netloc:
        what = "host" if parts.scheme in ("sftp", "ssh") else "bucket"
        raise ConfigError(
            f"remote {url} names no {what}: {parts.scheme}://{what.upper()}/PATH (--remote)"
        )
    if io_timeout is None:
        # CKPT_IO_TIMEOUT has one reading and one check, config's (the same
        # as `ckpt run`'s); imported here, at the one call that needs it.
        from ckpt_cli.config import env_io_timeout

        io_timeout = env_io_timeout()
    from ckpt_cli.backends.fsspec import FsspecBackend

    return FsspecBackend(url, storage_options or {}, io_timeout=io_timeout, concurrency=concurrency)
