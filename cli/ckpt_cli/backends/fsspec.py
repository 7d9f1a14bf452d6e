"""The backend of every store fsspec reaches (s3, gs, az, sftp, memory, ...);
the ONLY module that imports fsspec.

`FsspecStore` makes one try per call, bounded by the io timeout;
`FsspecBackend`, what open_backend returns, is that store behind
`RetryingBackend` (jittered backoff, a new connection after an
authentication failure and before the last try, one RemoteError line)."""

from __future__ import annotations

import contextlib
import inspect
import os
import secrets
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from ckpt_cli import redact
from ckpt_cli.backends import DEFAULT_CONCURRENCY, NotFound
from ckpt_cli.backends import TEMP_RE as _TEMP_RE
from ckpt_cli.backends.retry import RetryingBackend, connect_retrying, describe, is_auth_error
from ckpt_cli.backends.urls import OBJECT_STORES as _OBJECT_STORES
from ckpt_cli.backends.urls import redact_url
from ckpt_cli.errors import ConfigError, RemoteError

if TYPE_CHECKING:
    from ckpt_cli.backends.s3direct import DirectS3
    from ckpt_cli.backends.s3get import S3Gets

T = TypeVar("T")

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
#: Schemes whose fsspec put takes a bytearray (the conformance suite writes
#: one to each): a chunk buffer goes out without a copy.
_TAKE_BYTEARRAYS = frozenset({"s3", "s3a", "gs", "gcs", "sftp", "ssh", "memory"})
#: S3 clients keep this many connections beside the chunk transfers (lease
#: heartbeat, listings, manifests); botocore's own default is 10.
_POOL_SPARE = 4
_POOL_MIN = 10


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
        """No more puts; the view is let go (an abandoned attempt's
        coroutine may hold the sink for a while yet)."""
        with self._lock:
            self._open = False
            self.view = memoryview(b"")


class FsspecStore:
    """Any fsspec filesystem, one try per call: object stores put atomically;
    others write a temp object and rename it.

    Every call is bounded by io_timeout (async implementations: s3fs, gcsfs,
    adlfs, sshfs). `reconnect` builds the filesystem afresh, bypassing
    fsspec's instance cache, so rotated or refreshed credentials (env vars,
    credential files, tokens) are read again and broken connection pools
    are dropped (`RetryingBackend` asks for it).

    On S3, reads go without the filesystem where `s3direct` applies (its
    signed GETs from the calling thread), and the filesystem is made on
    first need: a command that only reads never imports s3fs.

    What a call raises: NotFound; RemoteError (a missing bucket: final);
    anything else is the filesystem's own exception, a failed try.
    """

    #: write() has finished with its data when it returns, so a caller may
    #: hand it a view of a buffer it reuses. Not after it raised: a put that
    #: timed out may still be sending from it (never reuse such a buffer).
    borrows_buffers = True
    #: create_exclusive checks, then puts: a racing writer may still win.
    exclusive_create = False
    #: read_into streams an S3 body into the view; other stores copy it in.
    reads_into = True
    #: Reads and writes are requests: many in flight hide their round trips.
    local_io = False

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
        #: (the filesystem, its presigned GETs or None), made on first use.
        self._gets: tuple[Any, S3Gets | None] | None = None
        #: S3 reads without s3fs (`s3direct`), where they reach the same
        #: endpoint the same way; the filesystem is then made on first need.
        self._direct: DirectS3 | None = None
        self._fs: Any = None
        self._create: tuple[dict[str, Any] | None] | None = None
        if urlsplit(url).scheme in ("s3", "s3a"):
            from ckpt_cli.backends.s3direct import DirectS3

            self._direct = DirectS3.from_config(url, self.options, os.environ)
        if self._direct is not None:
            self.root = url.split("://", 1)[1].rstrip("/")
            self.atomic_put = True
        else:
            self._fs, self.root = self._connect()
            fs = self._fs
            protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
            self.atomic_put = protocol in _OBJECT_STORES
        #: Its put sends a bytearray as it is (adlfs refuses one); S3 with
        #: ckpt's client settings takes a chunk buffer piece by piece.
        self._bytearrays = urlsplit(url).scheme in _TAKE_BYTEARRAYS
        self._pieces: bool | None = None

    @property
    def _piecewise(self) -> bool:
        """Its put takes a chunk buffer piece by piece (`piecewise_puts`);
        asked on the first write (botocore's Config says which options it has)."""
        if self._pieces is None:
            self._pieces = self._bytearrays and piecewise_puts(self._open_options())
        return self._pieces

    @property
    def fs(self) -> Any:
        """The fsspec filesystem, made on first use where reads go direct."""
        fs = self._fs
        if fs is not None:
            return fs
        with self._lock:
            if self._fs is None:
                self._fs, _root = self._connect()
            return self._fs

    @property
    def _create_kw(self) -> dict[str, Any] | None:
        """How this implementation's put refuses to replace an existing object:
        s3fs and gcsfs take mode="create" (If-None-Match / ifGenerationMatch=0),
        adlfs overwrite=False; others cannot, and create_exclusive checks first."""
        if self._create is None:
            params = _parameters(getattr(self.fs, "_pipe_file", None))
            self._create = (
                {"mode": "create"}
                if "mode" in params
                else {"overwrite": False}
                if "overwrite" in params
                else None,
            )
        return self._create[0]

    def _direct_on(self) -> DirectS3 | None:
        direct = self._direct
        return direct if direct is not None and not direct.off else None

    def _bucket_key(self, key: str) -> tuple[str, str]:
        bucket, _, rest = self._path(key).partition("/")
        return bucket, rest

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
            hint = "check the credentials" if is_auth_error(exc) else "is it reachable?"
            raise RemoteError(
                f"remote {self.display} could not be opened ({hint}): "
                f"{redact.scrub(describe(exc, self.io_timeout))}"
            ) from None
        return fs, root.rstrip("/")

    @property
    def connection(self) -> object:
        return self._fs

    def reconnect(self, stale: object) -> None:
        """Replace the filesystem unless another thread already did (or
        none was made yet: the direct reads keep no client to renew)."""
        with self._lock:
            if self._fs is not stale or stale is None:
                return
            try:
                self._fs, _root = self._connect()
            except (ConfigError, RemoteError):
                return  # keep the old one; the call's own error is reported
            self.reconnects += 1

    @property
    def conditional_put(self) -> bool:
        """The put itself refuses to replace an object (`put_new`)."""
        return self.atomic_put and self._create_kw is not None

    def _once(self, op: Callable[[Any, dict[str, Any]], T]) -> T:
        """op(fs, kwargs), kwargs carrying the timeout for async filesystems."""
        fs = self.fs
        return op(fs, {"timeout": self.io_timeout} if fs.async_impl else {})

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}" if self.root else key

    def _missing_container(self, what: str) -> RemoteError:
        return RemoteError(
            f"{what} on {self.display} failed: the bucket or container does not exist "
            "(create it, or fix --remote)"
        )

    def read(self, key: str) -> bytes:
        direct = self._direct_on()
        if direct is not None:
            from ckpt_cli.backends.s3direct import Unanswered

            with contextlib.suppress(Unanswered):
                got = direct.read(*self._bucket_key(key), self.io_timeout)
                if got is None:
                    raise NotFound(key)
                return got
        path = self._path(key)

        def go(fs: Any, kw: dict[str, Any]) -> bytes:
            try:
                if getattr(fs, "_call_s3", None) is not None:
                    from fsspec.asyn import sync

                    got: bytes = sync(fs.loop, _get_async, fs, path, **kw)
                    return got
                data: bytes = fs.cat_file(path, **kw)
            except (FileNotFoundError, IsADirectoryError):
                raise NotFound(key) from None
            return data

        return self._once(go)

    def read_into(self, key: str, view: memoryview) -> int:
        """Read the object at key into view and return its size: where that is
        len(view), view holds the object; otherwise view is not the object's
        size (nothing is written beyond view; what it holds is undefined).
        NotFound if absent; one try, bounded by io_timeout. When this returns
        or raises, nothing writes into view any more (a try that timed out is
        cut off: `_Sink`, so the next try has view to itself).

        S3 gets the object by a presigned URL in the calling thread, its body
        received straight into view (`s3get`), where the client would reach
        the endpoint the same way; else the client streams the body into view
        as it arrives. Either way: no request for the size first, no bytes
        object of the whole chunk joined and copied again, no checksum of it
        (its caller verifies the chunk by its name). Other stores read the
        object, then copy it into view."""
        direct = self._direct_on()
        if direct is not None:
            got = direct.read_into(*self._bucket_key(key), None, view, self.io_timeout)
            if got is not None:
                return got  # else a 404 or a busy server: the client answers
        path = self._path(key)

        def go(fs: Any, kw: dict[str, Any]) -> int:
            gets = self._presigned(fs)
            if gets is not None:
                bucket, obj, version = fs.split_path(path)
                got = gets.read_into(bucket, obj, version, view, self.io_timeout)
                if got is not None:
                    return got
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

        return self._once(go)

    def _presigned(self, fs: Any) -> S3Gets | None:
        """The presigned GETs of fs (None but for S3: `S3Gets.for_fs`), made
        on first use."""
        with self._lock:
            made = self._gets
            if made is not None and made[0] is fs:
                return made[1]
        from ckpt_cli.backends.s3get import S3Gets

        gets = S3Gets.for_fs(fs)
        with self._lock:
            if self._gets is None or self._gets[0] is not fs:
                self._gets = (fs, gets)
            return self._gets[1]

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
            self._once(go)
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
        if not self.conditional_put:
            self.write(key, data)
            return True
        return self.put_new(key, data)

    def put_new(self, key: str, data: bytes) -> bool:
        """The conditional put (where `conditional_put`): False if key exists."""
        create_kw = self._create_kw or {}
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
            return self._once(go)
        except FileNotFoundError:
            raise self._missing_container(f"creating {key}") from None

    def delete(self, key: str) -> None:
        path = self._path(key)

        def go(fs: Any, kw: dict[str, Any]) -> None:
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(path, **kw)

        self._once(go)

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

        self._once(go)

    def names(self) -> list[str]:
        """One level below the root; for a root that does not exist, whether
        its bucket (object stores) or parent directory (sftp, ...) does."""
        root = self.root
        if self.atomic_put:  # object stores: BUCKET/prefix (memory:// has no buckets)
            container = "" if root.startswith("/") else root.split("/", 1)[0]
        else:  # a filesystem: the parent directory
            container = root.rsplit("/", 1)[0] if "/" in root.strip("/") else ""

        def go(fs: Any, kw: dict[str, Any]) -> list[str] | None:
            try:
                found = fs.ls(root, detail=False, **kw)
            except (FileNotFoundError, NotADirectoryError):
                found = []
            names = [str(n).rstrip("/").rsplit("/", 1)[-1] for n in found]
            names = [n for n in names if n and not _TEMP_RE.match(n)]
            if names or not container:
                return names
            return [] if fs.exists(container, **kw) else None

        answered, names = self._direct_names(root)
        if not answered:
            names = self._once(go)
        if names is None:
            what = "bucket or container" if self.atomic_put else "parent directory"
            raise RemoteError(
                f"remote {self.display} does not exist: the {what} {container!r} is missing "
                "(create it, or fix REMOTE)"
            )
        return names

    def _direct_listing(
        self, base: str, delimiter: str = ""
    ) -> tuple[bool, tuple[list[str], list[str]] | None]:
        """A direct listing of everything under base/ (`DirectS3.listing`,
        keys and common prefixes relative to the bucket): (False, None)
        where the direct path cannot answer; (True, None) where the bucket
        is missing."""
        direct = self._direct_on()
        if direct is None:
            return False, None
        from ckpt_cli.backends.s3direct import Unanswered

        bucket, _, prefix = base.partition("/")
        try:
            return True, direct.listing(
                bucket, f"{prefix}/" if prefix else "", self.io_timeout, delimiter=delimiter
            )
        except Unanswered:
            return False, None

    def _direct_names(self, root: str) -> tuple[bool, list[str] | None]:
        """names() by a direct listing, as `_direct_listing` answers."""
        answered, listed = self._direct_listing(root, "/")
        if listed is None:
            return answered, None
        found = {n.rstrip("/").rsplit("/", 1)[-1] for n in listed[0] + listed[1]}
        return True, sorted(n for n in found if n and not _TEMP_RE.match(n))

    def _direct_list(self, base: str) -> list[str] | None:
        """Every key under base/ by direct listings (a missing bucket has
        none); None where the direct path cannot answer."""
        answered, listed = self._direct_listing(base)
        if not answered:
            return None
        bucket = base.partition("/")[0]
        return [] if listed is None else [f"{bucket}/{k}" for k in listed[0]]

    def _keys(self, found: Sequence[str], temp: bool) -> list[str]:
        """The keys of a listing below the root: temp names only, or none."""
        strip = self.root.lstrip("/")
        keys = []
        for name in found:
            rel = name.lstrip("/")
            if strip:
                if not rel.startswith(strip + "/"):
                    continue
                rel = rel[len(strip) + 1 :]
            if rel.endswith("/"):  # a directory marker, never a key of ours
                continue
            if bool(_TEMP_RE.match(rel.rsplit("/", 1)[-1])) == temp:
                keys.append(rel)
        return keys

    def list(self, prefix: str, *, temp: bool = False) -> list[str]:
        base = self._path(prefix).rstrip("/")

        def go(fs: Any, kw: dict[str, Any]) -> list[str]:
            try:
                if getattr(fs, "_call_s3", None) is not None and "/" in base:
                    # One listing of the keys under base/: s3fs's find(base)
                    # follows an empty listing with a HEAD of base and a
                    # second listing (is base a file? a directory marker?),
                    # three requests where the answer is "none yet".
                    parent, name = base.rsplit("/", 1)
                    found: list[str] = fs.find(parent, prefix=name + "/", **kw)
                else:
                    found = fs.find(base, **kw)
            except FileNotFoundError:
                return []
            finally:
                # find fills the listings cache (s3fs) and never refreshes it;
                # a later read of an object another process (another rank)
                # wrote since is then answered "not found" from that cache.
                with contextlib.suppress(Exception):
                    fs.invalidate_cache()
            return self._keys(found, temp)

        found = self._direct_list(base)
        return self._once(go) if found is None else self._keys(found, temp)


class FsspecBackend(RetryingBackend):
    """What open_backend returns for a URL that is not local: an
    `FsspecStore` behind `RetryingBackend`, connected with the same tries
    as any call (sshfs connects at once)."""

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any],
        *,
        io_timeout: float,
        concurrency: int = DEFAULT_CONCURRENCY,
    ) -> None:
        self.store = connect_retrying(
            lambda: FsspecStore(
                url, storage_options, io_timeout=io_timeout, concurrency=concurrency
            )
        )
        super().__init__(self.store, io_timeout=io_timeout)

    @property
    def fs(self) -> Any:
        """The fsspec filesystem the calls use now."""
        return self.store.fs

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """The store's check, then put, each part with its own tries."""
        try:
            self.read(key)
            return False
        except NotFound:
            pass
        if not self.store.conditional_put:
            self.write(key, data)
            return True
        return self._retry(f"creating {key}", lambda: self.store.put_new(key, data))


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


async def _get_object(fs: Any, path: str) -> tuple[str, Any]:
    """(the key, s3fs's GetObject response) for path: one request, the
    body not read yet."""
    bucket, key, version = fs.split_path(path)
    extra = {"VersionId": version} if version else {}
    return key, await fs._call_s3("get_object", Bucket=bucket, Key=key, **extra)


async def _read_async(fs: Any, path: str, sink: _Sink) -> int:
    """read_into's work on the filesystem's event loop: the object's size."""
    if getattr(fs, "_call_s3", None) is None:  # gcsfs, adlfs, sshfs: the object, then a copy
        data: bytes = await fs._cat_file(path)
        if len(data) == len(sink.view):
            sink.put(0, data)
        return len(data)
    key, resp = await _get_object(fs, path)
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


async def _get_async(fs: Any, path: str) -> bytes:
    """The object at path, with one GET: s3fs's cat_file asks for its size
    first (a HEAD, to decide whether to fetch it in ranges), and a missing
    object then costs a HEAD and a listing before the answer."""
    key, resp = await _get_object(fs, path)
    body = resp["Body"]
    try:
        data: bytes = await body.read()
    finally:
        body.close()
    size = int(resp.get("ContentLength", len(data)))
    if len(data) != size:  # a body cut short: worth another try
        raise ConnectionError(f"the body of {key} ended after {len(data)} of {size} bytes")
    return data


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
