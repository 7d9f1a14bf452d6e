"""Retries around a backend (restic's internal/backend/retry is the model).

The backend inside makes one try per call; `RetryingBackend` tries again
with jittered exponential backoff, rebuilds the inner backend's connection
after an authentication failure and before the last try (so rotated or
refreshed credentials are read again and broken connection pools dropped),
and turns the last failure into one RemoteError line naming the call, the
store, the number of tries and the cause, with credentials scrubbed.

What the inner backend raises decides what happens: NotFound,
FileNotFoundError and any CkptError (RemoteError, ConfigError: an answer,
not a failure) pass through at once; any other exception is a failed try.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

from ckpt_cli import redact
from ckpt_cli.backends import Backend, NotFound
from ckpt_cli.errors import CkptError, RemoteError

T = TypeVar("T")

#: How retries space themselves: tries, first delay, cap (seconds).
ATTEMPTS = 4
FIRST_DELAY = 0.2
DELAY_CAP = 3.0
#: Words in an exception that mean the credentials were rejected or expired.
_AUTH_MARKERS = (
    "ExpiredToken",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "RequestExpired",
    "AuthenticationFailed",
    "AuthorizationFailure",
    "InvalidAuthenticationInfo",
    "ClientAuthenticationError",
    "Unauthorized",
    "Forbidden",
)


class Reconnecting(Backend, Protocol):
    """A backend whose connection can be built afresh."""

    @property
    def connection(self) -> object:
        """What a try uses now; `reconnect` replaces it."""
        ...

    def reconnect(self, stale: object) -> None:
        """Build a new connection unless another thread already replaced
        stale; a failure to connect keeps the old one (the call's own error
        is what is reported)."""
        ...


def describe(exc: BaseException, io_timeout: float) -> str:
    """The cause of a failed try, in one line."""
    if isinstance(exc, TimeoutError):  # fsspec's FSTimeoutError is one
        return f"no answer within {io_timeout:g}s (--io-timeout / CKPT_IO_TIMEOUT)"
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def is_auth_error(exc: BaseException) -> bool:
    """Credentials rejected or expired: worth one retry with credentials read again."""
    if isinstance(exc, PermissionError):
        return True
    text = f"{type(exc).__name__} {exc}"
    return any(marker in text for marker in _AUTH_MARKERS)


def pause(delay: float, sleep: Callable[[float], None] = time.sleep) -> float:
    """Sleep between half and all of delay (jitter); return the next delay."""
    sleep(delay * (0.5 + random.random() / 2))
    return min(delay * 2, DELAY_CAP)


def connect_retrying(connect: Callable[[], T], sleep: Callable[[float], None] = time.sleep) -> T:
    """connect() with the same tries as any call (sshfs connects at once);
    RemoteError naming credentials is final at once, ConfigError always."""
    delay = FIRST_DELAY
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return connect()
        except RemoteError as exc:
            if attempt == ATTEMPTS or "credentials" in str(exc):
                raise
        delay = pause(delay, sleep)
    raise AssertionError("unreachable")


class RetryingBackend:
    """inner behind retries; its capabilities are inner's."""

    def __init__(
        self,
        inner: Reconnecting,
        *,
        io_timeout: float,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.inner = inner
        self.display = inner.display
        #: Named in the message of a try that timed out.
        self.io_timeout = io_timeout
        self._sleep = sleep

    @property
    def exclusive_create(self) -> bool:
        return self.inner.exclusive_create

    @property
    def borrows_buffers(self) -> bool:
        return self.inner.borrows_buffers

    @property
    def reads_into(self) -> bool:
        return self.inner.reads_into

    @property
    def local_io(self) -> bool:
        return self.inner.local_io

    def read(self, key: str) -> bytes:
        return self._retry(f"reading {key}", lambda: self.inner.read(key))

    def read_into(self, key: str, view: memoryview) -> int:
        return self._retry(f"reading {key}", lambda: self.inner.read_into(key, view))

    def write(self, key: str, data: bytes) -> None:
        self._retry(f"writing {key}", lambda: self.inner.write(key, data))

    def create_exclusive(self, key: str, data: bytes) -> bool:
        return self._retry(f"creating {key}", lambda: self.inner.create_exclusive(key, data))

    def delete(self, key: str) -> None:
        self._retry(f"deleting {key}", lambda: self.inner.delete(key))

    def rename(self, src: str, dst: str) -> None:
        self._retry(f"moving {src} to {dst}", lambda: self.inner.rename(src, dst))

    def names(self) -> list[str]:
        return self._retry("listing the remote", self.inner.names)

    def list(self, prefix: str, *, temp: bool = False) -> list[str]:
        return self._retry(f"listing {prefix}", lambda: self.inner.list(prefix, temp=temp))

    def _retry(self, what: str, op: Callable[[], T]) -> T:
        """op() until it answers; RemoteError after the last failed try.
        Rejected credentials get one more try, with credentials read again."""
        delay = FIRST_DELAY
        for attempt in range(1, ATTEMPTS + 1):
            stale = self.inner.connection
            try:
                return op()
            except (NotFound, FileNotFoundError, CkptError):
                raise
            except Exception as exc:
                auth = is_auth_error(exc)
                if attempt == ATTEMPTS or (auth and attempt >= 2):
                    hint = " (check the credentials)" if auth else ""
                    raise RemoteError(
                        redact.scrub(
                            f"{what} on {self.display} failed after {attempt} "
                            f"{'try' if attempt == 1 else 'tries'}{hint}: "
                            f"{describe(exc, self.io_timeout)}"
                        )
                    ) from None
                if auth or attempt == ATTEMPTS - 1:
                    self.inner.reconnect(stale)
                if not auth:
                    delay = pause(delay, self._sleep)
        raise AssertionError("unreachable")
