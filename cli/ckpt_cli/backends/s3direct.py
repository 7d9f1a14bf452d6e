"""S3 reads without the SDK: a restore that never imports s3fs.

A restore from S3 spent 0.27 s importing fsspec, s3fs, aiobotocore and
aiohttp and 0.12 s making its client before the first byte came, a quarter
of a 1 GiB restore from a server on the same machine (bench/ case 5), and
the same again for `ckpt ls`. Here the reads a restore makes (listing keys,
getting manifests, chunks) are plain HTTP/1.1 GETs of URLs signed with
AWS Signature Version 4 in their query (`sigv4`, the standard library
only), on one kept-alive connection per thread (`s3get.S3Gets`). Writes,
and everything not covered here, go through s3fs as before, which is
imported on first need (`FsspecStore`).

Used only where this reaches the same endpoint with the same credentials as
the client would, known without a network request or a guess
(`DirectS3.from_config`, else None and s3fs does it all):

- credentials: `key` and `secret` (and `token`) in the storage options,
  else AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN),
  else the profile's keys in the shared credentials file. Nothing else: no
  `profile` option, no credential process, SSO, role or instance metadata.
- endpoint: the `endpoint_url` option (or `client_kwargs`), else
  AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (unless
  AWS_IGNORE_CONFIGURED_ENDPOINT_URLS), addressed by path; else AWS's
  regional endpoint, addressed by virtual host, when a region is set
  (options, AWS_REGION / AWS_DEFAULT_REGION, the config file's profile).
- the AWS config file's profile sets nothing but `region` (and `output`);
  no proxy applies to the endpoint; no FIPS or dual-stack endpoint; https
  verifies against the bundle the client would use (`verify`,
  AWS_CA_BUNDLE, else certifi's), never with verification off.
- no other storage option than those and s3fs's caching knobs.

Answers other than 200 (and 404, which is NotFound) are not handled here:
the call falls back to s3fs, and an answer that is about the signature or
the address (400, 401, 403, a redirect to another region) turns this path
off for the store's lifetime; so does a connection that fails, after which
the retries and their messages are s3fs's, as before.
"""

from __future__ import annotations

import configparser
import os
import ssl
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit
from urllib.request import getproxies_environment, proxy_bypass

from ckpt_cli.backends import sigv4
from ckpt_cli.backends.s3get import EXPIRES, S3Gets

#: Storage options that change nothing about how a GET is made (s3fs's
#: caches and buffers), beside the credentials and endpoint read here.
_HARMLESS = frozenset(
    {
        "skip_instance_cache",
        "use_listings_cache",
        "listings_expiry_time",
        "max_paths",
        "default_block_size",
        "default_fill_cache",
        "default_cache_type",
        "cache_regions",
    }
)
_OPTIONS = _HARMLESS | {"key", "secret", "token", "endpoint_url", "client_kwargs"}
_CLIENT_KWARGS = frozenset({"endpoint_url", "region_name", "verify"})
#: Keys a profile of the AWS config file may set and change nothing here.
_PROFILE_KEYS = frozenset({"region", "output"})
#: Statuses that are about this one request (the object, the server's
#: health): the call falls back, the path stays on.
_ONCE = frozenset({404, 408, 429, 500, 502, 503, 504})


class Unanswered(Exception):
    """The direct path cannot answer this call: s3fs does."""


class DirectS3(S3Gets):
    """Signed GETs of one bucket's objects and listings."""

    def __init__(
        self,
        scheme: str,
        host: str,
        path_style: bool,
        creds: sigv4.Credentials,
        region: str,
        context: ssl.SSLContext | None,
    ) -> None:
        super().__init__(fs=None, client=None, context=context)
        self.scheme, self.host, self.path_style = scheme, host, path_style
        self.creds, self.region = creds, region

    # -- when it applies

    @classmethod
    def from_config(
        cls, url: str, options: Mapping[str, Any], env: Mapping[str, str]
    ) -> DirectS3 | None:
        """The direct path for an s3:// url opened with these storage
        options in this environment, or None (see the module's docstring)."""
        parts = urlsplit(url)
        if parts.scheme not in ("s3", "s3a") or not parts.netloc:
            return None
        if "@" in parts.netloc or ":" in parts.netloc or parts.query or parts.fragment:
            return None  # keys or a port in the URL, a version: the SDK reads those
        if not set(options) <= _OPTIONS:
            return None
        client_kwargs = options.get("client_kwargs") or {}
        if not isinstance(client_kwargs, Mapping) or not set(client_kwargs) <= _CLIENT_KWARGS:
            return None
        if _on(env, "AWS_USE_FIPS_ENDPOINT") or _on(env, "AWS_USE_DUALSTACK_ENDPOINT"):
            return None
        profile_name = env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE") or "default"
        profile = _profile(
            env.get("AWS_CONFIG_FILE") or _home(env, "config"),
            profile_name if profile_name == "default" else f"profile {profile_name}",
        )
        if profile is None or not set(profile) <= _PROFILE_KEYS:
            return None
        creds = _credentials(options, env, profile_name)
        if creds is None:
            return None
        region = str(
            client_kwargs.get("region_name")
            or env.get("AWS_DEFAULT_REGION")
            or env.get("AWS_REGION")
            or profile.get("region")
            or ""
        )
        endpoint = options.get("endpoint_url") or client_kwargs.get("endpoint_url")
        if not endpoint and not _on(env, "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"):
            endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        bucket = parts.netloc
        if endpoint:
            ep = urlsplit(str(endpoint))
            if ep.scheme not in ("http", "https") or not ep.netloc or ep.path.strip("/"):
                return None
            scheme, host, path_style = ep.scheme, ep.netloc, True
            region = region or "us-east-1"
        else:
            if not region:
                return None  # the client would find the bucket's region by asking
            scheme, path_style = "https", not _dns_bucket(bucket)
            host = f"s3.{region}.amazonaws.com"
            if not path_style:
                host = f"{bucket}.{host}"
        hostname = urlsplit(f"{scheme}://{host}").hostname or ""
        if getproxies_environment().get(scheme) and not proxy_bypass(hostname):
            return None
        context = None
        if scheme == "https":
            context = _context(client_kwargs.get("verify", True), env)
            if context is None:
                return None
        return cls(scheme, host, path_style, creds, region, context)

    # -- requests

    def _url(self, bucket: str, key: str, query: dict[str, str]) -> str:
        # By path, the bucket's listing is /BUCKET (as the SDK asks it).
        where = "/".join(p for p in (bucket, key) if p) if self.path_style else key
        path = f"/{where}"
        return sigv4.presign(
            "GET", self.scheme, self.host, path, query, self.creds, self.region, expires=EXPIRES
        )

    def _presign(self, bucket: str, key: str, version: str | None, timeout: float) -> str | None:
        return self._url(bucket, key, {"versionId": version} if version else {})

    def _get(
        self, bucket: str, key: str, query: dict[str, str], timeout: float
    ) -> tuple[int, bytes]:
        """(status, body) of a GET; Unanswered where s3fs must answer."""
        if self.off:
            raise Unanswered()
        try:
            status, body = self.fetch(self._url(bucket, key, query), timeout)
        except OSError:
            self.off = True  # s3fs's tries and messages from here on
            raise
        if status not in (200, 404):
            if status not in _ONCE:
                self.off = True
            raise Unanswered()
        return status, body

    def read(self, bucket: str, key: str, timeout: float) -> bytes | None:
        """The object's bytes; None if it does not exist."""
        status, body = self._get(bucket, key, {}, timeout)
        return body if status == 200 else None

    def listing(
        self, bucket: str, prefix: str, timeout: float, *, delimiter: str = "", page: int = 0
    ) -> tuple[list[str], list[str]] | None:
        """(keys, common prefixes) under prefix, every page of them (of
        `page` keys each; 0: the server's size, 1,000 on AWS); None where
        the bucket does not exist."""
        keys: list[str] = []
        prefixes: list[str] = []
        token = ""
        while True:
            query = {"list-type": "2", "prefix": prefix}
            if delimiter:
                query["delimiter"] = delimiter
            if page:
                query["max-keys"] = str(page)
            if token:
                query["continuation-token"] = token
            status, body = self._get(bucket, "", query, timeout)
            if status == 404:
                return None
            try:
                root = ET.fromstring(body)
            except ET.ParseError:
                self.off = True
                raise Unanswered() from None
            fields = _fields(root)
            keys += fields.get("Contents/Key", [])
            prefixes += fields.get("CommonPrefixes/Prefix", [])
            token = (fields.get("NextContinuationToken") or [""])[0]
            if (fields.get("IsTruncated") or [""])[0] != "true" or not token:
                return keys, prefixes


def _fields(root: ET.Element) -> dict[str, list[str]]:
    """The texts of a listing's fields by path below its root ("Contents/Key",
    "IsTruncated"), namespaces left out (servers differ in using one)."""
    out: dict[str, list[str]] = {}

    def local(tag: str) -> str:
        return tag.rsplit("}", 1)[-1]

    for child in root:
        name = local(child.tag)
        if len(child):
            for leaf in child:
                out.setdefault(f"{name}/{local(leaf.tag)}", []).append(leaf.text or "")
        else:
            out.setdefault(name, []).append(child.text or "")
    return out


def _on(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes")


def _home(env: Mapping[str, str], name: str) -> str:
    return os.path.join(env.get("HOME") or os.path.expanduser("~"), ".aws", name)


def _profile(path: str, section: str) -> dict[str, str] | None:
    """The section of an AWS config-style file ({} if the file or section
    is absent); None where it cannot be read as one."""
    parser = configparser.RawConfigParser()
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, configparser.Error):
        return None
    return dict(parser[section]) if parser.has_section(section) else {}


def _credentials(
    options: Mapping[str, Any], env: Mapping[str, str], profile: str
) -> sigv4.Credentials | None:
    key, secret, token = options.get("key"), options.get("secret"), options.get("token")
    if key or secret:
        if not (isinstance(key, str) and isinstance(secret, str) and key and secret):
            return None
        return sigv4.Credentials(key, secret, token if isinstance(token, str) and token else None)
    if token:
        return None
    key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        return sigv4.Credentials(key, secret, env.get("AWS_SESSION_TOKEN") or None)
    if key or secret:
        return None
    shared = _profile(env.get("AWS_SHARED_CREDENTIALS_FILE") or _home(env, "credentials"), profile)
    if not shared or not set(shared) <= {
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
    }:
        return None
    key, secret = shared.get("aws_access_key_id"), shared.get("aws_secret_access_key")
    if not (key and secret):
        return None
    return sigv4.Credentials(key, secret, shared.get("aws_session_token") or None)


def _dns_bucket(bucket: str) -> bool:
    """A bucket name that can be a host name of its own (no dots, lower case)."""
    return (
        3 <= len(bucket) <= 63
        and "." not in bucket
        and bucket == bucket.lower()
        and bucket[0].isalnum()
        and bucket[-1].isalnum()
        and quote(bucket, safe="-") == bucket
    )


def _context(verify: object, env: Mapping[str, str]) -> ssl.SSLContext | None:
    """An SSL context verifying as the client would, or None where it cannot."""
    if verify is False:
        return None
    if verify is True or verify is None:
        verify = env.get("AWS_CA_BUNDLE") or None
        if verify is None:
            try:
                import certifi  # botocore's default bundle where it is installed
            except ImportError:
                return None
            verify = certifi.where()
    if not isinstance(verify, str):
        return None
    try:
        if os.path.isdir(verify):
            return ssl.create_default_context(capath=verify)
        return ssl.create_default_context(cafile=verify)
    except (OSError, ssl.SSLError, ValueError):
        return None
