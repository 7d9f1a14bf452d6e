"""AWS Signature Version 4 for S3, query-string form (a presigned URL).

Standard library only: a restore from S3 signs its GETs here instead of
importing an SDK (`s3direct`). The algorithm is AWS's, as documented in
"Authenticating Requests: Using Query Parameters (AWS Signature Version 4)":
a canonical request (method, the URI with each path segment encoded once,
the query sorted by name, the signed `host` header, UNSIGNED-PAYLOAD), a
string to sign over its SHA-256, and an HMAC-SHA256 chain of date, region,
service and "aws4_request" from the secret key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import time
from urllib.parse import quote

ALGORITHM = "AWS4-HMAC-SHA256"


@dataclasses.dataclass(frozen=True)
class Credentials:
    key: str
    secret: str
    token: str | None = None

    def __repr__(self) -> str:  # never the secret, whatever prints this
        return f"Credentials(key={self.key!r}, secret=..., token={'...' if self.token else None})"


def _encode(text: str, safe: str = "") -> str:
    """RFC 3986 encoding as SigV4 wants it: all but A-Z a-z 0-9 - _ . ~ (and `safe`)."""
    return quote(text, safe=safe + "-_.~")


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def presign(
    method: str,
    scheme: str,
    host: str,
    path: str,
    query: dict[str, str],
    creds: Credentials,
    region: str,
    *,
    expires: int,
    now: float | None = None,
) -> str:
    """The URL of a request signed in its query: `host` exactly as the
    request's Host header says it (port included where not the default),
    `path` not encoded yet (each segment is, once), `query` the request's
    own parameters. Valid `expires` seconds from `now` (default: the time)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    day = stamp[:8]
    scope = f"{day}/{region}/s3/aws4_request"
    params = dict(query)
    params.update(
        {
            "X-Amz-Algorithm": ALGORITHM,
            "X-Amz-Credential": f"{creds.key}/{scope}",
            "X-Amz-Date": stamp,
            "X-Amz-Expires": str(expires),
            "X-Amz-SignedHeaders": "host",
        }
    )
    if creds.token:
        params["X-Amz-Security-Token"] = creds.token
    canonical_query = "&".join(f"{_encode(k)}={_encode(v)}" for k, v in sorted(params.items()))
    canonical_uri = _encode(path, safe="/") or "/"
    canonical = "\n".join(
        [method, canonical_uri, canonical_query, f"host:{host}\n", "host", "UNSIGNED-PAYLOAD"]
    )
    to_sign = "\n".join([ALGORITHM, stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(("AWS4" + creds.secret).encode(), day)
    for part in (region, "s3", "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return f"{scheme}://{host}{canonical_uri}?{canonical_query}&X-Amz-Signature={signature}"
