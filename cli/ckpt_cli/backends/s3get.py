"""S3 GETs of chunk bodies in the calling thread, by presigned URL.

A restore from S3 through s3fs runs every byte through one thread: the event
loop receives each body in 256 KiB bytes objects, aiohttp parses them and
botocore handles each response, while the threads that hash and write wait
for it (70 % of their time in bench/ case 5's profile; the loop thread was
busy 94 % of the restore). Here the client only signs: each chunk is one
plain HTTP/1.1 GET of a presigned URL, made by the thread that wants the
chunk, its body received straight into that thread's chunk buffer
(`recv_into`, the GIL released), on a keep-alive connection of the thread's
own. A 1 GiB restore from moto on 127.0.0.1 took 1.5-1.9 s this way against
2.9 s through the event loop, half the user and system time (findings.md).

Only what the client would do the same way is done here: a plain `http://`
endpoint, or `https://` verified against the CA bundle the client itself
verifies with (`verify`, AWS_CA_BUNDLE, REQUESTS_CA_BUNDLE, the default
bundle). Anything else keeps the client's own path for every GET: a proxy
for the endpoint, a client certificate, verification turned off, extra
request parameters (requester pays, SSE-C keys), anonymous access, a client
whose HTTP session does not say how it verifies. And any answer but a 200
that states its length is not handled here: the caller asks the client
(`FsspecStore.read_into`), whose errors and retries are the usual ones; an
answer that is not about this one GET (the URL refused: 400, 403; a redirect
to another region) turns the presigned path off for the filesystem's
lifetime. A kept-alive connection the server closed meanwhile is replaced
once, at once, like any HTTP client does.

The presigned URL carries a signature for one object, valid
`EXPIRES` seconds; it appears in no message and no log.
"""

from __future__ import annotations

import http.client
import os
import ssl
import threading
import time
from typing import Any
from urllib.parse import urlsplit

#: How long a presigned URL is valid: one GET, made at once.
EXPIRES = 900
#: Statuses the client answers for this one GET (a missing object, a busy
#: or failing server); any other but 200 (the URL refused: its signature,
#: its form; a redirect to another region) turns the presigned path off.
_ONCE = frozenset({404, 500, 502, 503, 504})
#: What a kept-alive connection the server closed meanwhile raises.
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


class S3Gets:
    """Presigned GETs for one s3fs filesystem (`for_fs` says whether it can)."""

    def __init__(self, fs: Any, client: Any, context: ssl.SSLContext | None) -> None:
        self.fs = fs
        self.client = client
        self.context = context
        self._local = threading.local()
        self.off = False

    @classmethod
    def for_fs(cls, fs: Any) -> S3Gets | None:
        """The presigned path for fs, or None where the client's own path
        must be kept (see the module's docstring). Opens the client."""
        if getattr(fs, "_call_s3", None) is None or getattr(fs, "anon", False):
            return None
        if getattr(fs, "req_kw", None) or getattr(fs, "s3_additional_kwargs", None):
            return None  # requester pays, SSE-C keys, ...: not in a presigned URL
        try:
            from fsspec.asyn import sync

            client = sync(fs.loop, fs.set_session)
            session = client._endpoint.http_session
            endpoint = str(client.meta.endpoint_url)
            verify = session._verify
            cert = session._cert_file
            proxy = session._proxy_config.proxy_url_for(endpoint)
        except Exception:
            return None  # a client that does not say how it connects
        scheme = urlsplit(endpoint).scheme
        if cert or proxy or scheme not in ("http", "https"):
            return None
        if scheme == "http":
            return cls(fs, client, None)
        if verify is False:
            return None
        try:
            context = _verifying_context(verify)
        except (OSError, ssl.SSLError, ValueError):
            return None  # the client reports its own bundle's problem
        return cls(fs, client, context)

    def read_into(
        self, bucket: str, key: str, version: str | None, view: memoryview, timeout: float
    ) -> int | None:
        """The object's size, its body in view when that is len(view); None
        where this path cannot answer (the caller asks the client instead).
        Raises OSError (TimeoutError, ConnectionError) for a try that failed
        on the way: the caller's retries apply. Nothing writes into view once
        this returns or raises."""
        if self.off:
            return None
        deadline = time.monotonic() + timeout
        url = self._presign(bucket, key, version, timeout)
        if url is None:
            return None
        conn, sock, resp = self._send(url, timeout)
        try:
            size = _length(resp)
            if resp.status != 200 or size is None:
                if resp.status not in _ONCE:
                    self.off = True
                self._drop(conn)
                return None
            if size != len(view):
                self._drop(conn)
                return size  # not this chunk's size: the caller says so
            done = 0
            while done < size:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"reading {key} took longer than {timeout:g} s")
                sock.settimeout(left)
                n = resp.readinto(view[done:])
                if not n:
                    raise ConnectionError(f"the body of {key} ended after {done} of {size} bytes")
                done += n
            resp.close()
            if resp.will_close:
                self._drop(conn)
            return size
        except BaseException:
            self._drop(conn)
            raise

    def fetch(self, url: str, timeout: float) -> tuple[int, bytes]:
        """GET a (small) presigned URL whole: its status and body. Raises
        OSError for a try that failed on the way, as read_into does."""
        deadline = time.monotonic() + timeout
        conn, sock, resp = self._send(url, timeout)
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            body = resp.read()
            if resp.will_close:
                self._drop(conn)
            return resp.status, body
        except BaseException:
            self._drop(conn)
            raise

    def _send(
        self, url: str, timeout: float
    ) -> tuple[http.client.HTTPConnection, Any, http.client.HTTPResponse]:
        """GET url on this thread's kept-alive connection: (the connection,
        the body's socket, the response with its headers read)."""
        parts = urlsplit(url)
        target = f"{parts.path}?{parts.query}" if parts.query else parts.path
        for fresh in (False, True):
            conn = self._connection(parts.scheme, parts.netloc, timeout, fresh=fresh)
            reused = conn.sock is not None
            try:
                conn.request("GET", target, headers={"Accept-Encoding": "identity"})
                sock = conn.sock  # the body's socket, kept past a "Connection: close"
                return conn, sock, conn.getresponse()
            except _STALE:
                # A kept-alive connection the server had closed meanwhile:
                # once more on a new one, as any HTTP client does.
                self._drop(conn)
                if not reused or fresh:
                    raise
            except BaseException:
                self._drop(conn)
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _presign(self, bucket: str, key: str, version: str | None, timeout: float) -> str | None:
        from fsspec.asyn import sync

        params = {"Bucket": bucket, "Key": key}
        if version:
            params["VersionId"] = version
        try:
            url: str = sync(
                self.fs.loop,
                self.client.generate_presigned_url,
                "get_object",
                Params=params,
                ExpiresIn=EXPIRES,
                timeout=timeout,
            )
        except Exception:
            return None  # the client's own request reports what is wrong
        return url

    def _connection(
        self, scheme: str, netloc: str, timeout: float, *, fresh: bool = False
    ) -> http.client.HTTPConnection:
        conns: dict[tuple[str, str], http.client.HTTPConnection] = self._local.__dict__.setdefault(
            "conns", {}
        )
        conn = None if fresh else conns.get((scheme, netloc))
        if conn is None:
            if scheme == "https":
                conn = http.client.HTTPSConnection(netloc, timeout=timeout, context=self.context)
            else:
                conn = http.client.HTTPConnection(netloc, timeout=timeout)
            conns[(scheme, netloc)] = conn
        else:
            conn.timeout = timeout
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
        return conn

    def _drop(self, conn: http.client.HTTPConnection) -> None:
        conns = self._local.__dict__.get("conns", {})
        for k, v in list(conns.items()):
            if v is conn:
                del conns[k]
        conn.close()


def _length(resp: http.client.HTTPResponse) -> int | None:
    """The body's length the response declares, None without one (chunked)."""
    value = resp.getheader("Content-Length")
    if value is None or resp.getheader("Content-Encoding", "identity") != "identity":
        return None
    try:
        size = int(value)
    except ValueError:
        return None
    return size if size >= 0 else None


def _verifying_context(verify: object) -> ssl.SSLContext:
    """An SSL context that verifies like the client: `verify` True (the
    client's default bundle) or a CA bundle file or directory."""
    if verify is True:
        from botocore.httpsession import get_cert_path  # type: ignore[import-untyped]

        verify = get_cert_path(True)
    if not isinstance(verify, str):
        raise ValueError(f"verify {verify!r}")
    if os.path.isdir(verify):
        return ssl.create_default_context(capath=verify)
    return ssl.create_default_context(cafile=verify)
