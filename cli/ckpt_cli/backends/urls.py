"""What a remote URL says, before any backend is opened: its printable
form, its storage options, whether it is a local path, and which schemes are
object stores or must name a bucket."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ckpt_cli.errors import ConfigError

#: fsspec protocols whose put is atomic (an object appears whole or not at all).
OBJECT_STORES = frozenset(
    {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory", "oss", "r2"}
)
#: Schemes whose URL must name a bucket, container or host (s3://BUCKET/prefix).
NEEDS_BUCKET = frozenset(OBJECT_STORES - {"memory"}) | {"sftp", "ssh"}


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
