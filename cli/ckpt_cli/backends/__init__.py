"""Storage backends behind one narrow interface: the protocol, NotFound and
open_backend, which picks the backend a URL names.

A backend stores opaque byte objects under '/'-separated keys relative to the
remote's root. Contract of every method:

- read(key) -> bytes                 NotFound if absent; RemoteError otherwise
- read_into(key, view) -> int        optional (ask with getattr): the object read
                                     straight into view, its size returned
- write(key, data)                   whole object or nothing visible under key
- create_exclusive(key, data) -> bool  False if key already exists (atomic on
                                     local disks, check-then-put elsewhere)
- delete(key)                        absent is not an error
- list(prefix) -> list[str]          every key below prefix, recursively
- display                            the URL without credentials, for messages
- borrows_buffers                    optional, True where write(key, view) has
                                     finished with view when it returns

Local paths and file:// URLs use the operating system directly (atomic rename,
O_EXCL: `backends.local`); everything else goes through fsspec (s3, gs, az,
sftp, memory, ...: `backends.fsspec`, the only module that imports fsspec).
Network calls are bounded by a timeout and retried a few times with jittered
backoff before RemoteError; messages never carry credentials (`redact`).
"""

from __future__ import annotations

import os
import re
from typing import Any, Protocol
from urllib.parse import urlsplit

from ckpt_cli import redact
from ckpt_cli.backends.urls import NEEDS_BUCKET, is_local, local_path
from ckpt_cli.errors import ConfigError

#: Every network call gives up after this long (seconds; CKPT_IO_TIMEOUT).
DEFAULT_IO_TIMEOUT = 120.0
#: Names of half-written local objects; never listed as keys.
TEMP_RE = re.compile(r"^\.[^/]*\.tmp-[0-9a-f]+$")
#: Transfers a filesystem is opened for when its user does not say (`ckpt ls`).
DEFAULT_CONCURRENCY = 4


class NotFound(Exception):
    """The object does not exist."""


class Backend(Protocol):
    display: str

    def read(self, key: str) -> bytes: ...
    def write(self, key: str, data: bytes) -> None: ...
    def create_exclusive(self, key: str, data: bytes) -> bool: ...
    def delete(self, key: str) -> None: ...
    def rename(self, src: str, dst: str) -> None:
        """Move an object (server-side where the store can); NotFound if src
        is missing; dst is replaced."""
        ...

    def list(self, prefix: str, *, temp: bool = False) -> list[str]:
        """Keys under prefix; with temp, only the temp names of writes that
        never finished (a killed writer's), which are otherwise hidden."""
        ...


def open_backend(
    url: str,
    storage_options: dict[str, Any] | None = None,
    *,
    io_timeout: float | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> Backend:
    """Open the store at url; ConfigError for a malformed URL or a missing extra.
    io_timeout bounds every network call (default: $CKPT_IO_TIMEOUT or 120 s);
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
    timeout = io_timeout if io_timeout is not None else io_timeout_from_env()
    from ckpt_cli.backends.fsspec import FsspecBackend

    return FsspecBackend(url, storage_options or {}, io_timeout=timeout, concurrency=concurrency)


def io_timeout_from_env() -> float:
    raw = os.environ.get("CKPT_IO_TIMEOUT", "").strip()
    if not raw:
        return DEFAULT_IO_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"CKPT_IO_TIMEOUT={raw!r} is not a positive number of seconds")
    return value
