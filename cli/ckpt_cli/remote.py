"""Storage backends behind one narrow interface; the ONLY module that imports fsspec.

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
O_EXCL); everything else goes through fsspec (s3, gs, az, sftp, memory, ...).
Network calls are bounded by a timeout and retried a few times with jittered
backoff before RemoteError; messages never carry credentials (`redact`).
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import itertools
import json
import os
import random
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

from ckpt_cli import redact
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
#: Every network call gives up after this long (seconds; CKPT_IO_TIMEOUT).
DEFAULT_IO_TIMEOUT = 120.0
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
#: The pip extra that brings each scheme's fsspec implementation.
_EXTRAS = {
    "s3": "s3",
    "s3a": "s3",
    "gs": "gcs",
    "gcs": "gcs",
    "az": "azure",
    "abfs": "azure",
    "abfss": "azure",
    "sftp": "ssh",
    "ssh": "ssh",
}
#: Schemes whose URL must name a bucket, container or host (s3://BUCKET/prefix).
_NEEDS_BUCKET = frozenset(_OBJECT_STORES - {"memory"}) | {"sftp", "ssh"}
#: Names of half-written local objects; never listed as keys.
_TEMP_RE = re.compile(r"^\.[^/]*\.tmp-[0-9a-f]+$")
#: Schemes whose fsspec put takes a bytearray (the conformance suite writes
#: one to each): a chunk buffer goes out without a copy.
_TAKE_BYTEARRAYS = frozenset({"s3", "s3a", "gs", "gcs", "sftp", "ssh", "memory"})
#: S3 clients keep this many connections beside the chunk transfers (lease
#: heartbeat, listings, manifests); botocore's own default is 10.
_POOL_SPARE = 4
_POOL_MIN = 10
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
        except (ValueError, RecursionError):
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
    """The filesystem path of a local URL (no scheme, file://, local://);
    ConfigError for an empty one or a file:// URL that names another host."""
    if not url.strip():
        raise ConfigError("empty remote URL (--remote / CKPT_REMOTE)")
    if "://" in url:
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(
                f"remote {url} names the host {parts.netloc!r}: a {parts.scheme}:// URL is a "
                f"path on this machine, {parts.scheme}:///absolute/path (--remote)"
            )
        url = url.split("://", 1)[1].removeprefix(parts.netloc)
    return Path(url).expanduser().absolute()


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
        return LocalBackend(local_path(url))
    if parts.scheme in _NEEDS_BUCKET and not parts.netloc:
        what = "host" if parts.scheme in ("sftp", "ssh") else "bucket"
        raise ConfigError(
            f"remote {url} names no {what}: {parts.scheme}://{what.upper()}/PATH (--remote)"
        )
    timeout = io_timeout if io_timeout is not None else io_timeout_from_env()
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


def _pause(delay: float) -> float:
    """Sleep between half and all of delay (jitter); return the next delay."""
    time.sleep(delay * (0.5 + random.random() / 2))
    return min(delay * 2, _RETRY_CAP)


def _describe(exc: BaseException, io_timeout: float) -> str:
    if isinstance(exc, TimeoutError):  # fsspec's FSTimeoutError is one
        return f"no answer within {io_timeout:g}s (--io-timeout / CKPT_IO_TIMEOUT)"
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _is_auth_error(exc: BaseException) -> bool:
    """Credentials rejected or expired: worth one retry with credentials read again."""
    if isinstance(exc, PermissionError):
        return True
    text = f"{type(exc).__name__} {exc}"
    return any(marker in text for marker in _AUTH_MARKERS)


def s3_options(
    options: dict[str, Any], *, pool: int, env: dict[str, str], checksum_options: bool
) -> dict[str, Any]:
    """The storage options ckpt opens an S3 filesystem (s3fs) with: the
    user's, and where the user set nothing (a `config_kwargs` key, or the
    AWS_* variable that sets it), ckpt's client settings:

    - no CRC32/MD5 of every body sent or received (`request_checksum_calculation`
      and `response_checksum_validation` "when_required", botocore >= 1.36:
      `checksum_options`) and no SHA-256 of every payload for its signature
      (`s3.payload_signing_enabled` false; botocore signs payloads on plain
      http, and over https once no checksum is sent). Every chunk is named by
      its BLAKE3 hash and verified by it on every read, so a chunk damaged on
      the way or at rest is found all the same; those hashes cost a quarter of
      the CPU of a restore, on the one thread that does all the network work.
    - a connection pool for `pool` requests at once (botocore keeps 10: more
      requests in flight would wait for a connection).
    - no check of each call's parameters (`parameter_validation` false):
      ckpt makes every call itself, and botocore's check refuses a chunk
      buffer handed over as it is (`piecewise_puts`).
    """
    out = dict(options)
    config = dict(out.get("config_kwargs") or {})
    config.setdefault("max_pool_connections", max(_POOL_MIN, pool))
    config.setdefault("parameter_validation", False)
    if checksum_options:
        for key, var in (
            ("request_checksum_calculation", "AWS_REQUEST_CHECKSUM_CALCULATION"),
            ("response_checksum_validation", "AWS_RESPONSE_CHECKSUM_VALIDATION"),
        ):
            if not env.get(var):
                config.setdefault(key, "when_required")
    s3 = dict(config.get("s3") or {})
    s3.setdefault("payload_signing_enabled", False)
    config["s3"] = s3
    out["config_kwargs"] = config
    return out


def piecewise_puts(options: dict[str, Any]) -> bool:
    """Whether the S3 client these options open takes a put's body as
    `_Pieces`: nothing in botocore reads the body before it is sent (no
    request checksum, no payload signature, no parameter check), which
    holds with ckpt's settings unless the user set one of them back."""
    config = options.get("config_kwargs") or {}
    return (
        config.get("request_checksum_calculation") == "when_required"
        and config.get("parameter_validation") is False
        and (config.get("s3") or {}).get("payload_signing_enabled") is False
    )


def _botocore_has(option: str) -> bool:
    """Whether this botocore's client Config takes `option`."""
    try:
        from botocore.config import Config  # type: ignore[import-untyped]
    except ImportError:
        return False
    return option in getattr(Config, "OPTION_DEFAULTS", {})


class _Sink:
    """Where one read attempt puts its bytes: the caller's view, until the
    attempt is over. An attempt that timed out may still run on the event
    loop; once `close` returns, nothing more is written into the view (the
    next attempt, or the next chunk, has it to itself)."""

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self._lock = threading.Lock()
        self._open = True

    def put(self, offset: int, data: bytes) -> bool:
        """Copy data to view[offset:]; False (nothing copied) if it does not
        fit or the sink is closed."""
        with self._lock:
            if not self._open or offset + len(data) > len(self.view):
                return False
            self.view[offset : offset + len(data)] = data
            return True

    def close(self) -> None:
        with self._lock:
            self._open = False


class LocalBackend:
    """A directory on a local (or network-mounted) filesystem.

    Modes: ckpt creates the root 0700; every directory and object below it
    is no wider than the root (a root made 0750 by its owner gets 0750 dirs
    and 0640 objects), and the umask narrows both further."""

    #: create_exclusive cannot race: the kernel refuses the second link.
    exclusive_create = True
    #: write() has written a view out when it returns: the caller may reuse it.
    borrows_buffers = True

    def __init__(self, root: Path) -> None:
        self.root = root
        self.display = str(root)
        self._root = str(root)
        #: Directories known to exist: not made again for every chunk.
        self._dirs: set[str] = set()
        #: Temp names: a random part per backend and a counter (one getrandom
        #: per process, not per write).
        self._tmp_prefix = secrets.token_hex(4)
        self._tmp_seq = itertools.count()
        #: (dir mode, object mode), from the root's mode once it exists.
        self._modes: tuple[int, int] | None = None

    def _root_modes(self) -> tuple[int, int]:
        """Make the root if missing (0700; its parents as mkdir -p does) and
        return the modes of what goes below it."""
        if self._modes is None:
            try:
                st = os.stat(self._root)
            except FileNotFoundError:
                os.makedirs(os.path.dirname(self._root) or ".", exist_ok=True)
                with contextlib.suppress(FileExistsError):
                    os.mkdir(self._root, 0o700)
                st = os.stat(self._root)
            root = st.st_mode & 0o777
            self._modes = (root | 0o700, root & 0o666 | 0o600)
        return self._modes

    def _makedirs(self, path: str) -> None:
        """Every missing directory from the root down to path, no wider than the root."""
        dir_mode, _ = self._root_modes()
        rel = os.path.relpath(path, self._root)
        here = self._root
        if rel != ".":
            for part in rel.split(os.sep):
                here = os.path.join(here, part)
                with contextlib.suppress(FileExistsError):
                    os.mkdir(here, dir_mode)

    def _path(self, key: str) -> Path:
        return self.root / key

    def _tmp_for(self, path: str) -> str:
        """The temp name a write to path goes through (matches _TEMP_RE)."""
        parent, name = path.rsplit("/", 1)
        return f"{parent}/.{name}.tmp-{self._tmp_prefix}{next(self._tmp_seq):x}"

    def _open_object(self, key: str) -> int:
        """A read descriptor on the object at key. Only a regular file is an
        object: a directory, FIFO, socket or device where an object should be
        is NotFound (one planted in a repository must neither hang the
        reader, as opening a FIFO would, nor be read). O_NONBLOCK: opening a
        FIFO that appears between the check and the open does not block."""
        path = self._path(key)
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):
                raise NotFound(key)
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(key) from None
        except OSError as exc:
            raise RemoteError(f"reading {key} from {self.display} failed: {exc}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise NotFound(key)
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def read(self, key: str) -> bytes:
        fd = self._open_object(key)
        try:
            with os.fdopen(fd, "rb", closefd=False) as f:
                return f.read()
        except OSError as exc:
            raise RemoteError(f"reading {key} from {self.display} failed: {exc}") from None
        finally:
            os.close(fd)

    def read_into(self, key: str, view: memoryview) -> int:
        """Read the object into view; return the object's size (view holds its
        first len(view) bytes; a size that differs means the caller's view is
        not the whole object)."""
        fd = self._open_object(key)
        try:
            size = os.fstat(fd).st_size
            done = 0
            while done < min(size, len(view)):
                n = os.preadv(fd, [view[done:]], done)
                if n <= 0:
                    return done  # shrank while read: reported as that size
                done += n
            return size
        except OSError as exc:
            raise RemoteError(f"reading {key} from {self.display} failed: {exc}") from None
        finally:
            os.close(fd)

    def write(self, key: str, data: bytes | memoryview) -> None:
        """Whole or not at all (temp name, then rename). A memoryview is
        written out before this returns: the caller may reuse its buffer."""
        path = f"{self._root}/{key}"
        parent = path.rsplit("/", 1)[0]
        tmp = self._tmp_for(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            if parent not in self._dirs:
                self._makedirs(parent)
                self._dirs.add(parent)
            mode = self._root_modes()[1]
            try:
                fd = os.open(tmp, flags, mode)
            except FileNotFoundError:  # removed behind our back: make it again
                self._makedirs(parent)
                fd = os.open(tmp, flags, mode)
            try:
                view = memoryview(data)
                while view:  # a nearly full disk takes part of it, then raises
                    n = os.write(fd, view)
                    if n <= 0:
                        raise OSError(errno.EIO, "write made no progress")
                    view = view[n:]
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise RemoteError(f"writing {key} to {self.display} failed: {exc}") from None

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Write a temp object whole, then hard-link it to key (which fails if
        key exists): a full disk or a crash never leaves a half-written object
        under key. Filesystems without hard links get O_EXCL on key itself."""
        path = self._path(key)
        tmp = Path(self._tmp_for(str(path)))
        try:
            self._makedirs(str(path.parent))
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            with os.fdopen(os.open(tmp, flags, self._root_modes()[1]), "wb") as f:
                f.write(data)
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.ENOSYS) or not tmp.exists():
                raise RemoteError(f"creating {key} on {self.display} failed: {exc}") from None
            return self._create_excl_in_place(key, path, data)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        return True

    def _create_excl_in_place(self, key: str, path: Path, data: bytes) -> bool:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self._root_modes()[1])
        except FileExistsError:
            return False
        except OSError as exc:
            raise RemoteError(f"creating {key} on {self.display} failed: {exc}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except OSError as exc:
            with contextlib.suppress(OSError):
                path.unlink()  # ours: never leave it half-written
            raise RemoteError(f"creating {key} on {self.display} failed: {exc}") from None
        return True

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise RemoteError(f"deleting {key} from {self.display} failed: {exc}") from None

    def rename(self, src: str, dst: str) -> None:
        path = f"{self._root}/{dst}"
        parent = path.rsplit("/", 1)[0]
        try:
            if parent not in self._dirs:
                self._makedirs(parent)
                self._dirs.add(parent)
            os.replace(f"{self._root}/{src}", path)
        except FileNotFoundError:
            if not os.path.exists(f"{self._root}/{src}"):
                raise NotFound(src) from None
            raise RemoteError(f"moving {src} to {dst} on {self.display} failed") from None
        except OSError as exc:
            raise RemoteError(f"moving {src} to {dst} on {self.display} failed: {exc}") from None

    def list(self, prefix: str, *, temp: bool = False) -> list[str]:
        """Regular files only (an object is a file: a FIFO or a link planted
        in the store is no object), walked without recursion (os.walk of
        Python 3.11 recurses once per level: a planted tree 1,100 levels
        deep was a RecursionError)."""
        base = self._path(prefix)
        keys: list[str] = []
        stack = [(str(base), os.path.relpath(base, self.root))]
        while stack:
            directory, rel = stack.pop()
            rel = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            try:
                with os.scandir(directory) as it:
                    for e in it:
                        if e.is_dir(follow_symlinks=False):
                            stack.append((e.path, rel + e.name))
                        elif e.is_file(follow_symlinks=False) and (
                            bool(_TEMP_RE.match(e.name)) == temp
                        ):
                            keys.append(rel + e.name)
            except (FileNotFoundError, NotADirectoryError):
                continue  # nothing under prefix, or a directory removed meanwhile
            except OSError as exc:
                raise RemoteError(f"listing {prefix} on {self.display} failed: {exc}") from None
        return keys


class FsspecBackend:
    """Any fsspec filesystem: object stores put atomically; others write a temp
    object and rename it.

    Every call is bounded by io_timeout (async implementations: s3fs, gcsfs,
    adlfs, sshfs) and retried with jittered exponential backoff. The
    filesystem is built afresh, bypassing fsspec's instance cache, after an
    authentication failure and before the last try of any failing call, so
    rotated or refreshed credentials (env vars, credential files, tokens) are
    read again instead of failing for good, and broken connection pools are
    dropped.
    """

    #: write() has finished with its data when it returns, so a caller may
    #: hand it a view of a buffer it reuses. Not after it raised: a put that
    #: timed out may still be sending from it (never reuse such a buffer).
    borrows_buffers = True

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any],
        *,
        io_timeout: float,
        concurrency: int = DEFAULT_CONCURRENCY,
    ) -> None:
        self.url = url
        self.options = dict(storage_options)
        self.display = redact_url(url)
        self.io_timeout = io_timeout
        #: Transfers its users run at once: S3's connection pool is sized for them.
        self.concurrency = max(1, concurrency)
        self._lock = threading.Lock()
        self.reconnects = 0
        self.fs, self.root = self._connect_retrying()
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.atomic_put = protocol in _OBJECT_STORES
        #: Its put sends a bytearray as it is (adlfs refuses one); S3 with
        #: ckpt's client settings takes a chunk buffer piece by piece.
        self._bytearrays = urlsplit(url).scheme in _TAKE_BYTEARRAYS
        self._piecewise = self._bytearrays and piecewise_puts(self._open_options())
        # How this implementation's put refuses to replace an existing object:
        # s3fs and gcsfs take mode="create" (If-None-Match / ifGenerationMatch=0),
        # adlfs overwrite=False; others cannot, and create_exclusive checks first.
        params = _parameters(getattr(self.fs, "_pipe_file", None))
        self._create_kw: dict[str, Any] | None = (
            {"mode": "create"}
            if "mode" in params
            else {"overwrite": False}
            if "overwrite" in params
            else None
        )

    def _open_options(self) -> dict[str, Any]:
        """The storage options the filesystem is opened with (`s3_options`)."""
        if urlsplit(self.url).scheme not in ("s3", "s3a"):
            return self.options
        return s3_options(
            self.options,
            pool=self.concurrency + _POOL_SPARE,
            env=dict(os.environ),
            checksum_options=_botocore_has("request_checksum_calculation"),
        )

    def _connect(self) -> tuple[Any, str]:
        import fsspec  # fsspec is imported in this module only

        options = self._open_options()
        try:
            fs, root = fsspec.core.url_to_fs(self.url, skip_instance_cache=True, **options)
        except ImportError as exc:
            scheme = urlsplit(self.url).scheme
            extra = _EXTRAS.get(scheme, "")
            hint = f": pip install 'ckpt-run[{extra}]'" if extra else ""
            raise ConfigError(
                f"remote {self.display} needs a storage package that is not installed{hint} "
                f"({redact.scrub(str(exc))})"
            ) from None
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"remote {self.display} is not a usable URL or storage option "
                f"(--remote / --storage-option): {redact.scrub(str(exc))}"
            ) from None
        except Exception as exc:  # sshfs connects here: refused, rejected key, timeout
            hint = "check the credentials" if _is_auth_error(exc) else "is it reachable?"
            raise RemoteError(
                f"remote {self.display} could not be opened ({hint}): "
                f"{redact.scrub(_describe(exc, self.io_timeout))}"
            ) from None
        return fs, root.rstrip("/")

    def _connect_retrying(self) -> tuple[Any, str]:
        """_connect with the same retries as any call (sshfs connects at once)."""
        delay = _RETRY_FIRST
        for attempt in range(1, _RETRY_ATTEMPTS + 1):
            try:
                return self._connect()
            except RemoteError as exc:
                if attempt == _RETRY_ATTEMPTS or "credentials" in str(exc):
                    raise
            delay = _pause(delay)
        raise AssertionError("unreachable")

    def _reconnect(self, stale: Any) -> None:
        """Replace the filesystem unless another thread already did."""
        with self._lock:
            if self.fs is not stale:
                return
            try:
                self.fs, _root = self._connect()
            except (ConfigError, RemoteError):
                return  # keep the old one; the call's own error is reported
            self.reconnects += 1

    def _call(self, what: str, op: Callable[[Any, dict[str, Any]], T]) -> T:
        """op(fs, kwargs) with retries; kwargs carry the timeout for async
        filesystems. NotFound and FileNotFoundError pass through untouched."""
        delay = _RETRY_FIRST
        for attempt in range(1, _RETRY_ATTEMPTS + 1):
            fs = self.fs
            kwargs: dict[str, Any] = {"timeout": self.io_timeout} if fs.async_impl else {}
            try:
                return op(fs, kwargs)
            except (NotFound, FileNotFoundError):
                raise
            except Exception as exc:
                auth = _is_auth_error(exc)
                # Rejected credentials get one retry with credentials read again.
                if attempt == _RETRY_ATTEMPTS or (auth and attempt >= 2):
                    hint = " (check the credentials)" if auth else ""
                    raise RemoteError(
                        redact.scrub(
                            f"{what} on {self.display} failed after {attempt} "
                            f"{'try' if attempt == 1 else 'tries'}{hint}: "
                            f"{_describe(exc, self.io_timeout)}"
                        )
                    ) from None
                if auth or attempt == _RETRY_ATTEMPTS - 1:
                    self._reconnect(fs)
                if not auth:
                    delay = _pause(delay)
        raise AssertionError("unreachable")

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}" if self.root else key

    def _missing_container(self, what: str) -> RemoteError:
        return RemoteError(
            f"{what} on {self.display} failed: the bucket or container does not exist "
            "(create it, or fix --remote)"
        )

    def read(self, key: str) -> bytes:
        path = self._path(key)

        def go(fs: Any, kw: dict[str, Any]) -> bytes:
            try:
                data: bytes = fs.cat_file(path, **kw)
            except (FileNotFoundError, IsADirectoryError):
                raise NotFound(key) from None
            return data

        return self._call(f"reading {key}", go)

    def read_into(self, key: str, view: memoryview) -> int:
        """Read the object at key into view and return its size: where that is
        len(view), view holds the object; otherwise view is not the object's
        size (nothing is written beyond view; what it holds is undefined).
        NotFound if absent; RemoteError after the retries, each try bounded
        by io_timeout. When this returns or raises, nothing writes into view
        any more (a try that timed out is cut off: `_Sink`).

        S3 streams the body into view as it arrives: no request for the size
        first, no bytes object of the whole chunk joined and copied again, no
        checksum of it on the event loop (its caller verifies the chunk by
        its name). Other stores read the object, then copy it into view."""
        path = self._path(key)

        def go(fs: Any, kw: dict[str, Any]) -> int:
            sink = _Sink(view)
            try:
                if fs.async_impl:
                    from fsspec.asyn import sync

                    size: int = sync(fs.loop, _read_async, fs, path, sink, **kw)
                    return size
                data = fs.cat_file(path)
                if len(data) == len(view):
                    sink.put(0, data)
                return len(data)
            except (FileNotFoundError, IsADirectoryError):
                raise NotFound(key) from None
            finally:
                sink.close()

        return self._call(f"reading {key}", go)

    def write(self, key: str, data: bytes | memoryview) -> None:
        """Whole or not at all. A memoryview is sent as it is where it is the
        whole of a bytearray (a chunk buffer: no copy), else copied once."""
        path = self._path(key)
        body: Any = (
            _Pieces(data)
            if self._piecewise and isinstance(data, memoryview)
            else _body(data, bytearrays=self._bytearrays)
        )

        def go(fs: Any, kw: dict[str, Any]) -> None:
            if self.atomic_put:
                fs.pipe_file(path, body, **kw)
                return
            parent, name = path.rsplit("/", 1) if "/" in path else ("", path)
            if parent:
                fs.makedirs(parent, exist_ok=True)
            tmp = f"{parent}/.{name}.tmp-{secrets.token_hex(4)}" if parent else f".{name}.tmp"
            fs.pipe_file(tmp, body, **kw)
            try:
                fs.mv(tmp, path, **kw)
            except Exception:
                with contextlib.suppress(Exception):
                    fs.rm_file(tmp, **kw)
                raise

        try:
            self._call(f"writing {key}", go)
        except FileNotFoundError:
            raise self._missing_container(f"writing {key}") from None

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Check, then put; where the store supports conditional writes
        (S3 If-None-Match, fsspec's mode="create"), the put itself refuses
        to replace an object that appeared in between."""
        try:
            self.read(key)
            return False
        except NotFound:
            pass
        create_kw = self._create_kw
        if not (self.atomic_put and create_kw is not None):
            self.write(key, data)
            return True
        path = self._path(key)

        def go(fs: Any, kw: dict[str, Any]) -> bool:
            try:
                fs.pipe_file(path, data, **create_kw, **kw)
            except FileExistsError:
                return False
            except Exception as exc:
                if "Exists" in type(exc).__name__ or "PreconditionFailed" in str(exc):
                    return False  # azure ResourceExistsError, a 412 passed through as is
                raise
            return True

        try:
            return self._call(f"creating {key}", go)
        except FileNotFoundError:
            raise self._missing_container(f"creating {key}") from None

    def delete(self, key: str) -> None:
        path = self._path(key)

        def go(fs: Any, kw: dict[str, Any]) -> None:
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(path, **kw)

        self._call(f"deleting {key}", go)

    def rename(self, src: str, dst: str) -> None:
        """fsspec's mv: a server-side copy and a delete on object stores."""
        frm, to = self._path(src), self._path(dst)

        def go(fs: Any, kw: dict[str, Any]) -> None:
            if not self.atomic_put and "/" in to:
                fs.makedirs(to.rsplit("/", 1)[0], exist_ok=True)
            try:
                fs.mv(frm, to, **kw)
            except FileNotFoundError:
                raise NotFound(src) from None

        self._call(f"moving {src} to {dst}", go)

    def list(self, prefix: str, *, temp: bool = False) -> list[str]:
        base = self._path(prefix).rstrip("/")

        def go(fs: Any, kw: dict[str, Any]) -> list[str]:
            try:
                found: list[str] = fs.find(base, **kw)
            except FileNotFoundError:
                return []
            finally:
                # find fills the listings cache (s3fs) and never refreshes it;
                # a later read of an object another process (another rank)
                # wrote since is then answered "not found" from that cache.
                with contextlib.suppress(Exception):
                    fs.invalidate_cache()
            strip = self.root.lstrip("/")
            keys = []
            for name in found:
                rel = name.lstrip("/")
                if strip:
                    if not rel.startswith(strip + "/"):
                        continue
                    rel = rel[len(strip) + 1 :]
                if bool(_TEMP_RE.match(rel.rsplit("/", 1)[-1])) == temp:
                    keys.append(rel)
            return keys

        return self._call(f"listing {prefix}", go)


#: The largest piece a body is read in where the client cannot hand over
#: the pieces it received, and the piece a chunk is sent in.
_PIECE = 256 * 1024


def _body(data: bytes | memoryview, *, bytearrays: bool) -> bytes | bytearray:
    """What a put hands the filesystem: bytes as they are; a memoryview as the
    bytearray it is the whole of (a chunk buffer), else copied into one, where
    the filesystem takes bytearrays, else copied into bytes. botocore takes
    bytes and bytearrays, not memoryviews, and sends a bytearray as it is;
    bytes it wraps in a BytesIO, which aiohttp copies again, and announces
    with `Expect: 100-continue` (a round trip more)."""
    if not isinstance(data, memoryview):
        return data
    if not bytearrays:
        return bytes(data)
    whole = data.obj
    if isinstance(whole, bytearray) and data.contiguous and data.nbytes == len(whole):
        return whole
    return bytearray(data)


class _Pieces:
    """A chunk buffer as a put's body, sent _PIECE bytes at a time: aiohttp
    writes each piece and waits until the socket took it, so nothing copies
    the chunk (a bytearray body is copied whole by aiohttp's slice, and what
    the socket did not take at once is copied again by asyncio's transport
    on Python 3.11). Each request iterates it afresh (a retry sends it
    again); s3fs's multipart upload slices it into parts."""

    def __init__(self, view: memoryview) -> None:
        self.view = view.cast("B") if view.format != "B" else view

    def __len__(self) -> int:
        return self.view.nbytes

    def __getitem__(self, part: slice) -> _Pieces:
        return _Pieces(self.view[part])

    def __aiter__(self) -> Any:
        return self._pieces()

    async def _pieces(self) -> Any:
        for start in range(0, len(self.view), _PIECE):
            yield self.view[start : start + _PIECE]


async def _read_async(fs: Any, path: str, sink: _Sink) -> int:
    """read_into's work on the filesystem's event loop: the object's size."""
    call_s3 = getattr(fs, "_call_s3", None)
    if call_s3 is None:  # gcsfs, adlfs, sshfs: the object, then a copy
        data: bytes = await fs._cat_file(path)
        if len(data) == len(sink.view):
            sink.put(0, data)
        return len(data)
    bucket, key, version = fs.split_path(path)
    extra = {"VersionId": version} if version else {}
    resp = await call_s3("get_object", Bucket=bucket, Key=key, **extra)
    body = resp["Body"]
    try:
        size = int(resp.get("ContentLength", -1))
        if size != len(sink.view):
            return size  # not this chunk's size: the caller says so
        piece = _pieces(body)
        done = 0
        while done <= size:
            data = await piece()
            if not data:
                break
            if not sink.put(done, data):
                return done + len(data)  # more than it said, or the caller left
            done += len(data)
        if done != size:  # a body cut short: worth another try
            raise ConnectionError(f"the body of {key} ended after {done} of {size} bytes")
        return size
    finally:
        body.close()


def _pieces(body: Any) -> Callable[[], Any]:
    """An awaitable source of a response body's pieces: aiohttp's own, as it
    received them (StreamReader.readchunk, nothing joined), else reads of up
    to _PIECE bytes (another HTTP client under aiobotocore)."""
    try:
        readchunk = body.raw_stream.content.readchunk
    except Exception:
        readchunk = None
    if readchunk is None:
        return lambda: body.read(_PIECE)

    async def piece() -> bytes:
        data: bytes = (await readchunk())[0]
        return data

    return piece


def _parameters(fn: Any) -> frozenset[str]:
    if fn is None:
        return frozenset()
    try:
        return frozenset(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return frozenset()
