"""Storage backends behind one narrow interface; the ONLY module that imports fsspec.

A backend stores opaque byte objects under '/'-separated keys relative to the
remote's root. Contract of every method:

- read(key) -> bytes                 NotFound if absent; RemoteError otherwise
- write(key, data)                   whole object or nothing visible under key
- create_exclusive(key, data) -> bool  False if key already exists (atomic on
                                     local disks, check-then-put elsewhere)
- delete(key)                        absent is not an error
- list(prefix) -> list[str]          every key below prefix, recursively
- display                            the URL without credentials, for messages

Local paths and file:// URLs use the operating system directly (atomic rename,
O_EXCL); everything else goes through fsspec (s3, gs, az, sftp, memory, ...).
Transient failures are retried a few times with backoff before RemoteError.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

from ckpt_cli.errors import ConfigError, RemoteError

T = TypeVar("T")

#: fsspec protocols whose put is atomic (an object appears whole or not at all).
_OBJECT_STORES = frozenset(
    {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory", "oss", "r2"}
)
#: How backend-level retries space themselves: attempts, first delay, cap.
_RETRY_ATTEMPTS = 4
_RETRY_FIRST = 0.2
_RETRY_CAP = 3.0
#: Names of half-written local objects; never listed as keys.
_TEMP_RE = re.compile(r"^\.[^/]*\.tmp-[0-9a-f]+$")


class NotFound(Exception):
    """The object does not exist."""


class Backend(Protocol):
    display: str

    def read(self, key: str) -> bytes: ...
    def write(self, key: str, data: bytes) -> None: ...
    def create_exclusive(self, key: str, data: bytes) -> bool: ...
    def delete(self, key: str) -> None: ...
    def list(self, prefix: str) -> list[str]: ...


def redact_url(url: str) -> str:
    """Drop user:password@ from a URL so it can be printed."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}@" if parts.username and not parts.password else ""
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


def parse_storage_options(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE pairs -> fsspec kwargs. VALUE is JSON when it parses (true, 3,
    {"a": 1}), else a string; dotted keys nest (client_kwargs.endpoint_url=...)."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"storage option {item!r} is not KEY=VALUE (--storage-option)")
        value: Any
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        target = options
        *parents, leaf = key.strip().split(".")
        for part in parents:
            nested = target.setdefault(part, {})
            if not isinstance(nested, dict):
                raise ConfigError(f"storage option {key!r} conflicts with an earlier one")
            target = nested
        target[leaf] = value
    return options


def is_local(url: str) -> bool:
    scheme = urlsplit(url).scheme
    return scheme in ("", "file", "local") or (len(scheme) == 1 and os.name == "nt")


def local_path(url: str) -> Path:
    """The filesystem path of a local URL (no scheme, file://, local://)."""
    if "://" in url:
        url = url.split("://", 1)[1]
    return Path(url).expanduser().absolute()


def open_backend(url: str, storage_options: dict[str, Any] | None = None) -> Backend:
    """Open the store at url; ConfigError for a malformed URL or a missing extra."""
    if not url.strip():
        raise ConfigError("empty remote URL (--remote / CKPT_REMOTE)")
    if is_local(url):
        return LocalBackend(local_path(url))
    return FsspecBackend(url, storage_options or {})


def _retrying(what: str, display: str, fn: Callable[[], T]) -> T:
    delay = _RETRY_FIRST
    for attempt in range(1, _RETRY_ATTEMPTS + 1):
        try:
            return fn()
        except (NotFound, FileNotFoundError):
            raise
        except Exception as exc:
            if attempt == _RETRY_ATTEMPTS:
                raise RemoteError(
                    f"{what} on {display} failed after {attempt} tries: {type(exc).__name__}: {exc}"
                ) from None
            time.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, _RETRY_CAP)
    raise AssertionError("unreachable")


class LocalBackend:
    """A directory on a local (or network-mounted) filesystem."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.display = str(root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def read(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(key) from None
        except IsADirectoryError:
            raise NotFound(key) from None
        except OSError as exc:
            raise RemoteError(f"reading {key} from {self.display} failed: {exc}") from None

    def write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise RemoteError(f"writing {key} to {self.display} failed: {exc}") from None

    def create_exclusive(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise RemoteError(f"creating {key} on {self.display} failed: {exc}") from None
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise RemoteError(f"deleting {key} from {self.display} failed: {exc}") from None

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        keys: list[str] = []
        try:
            for dirpath, _dirs, files in os.walk(base):
                rel = os.path.relpath(dirpath, self.root)
                rel = "" if rel == "." else rel.replace(os.sep, "/") + "/"
                keys.extend(rel + name for name in files if not _TEMP_RE.match(name))
        except OSError as exc:
            raise RemoteError(f"listing {prefix} on {self.display} failed: {exc}") from None
        return keys


class FsspecBackend:
    """Any fsspec filesystem: object stores put atomically; others write a temp
    object and rename it."""

    def __init__(self, url: str, storage_options: dict[str, Any]) -> None:
        import fsspec  # the one import of fsspec in ckpt

        self.display = redact_url(url)
        try:
            fs, root = fsspec.core.url_to_fs(url, **storage_options)
        except ImportError as exc:
            scheme = urlsplit(url).scheme
            extra = {
                "s3": "s3",
                "gs": "gcs",
                "gcs": "gcs",
                "az": "azure",
                "abfs": "azure",
                "sftp": "ssh",
                "ssh": "ssh",
            }.get(scheme, "")
            hint = f": pip install 'ckpt-run[{extra}]'" if extra else ""
            raise ConfigError(
                f"remote {self.display} needs a storage package that is not installed{hint} ({exc})"
            ) from None
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"remote {self.display} is not a usable URL (--remote): {exc}"
            ) from None
        self.fs = fs
        self.root = root.rstrip("/")
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        self.atomic_put = protocol in _OBJECT_STORES

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}" if self.root else key

    def read(self, key: str) -> bytes:
        def go() -> bytes:
            try:
                data: bytes = self.fs.cat_file(self._path(key))
            except FileNotFoundError:
                raise NotFound(key) from None
            return data

        return _retrying(f"reading {key}", self.display, go)

    def write(self, key: str, data: bytes) -> None:
        path = self._path(key)

        def go() -> None:
            if self.atomic_put:
                self.fs.pipe_file(path, data)
                return
            parent = path.rsplit("/", 1)[0]
            self.fs.makedirs(parent, exist_ok=True)
            tmp = f"{parent}/.{path.rsplit('/', 1)[1]}.tmp-{secrets.token_hex(4)}"
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, path)

        _retrying(f"writing {key}", self.display, go)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        try:
            self.read(key)
            return False
        except NotFound:
            self.write(key, data)
            return True

    def delete(self, key: str) -> None:
        def go() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._path(key))

        _retrying(f"deleting {key}", self.display, go)

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)

        def go() -> list[str]:
            try:
                found: list[str] = self.fs.find(base)
            except FileNotFoundError:
                return []
            strip = self.root.lstrip("/")
            keys = []
            for name in found:
                rel = name.lstrip("/")
                if strip:
                    if not rel.startswith(strip + "/"):
                        continue
                    rel = rel[len(strip) + 1 :]
                if not _TEMP_RE.match(rel.rsplit("/", 1)[-1]):
                    keys.append(rel)
            return keys

        return _retrying(f"listing {prefix}", self.display, go)
